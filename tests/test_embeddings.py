"""Tests for pejax.embeddings."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compiles import count_compiles

from pejax import embeddings
from pejax.embeddings import get_embedding
from pejax.embeddings import pixel_embedding
from pejax.embeddings import resize_embedding


def _images(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(dtype)


def _box_reference(images, h, w):
    """Independent NumPy float64 area averaging by explicit block loops."""
    n, in_h, in_w, c = images.shape
    fh, fw = in_h // h, in_w // w
    out = np.zeros((n, h, w, c))
    for i in range(h):
        for j in range(w):
            block = images[:, i * fh : (i + 1) * fh, j * fw : (j + 1) * fw, :].astype(np.float64)
            out[:, i, j, :] = block.mean(axis=(1, 2))
    return out.reshape(n, -1)


def test_docstring_examples():
    result = doctest.testmod(embeddings, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("jit", [False, True])
def test_pixel_embedding_flattens(jit):
    images = _images((7, 5, 3, 3))
    fn = jax.jit(pixel_embedding) if jit else pixel_embedding
    emb = fn(images)
    assert emb.shape == (7, 45)
    assert emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), images.reshape(7, -1))


def test_pixel_embedding_casts_to_float32():
    images = _images((3, 4, 4, 1), dtype=np.float16)
    emb = pixel_embedding(images)
    assert emb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(emb), images.reshape(3, -1).astype(np.float32))


@pytest.mark.parametrize(
    ("in_hw", "out_hw", "c"),
    [((12, 9), (4, 3), 1), ((12, 8), (4, 2), 3), ((28, 28), (7, 7), 1), ((6, 10), (1, 1), 3)],
)
def test_resize_integer_ratio_is_exact_area_average(in_hw, out_hw, c):
    images = _images((5, *in_hw, c), seed=1)
    emb = resize_embedding(images, size=out_hw)
    assert emb.shape == (5, out_hw[0] * out_hw[1] * c)
    assert emb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(emb), _box_reference(images, *out_hw), atol=1e-6)


def test_resize_same_size_is_identity():
    images = _images((3, 8, 8, 1))
    np.testing.assert_array_equal(
        np.asarray(resize_embedding(images, size=(8, 8))), images.reshape(3, -1)
    )


@pytest.mark.parametrize(("in_hw", "out_hw"), [((28, 28), (8, 8)), ((5, 7), (8, 8))])
def test_resize_non_integer_ratio_uses_antialiased_linear(in_hw, out_hw):
    images = _images((4, *in_hw, 1), seed=2)
    emb = np.asarray(resize_embedding(images, size=out_hw))
    expected = jax.image.resize(
        jnp.asarray(images), (4, *out_hw, 1), method="linear", antialias=True
    ).reshape(4, -1)
    np.testing.assert_allclose(emb, np.asarray(expected), atol=1e-6)
    # Values stay in the input range: convex combinations only.
    assert emb.min() >= images.min() - 1e-6
    assert emb.max() <= images.max() + 1e-6


@pytest.mark.parametrize("out_hw", [(8, 8), (4, 2), (5, 11)])
def test_resize_preserves_constant_images(out_hw):
    images = np.full((2, 20, 12, 3), 0.3, np.float32)
    emb = np.asarray(resize_embedding(images, size=out_hw))
    np.testing.assert_allclose(emb, 0.3, atol=1e-6)


def test_resize_channel_conversion():
    rgb = _images((3, 4, 4, 3), seed=3)
    grey = np.asarray(resize_embedding(rgb, size=(4, 4), channels=1))
    expected = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).reshape(3, -1)
    np.testing.assert_allclose(grey, expected, atol=1e-6)

    mono = _images((2, 4, 4, 1), seed=4)
    as_rgb = np.asarray(resize_embedding(mono, size=(2, 2), channels=3)).reshape(2, 2, 2, 3)
    pooled = _box_reference(mono, 2, 2).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(as_rgb, np.repeat(pooled, 3, axis=-1), atol=1e-6)


def test_resize_under_jit_and_no_retrace():
    images = _images((4, 16, 16, 1))
    fn = jax.jit(lambda x: resize_embedding(x, size=(8, 8)))
    np.testing.assert_allclose(
        np.asarray(fn(images)), np.asarray(resize_embedding(images, size=(8, 8))), atol=1e-7
    )
    batches = [_images((4, 16, 16, 1), seed=seed) for seed in range(3)]
    with count_compiles() as compiles:
        for batch in batches:
            resize_embedding(batch, size=(8, 8))
    assert compiles.count == 0, compiles.names


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (np.zeros((2, 8, 8), np.float32), ValueError, r"4-D .*channel axis"),
        (np.zeros((2, 8, 8, 2), np.float32), ValueError, r"1 \(grey\) or 3 \(RGB\)"),
        (np.zeros((2, 8, 8, 4), np.float32), ValueError, r"alpha"),
        (np.zeros((0, 8, 8, 1), np.float32), ValueError, r"at least one image"),
        (np.zeros((2, 8, 8, 1), np.uint8), TypeError, r"floating dtype.*/ 255"),
        (np.zeros((2, 8, 8, 1), np.int32), TypeError, r"floating dtype"),
    ],
)
@pytest.mark.parametrize("fn", [pixel_embedding, lambda x: resize_embedding(x, size=(4, 4))])
def test_bad_images(fn, images, error, match):
    with pytest.raises(error, match=match):
        fn(images)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_images(bad):
    images = _images((3, 4, 4, 1))
    images[2, 1, 1, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf .*first in image 2"):
        pixel_embedding(images)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 8}, TypeError, r"size must be a pair"),
        ({"size": (8, 8, 1)}, TypeError, r"size must be a pair"),
        ({"size": (8.0, 8)}, TypeError, r"size must be a pair"),
        ({"size": (0, 8)}, ValueError, r"size must be positive"),
        ({"size": (8, 8), "channels": 2}, ValueError, r"channels must be None"),
        ({"size": (8, 8), "channels": True}, ValueError, r"channels must be None"),
    ],
)
def test_bad_resize_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        resize_embedding(_images((1, 8, 8, 1)), **kwargs)
    with pytest.raises(error, match=match):
        get_embedding("resize", **kwargs)


def test_get_embedding():
    images = _images((3, 16, 16, 3))
    assert get_embedding("pixels") is pixel_embedding
    fn = get_embedding("resize", size=(4, 4), channels=1)
    np.testing.assert_array_equal(
        np.asarray(fn(images)), np.asarray(resize_embedding(images, size=(4, 4), channels=1))
    )
    assert set(embeddings.EMBEDDINGS) == {"pixels", "resize"}


def test_get_embedding_errors():
    with pytest.raises(ValueError, match=r"'inception'.*\('pixels', 'resize'\)"):
        get_embedding("inception")
    with pytest.raises(ValueError, match=r"choose one of"):
        get_embedding("Pixels")  # exact names only
    with pytest.raises(TypeError, match=r"'pixels' takes no keyword arguments"):
        get_embedding("pixels", size=(8, 8))
    with pytest.raises(TypeError, match=r"needs size="):
        get_embedding("resize")
    with pytest.raises(TypeError, match=r"\['method'\]"):
        get_embedding("resize", size=(8, 8), method="cubic")
