import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import scipy.stats
from _compiles import count_compiles

pytest.importorskip("PIL", reason="needs pejax[demo]")
pytest.importorskip("fontTools", reason="needs pejax[demo]")

from pejax.buckets import bucket_size
from pejax.generators import Generator
from pejax.generators import glyphs
from pejax.generators.glyphs import GlyphParams
from pejax.generators.glyphs import GlyphPrior
from pejax.generators.glyphs import GlyphSimulator

# The continuous per-sample parameters of GlyphParams (all but the glyph index and the warp grid).
SCALAR_FIELDS = tuple(f for f in GlyphParams._fields if f not in ("glyph", "warp"))
SIZE = 16
N = 37  # awkward on purpose


def _font(name):
    return next(path for path in glyphs.default_fonts() if os.path.basename(path) == name)


@pytest.fixture(scope="module")
def sim():
    return GlyphSimulator(texts=("0", "1"), image_size=SIZE)


@pytest.fixture(scope="module")
def samples(sim):
    return sim.random(jax.random.key(0), label=0, num_samples=N)


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def test_is_a_generator(sim):
    assert isinstance(sim, Generator)
    assert sim.name == "glyphs"
    assert sim.num_classes == 2
    assert sim.num_glyphs == len(sim.glyph_labels) == len(sim.glyph_fonts)
    assert len(sim.fonts_for(0)) >= 10


def test_shapes_dtypes_and_ranges(sim, samples):
    assert isinstance(samples, GlyphParams)
    g = sim.warp_grid
    assert samples.glyph.shape == (N,) and samples.glyph.dtype == jnp.int32
    assert samples.warp.shape == (N, g, g, 2)
    prior = sim.prior
    for field in SCALAR_FIELDS:
        value = np.asarray(getattr(samples, field))
        assert value.shape == (N,) and value.dtype == np.float32
        low, high = getattr(prior, field)
        assert value.min() >= low and value.max() <= high, field
    assert np.all(np.abs(np.asarray(samples.warp)) <= 3 * prior.warp + 1e-7)
    assert set(np.asarray(samples.glyph)) <= set(np.flatnonzero(sim.glyph_labels == 0))
    images = sim.to_images(samples)
    assert images.shape == (N, SIZE, SIZE, 1) and images.dtype == jnp.float32
    images = np.asarray(images)
    assert images.min() >= 0.0 and images.max() <= 1.0
    # White ink on black: the border is mostly background, every image has some ink.
    assert images[:, 0, :, 0].mean() < 0.1
    assert np.all(images.max(axis=(1, 2, 3)) > 0.5)


def test_variation_stays_in_range_and_class(sim, samples):
    children = _np(sim.variation(jax.random.key(3), samples, label=0, degree=3.0))
    for field in SCALAR_FIELDS:
        low, high = getattr(sim.prior, field)
        value = getattr(children, field)
        assert value.min() >= low and value.max() <= high, field
    assert np.all(np.abs(children.warp) <= 3 * sim.prior.warp + 1e-6)
    assert set(children.glyph) <= set(np.flatnonzero(sim.glyph_labels == 0))
    # At a high degree the font does change.
    assert np.any(children.glyph != np.asarray(samples.glyph))


def test_same_key_same_output_different_key_different_output(sim, samples):
    a = _np(sim.random(jax.random.key(1), 1, N))
    b = _np(sim.random(jax.random.key(1), 1, N))
    c = _np(sim.random(jax.random.key(2), 1, N))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a.scale, c.scale)
    va = sim.to_images(sim.variation(jax.random.key(5), samples, 0, 0.5))
    vb = sim.to_images(sim.variation(jax.random.key(5), samples, 0, 0.5))
    vc = sim.to_images(sim.variation(jax.random.key(6), samples, 0, 0.5))
    np.testing.assert_array_equal(va, vb)
    assert not np.allclose(va, vc)


def test_degree_zero_is_identity(sim, samples):
    children = sim.variation(jax.random.key(9), samples, 0, 0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _np(children), _np(samples))
    np.testing.assert_array_equal(sim.to_images(children), sim.to_images(samples))


def test_distance_grows_with_degree(sim):
    parents = sim.random(jax.random.key(11), 1, 200)
    parent_images = np.asarray(sim.to_images(parents))
    distances = []
    for i, degree in enumerate((0.0, 0.1, 0.5, 1.0)):
        children = sim.variation(jax.random.key(100 + i), parents, 1, degree)
        diff = np.asarray(sim.to_images(children)) - parent_images
        distances.append(np.sqrt((diff**2).sum(axis=(1, 2, 3))).mean())
    assert distances[0] == 0.0
    assert distances[0] < distances[1] < distances[2] < distances[3], distances


def test_classes_differ_systematically(sim):
    train, test = [], []
    for label in (0, 1):
        images = np.asarray(sim.to_images(sim.random(jax.random.key(20 + label), label, 200)))
        images = images.reshape(200, -1)
        train.append(images[:100])
        test.append(images[100:])
    centroids = np.stack([x.mean(axis=0) for x in train])
    correct = 0
    for label, x in enumerate(test):
        nearest = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        correct += int((nearest == label).sum())
    assert correct / 200 > 0.85


def _catmull_rom_reference(num_out: int, num_grid: int) -> np.ndarray:
    """(num_out, num_grid) float64: the Catmull-Rom spline through grid values (ends repeated), at pixel centres.

    The textbook form p(f) = 0.5 (2 p1 + (p2 - p0) f + (2 p0 - 5 p1 + 4 p2 - p3) f^2 + (3 p1 - p0 - 3 p2 + p3) f^3),
    applied to each unit vector of the grid; grid point 0 sits on the image's first edge, the last on its last.
    """
    weights = np.zeros((num_out, num_grid))
    for j in range(num_grid):
        grid = np.eye(num_grid)[j]
        for i in range(num_out):
            t = (i + 0.5) / num_out * (num_grid - 1)
            base = math.floor(t)
            f = t - base
            p0, p1, p2, p3 = (grid[min(max(base + o, 0), num_grid - 1)] for o in (-1, 0, 1, 2))
            weights[i, j] = 0.5 * (
                2 * p1
                + (p2 - p0) * f
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * f**2
                + (3 * p1 - p0 - 3 * p2 + p3) * f**3
            )
    return weights


def test_matches_numpy_reference(sim, samples):
    """Independent float64 rendering: scipy's bilinear map_coordinates and erfc, the documented formulas."""
    p = _np(samples)
    interp = _catmull_rom_reference(SIZE, sim.warp_grid)
    sdf = np.asarray(sim.atlas, np.float64)
    atlas = sdf.shape[-1]
    centres = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    qy, qx = np.meshgrid(centres, centres, indexing="ij")
    images = np.asarray(sim.to_images(samples))[..., 0]
    for i in range(0, N, 6):
        px = qx + interp @ p.warp[i, ..., 0] @ interp.T - p.shift_x[i]
        py = qy + interp @ p.warp[i, ..., 1] @ interp.T - p.shift_y[i]
        rot = np.array([[math.cos(p.rotation[i]), -math.sin(p.rotation[i])],
                        [math.sin(p.rotation[i]), math.cos(p.rotation[i])]])  # fmt: skip
        zoom = p.scale[i] / glyphs.ATLAS_FIT
        stretch = np.diag([zoom * math.exp(p.aspect[i] / 2), zoom * math.exp(-p.aspect[i] / 2)])
        forward = rot @ np.array([[1.0, p.shear[i]], [0.0, 1.0]]) @ stretch
        ax, ay = np.einsum("ij,jhw->ihw", np.linalg.inv(forward), np.stack([px, py]))
        coords = np.stack([(ay + 0.5) * atlas - 0.5, (ax + 0.5) * atlas - 0.5])
        distance = (
            scipy.ndimage.map_coordinates(sdf[p.glyph[i]], coords, order=1, mode="nearest") * zoom
        )
        sigma = math.hypot(p.blur[i], 0.4 / SIZE)  # the module docstring's formula
        expected = (
            p.ink[i] * 0.5 * scipy.special.erfc((distance - p.stroke[i]) / (sigma * math.sqrt(2)))
        )
        np.testing.assert_allclose(images[i], expected, atol=2e-4)


def test_constant_warp_equals_shift(sim, samples):
    offset = np.array([0.03, -0.02], np.float32)
    warped = samples._replace(warp=jnp.broadcast_to(offset, samples.warp.shape))
    shifted = samples._replace(
        warp=jnp.zeros_like(samples.warp),
        shift_x=samples.shift_x - offset[0],
        shift_y=samples.shift_y - offset[1],
    )
    np.testing.assert_allclose(sim.to_images(warped), sim.to_images(shifted), atol=1e-5)


def test_thicker_stroke_more_ink(sim, samples):
    thin = sim.to_images(samples._replace(stroke=jnp.full((N,), -0.01)))
    thick = sim.to_images(samples._replace(stroke=jnp.full((N,), 0.05)))
    assert np.all(np.asarray(thick).sum(axis=(1, 2, 3)) > np.asarray(thin).sum(axis=(1, 2, 3)))


def test_not_retraced(sim, samples):
    keys = [jax.random.key(i) for i in range(3)]
    sim.to_images(samples)
    sim.variation(keys[0], samples, 0, 0.1)
    sim.random(keys[0], 0, N)
    with count_compiles() as compiles:
        for i in range(3):
            children = sim.variation(keys[i], samples, 0, 0.1 * i)
            sim.to_images(children)
            sim.random(keys[i], i % 2, N)
    assert compiles.count == 0


def test_works_under_outer_jit(sim, samples):
    np.testing.assert_allclose(jax.jit(sim.to_images)(samples), sim.to_images(samples), atol=1e-6)


def test_dict_samples_accepted(sim, samples):
    np.testing.assert_array_equal(sim.to_images(samples._asdict()), sim.to_images(samples))


def test_multi_character_text():
    sim = GlyphSimulator(texts=("10",), image_size=SIZE, fonts=[_font("DejaVuSans.ttf")])
    images = sim.to_images(sim.random(jax.random.key(0), 0, 3))
    assert images.shape == (3, SIZE, SIZE, 1)


def test_missing_glyph_is_a_clear_error():
    with pytest.raises(ValueError, match=r"texts\[1\] = '\\U0010fffd' \(U\+10FFFD\).*fonts="):
        GlyphSimulator(texts=("0", "\U0010fffd"), image_size=SIZE)


@pytest.mark.parametrize("name", ["cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf"])
def test_fonts_mapping_digits_to_other_symbols_are_skipped(name):
    with pytest.raises(ValueError, match=r"texts\[0\] = '0'"):
        GlyphSimulator(texts=("0",), image_size=SIZE, fonts=[_font(name)])
    sim = GlyphSimulator(texts=("0",), image_size=SIZE, fonts=[_font(name), _font("cmr10.ttf")])
    assert sim.fonts_for(0) == (_font("cmr10.ttf"),)


def test_identical_renders_deduplicated():
    path = _font("DejaVuSans.ttf")
    sim = GlyphSimulator(texts=("7",), image_size=SIZE, fonts=[path, path])
    assert sim.num_glyphs == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"label": 2}, ValueError, r"label must be in \[0, 2\).*got 2"),
        ({"label": -1}, ValueError, "got -1"),
        ({"label": True}, TypeError, "label must be an integer"),
        ({"label": 1.0}, TypeError, "label must be an integer"),
        ({"num_samples": 0}, ValueError, "num_samples must be an integer >= 1, got 0"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"key": None}, TypeError, "key is required"),
        ({"key": 3}, TypeError, "key must be a jax.random key"),
    ],
)
def test_random_bad_inputs(sim, kwargs, error, match):
    args = {"key": jax.random.key(0), "label": 0, "num_samples": 4} | kwargs
    with pytest.raises(error, match=match):
        sim.random(**args)


@pytest.mark.parametrize(
    ("degree", "error", "match"),
    [
        (-0.1, ValueError, "degree must be >= 0.0, got -0.1"),
        (float("nan"), ValueError, "degree must be finite"),
        (float("inf"), ValueError, "degree must be finite"),
        ("1", TypeError, "degree must be a real number"),
    ],
)
def test_variation_bad_degree(sim, samples, degree, error, match):
    with pytest.raises(error, match=match):
        sim.variation(jax.random.key(0), samples, 0, degree)


def test_bad_samples(sim, samples):
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="samples must be a GlyphParams"):
        sim.to_images(np.zeros((N, SIZE, SIZE, 1)))
    with pytest.raises(TypeError, match="samples must be a GlyphParams"):
        sim.to_images({"glyph": samples.glyph})
    with pytest.raises(
        ValueError, match=r"samples.warp must have shape \(37, 4, 4, 2\).*\(37, 3, 3, 2\)"
    ):
        sim.to_images(samples._replace(warp=samples.warp[:, :3, :3]))
    with pytest.raises(ValueError, match=r"samples.ink must have shape \(37,\)"):
        sim.to_images(samples._replace(ink=samples.ink[:5]))
    with pytest.raises(ValueError, match=r"samples.glyph must have shape \(N,\)"):
        sim.to_images(samples._replace(glyph=samples.glyph[:, None]))
    with pytest.raises(TypeError, match=r"samples.glyph must have an integer dtype"):
        sim.to_images(samples._replace(glyph=samples.glyph.astype(jnp.float32)))
    with pytest.raises(TypeError, match=r"samples.scale must have a floating dtype"):
        sim.to_images(samples._replace(scale=samples.glyph))
    with pytest.raises(ValueError, match=r"samples.glyph must index the atlas"):
        sim.to_images(samples._replace(glyph=samples.glyph + 1000))
    with pytest.raises(ValueError, match=r"samples.rotation contains NaN"):
        sim.to_images(samples._replace(rotation=samples.rotation.at[3].set(jnp.nan)))
    with pytest.raises(ValueError, match="were the samples made for another label"):
        sim.variation(key, samples, 1, 0.1)


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="texts must be a non-empty sequence"):
        GlyphSimulator(texts="0123")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a non-empty string"):
        GlyphSimulator(texts=("0", " "))
    with pytest.raises(ValueError, match="image_size must be an integer >= 4, got 2"):
        GlyphSimulator(texts=("0",), image_size=2)
    with pytest.raises(ValueError, match="not a file"):
        GlyphSimulator(texts=("0",), fonts=["/nonexistent/font.ttf"])
    with pytest.raises(
        ValueError, match=r"GlyphPrior.scale must satisfy low <= high, got \(0.9, 0.5\)"
    ):
        GlyphPrior(scale=(0.9, 0.5))
    with pytest.raises(ValueError, match=r"GlyphPrior.ink must lie within"):
        GlyphPrior(ink=(0.5, 1.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        GlyphSimulator(texts=("0",), image_size=SIZE).image_size = 8


def test_variation_reflects_into_the_prior_range(sim):
    """Noise that leaves a parameter's range is reflected back (not clipped): after a large variation every
    scalar parameter is spread uniformly over its prior range, with no mass piled up on the bounds."""
    parents = sim.random(jax.random.key(30), 0, 2000)
    children = _np(sim.variation(jax.random.key(31), parents, 0, 50.0))
    for field in SCALAR_FIELDS:
        low, high = getattr(sim.prior, field)
        if low == high:
            continue
        value = np.asarray(getattr(children, field), np.float64)
        assert np.mean((value <= low + 1e-6) | (value >= high - 1e-6)) < 0.01, field
        assert scipy.stats.kstest((value - low) / (high - low), "uniform").pvalue > 1e-3, field


def test_random_digits_transfer_to_real_digits():
    """Quality sanity check: a classifier trained on random samples only, tested on sklearn's real digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    sim = GlyphSimulator(image_size=32)
    features, labels = [], []
    for label in range(10):
        images = np.asarray(sim.to_images(sim.random(jax.random.key(label), label, 200)))[..., 0]
        features.append(images.reshape(200, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(200, 64) * 16)
        labels += [label] * 200
    with threadpool_limits(limits=1):  # BLAS threads spinning against XLA's make lbfgs 100x slower
        classifier = LogisticRegression(max_iter=1000).fit(np.concatenate(features), labels)
    digits = load_digits()
    assert classifier.score(digits.data, digits.target) > 0.3  # chance is 0.1


def test_batch_sizes_share_compilations_and_rows_do_not_depend_on_padding(sim):
    """Sizes in one bucket (here 193..224) compile once; a sample's image does not depend on the batch."""
    assert [
        bucket_size(n, per_octave=4, exact_up_to=16) for n in (1, 16, 17, 193, 224, 225, 1601)
    ] == [
        1,
        16,
        20,
        224,
        224,
        256,
        1792,
    ]
    base = _np(sim.random(jax.random.key(5), 1, 224))
    key = jax.random.key(6)
    full = np.asarray(sim.to_images(base))
    sim.variation(key, base, 1, 0.2)
    parts = {n: jax.tree_util.tree_map(lambda a, n=n: a[:n], base) for n in (193, 200, 211)}
    for n, part in parts.items():
        with count_compiles() as compiles:  # render and variation: no new compilation
            images = sim.to_images(part)
            varied = sim.variation(key, part, 1, 0.2)
        assert compiles.count == 0, n
        assert images.shape == (n, sim.image_size, sim.image_size, 1)
        np.testing.assert_array_equal(np.asarray(images), full[:n])
        assert varied.glyph.shape == (n,)
        assert sim.random(jax.random.key(7), 1, n).scale.shape == (n,)


def test_handwritten_forms_join_the_atlas_as_fonts():
    from pejax.generators.handwriting import draw_forms

    forms = draw_forms("9", 64)
    assert len(forms) == 5 and all(
        f.dtype == bool and f.shape == (64, 64) and f.any() for f in forms
    )
    assert draw_forms("A", 64) == [] and draw_forms("12", 64) == []
    plain = GlyphSimulator(texts=("9", "A"), image_size=16)
    hand = GlyphSimulator(texts=("9", "A"), image_size=16, handwriting=True)
    assert hand.fonts_for(0) == (
        *plain.fonts_for(0),
        "handwriting:9:0",
        "handwriting:9:1",
        "handwriting:9:2",
        "handwriting:9:3",
        "handwriting:9:4",
    )
    assert hand.fonts_for(1) == plain.fonts_for(1)  # not a digit: fonts only
    # The straight-stemmed 9 (form 0) inks the lower right, where a font's curled tail does not reach.
    first = hand.num_glyphs - len(hand.fonts_for(1)) - 5
    base = hand.random(jax.random.key(0), 0, 4)
    upright = base._replace(
        glyph=jnp.full((4,), first, jnp.int32),
        scale=jnp.full((4,), 0.9),
        aspect=jnp.zeros(4),
        rotation=jnp.zeros(4),
        shear=jnp.zeros(4),
        shift_x=jnp.zeros(4),
        shift_y=jnp.zeros(4),
        warp=jnp.zeros_like(base.warp),
    )
    image = np.asarray(hand.to_images(upright))[0, :, :, 0]
    assert image[12:, 9:12].mean() > 0.3 and image[12:, 2:6].mean() < 0.1
    with pytest.raises(TypeError, match="handwriting must be True or False"):
        GlyphSimulator(texts=("9",), handwriting="yes")
