"""Tests for pejax.data."""

from __future__ import annotations

import collections
import doctest

import numpy as np
import pytest

pytest.importorskip("PIL", reason="needs pejax[demo]")
pytest.importorskip("sklearn", reason="needs pejax[demo]")

from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pejax import data
from pejax.data import load_digits_split
from pejax.data import load_image_folder
from pejax.data import load_npz


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_docstring_examples():
    result = doctest.testmod(data, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# ----------------------------------------------------------------------------------- digits


def test_digits_split_shapes_and_dtypes(split):
    assert split.train_images.shape == (1347, 8, 8, 1)
    assert split.test_images.shape == (450, 8, 8, 1)
    assert split.train_images.dtype == np.float32 and split.test_images.dtype == np.float32
    assert split.train_labels.dtype == np.int32 and split.test_labels.dtype == np.int32
    assert split.train_labels.shape == (1347,) and split.test_labels.shape == (450,)
    for images in (split.train_images, split.test_images):
        assert images.min() == 0.0 and images.max() == 1.0


def test_digits_split_matches_sklearn_exactly(split):
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=0
    )
    np.testing.assert_array_equal(split.train_images.reshape(-1, 64) * 16, x_tr)
    np.testing.assert_array_equal(split.test_images.reshape(-1, 64) * 16, x_te)
    np.testing.assert_array_equal(split.train_labels, y_tr)
    np.testing.assert_array_equal(split.test_labels, y_te)


def test_digits_split_is_stratified(split):
    total = collections.Counter(load_digits().target.tolist())
    train = collections.Counter(split.train_labels.tolist())
    test = collections.Counter(split.test_labels.tolist())
    assert sorted(train) == sorted(test) == list(range(10))
    for label, count in total.items():
        assert train[label] + test[label] == count
        # Stratified: each class's test share is within one image of 25%.
        assert abs(test[label] - 0.25 * count) <= 1


def test_digits_split_other_arguments():
    s = load_digits_split(test_size=100, random_state=3)
    assert s.test_images.shape[0] == 100 and s.train_images.shape[0] == 1697
    other = load_digits_split(test_size=100, random_state=4)
    assert not np.array_equal(s.test_labels, other.test_labels)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_size": 0.0}, ValueError, r"strictly between 0 and 1"),
        ({"test_size": 1.5}, ValueError, r"strictly between 0 and 1"),
        ({"test_size": 5}, ValueError, r"\[10, 1787\]"),
        ({"test_size": "0.25"}, TypeError, r"test_size must be"),
        ({"test_size": True}, TypeError, r"test_size must be"),
        ({"random_state": None}, TypeError, r"random_state must be an int"),
    ],
)
def test_digits_split_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_digits_split(**kwargs)


# -------------------------------------------------------------------------------------- npz


def test_npz_round_trip_uint8_grey(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 7), dtype=np.uint8)
    labels = np.array([0, 1, 1, 4, 2], np.int64)
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=labels)
    out = load_npz(path)
    assert out.images.shape == (5, 6, 7, 1) and out.images.dtype == np.float32
    assert out.labels.dtype == np.int32
    np.testing.assert_array_equal(np.round(out.images[..., 0] * 255).astype(np.uint8), images)
    np.testing.assert_array_equal(out.labels, labels)


def test_npz_round_trip_float_rgb_and_custom_keys(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(4, 3, 5, 3))
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0.0, 1.0
    labels = np.arange(4, dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=images, y=labels)
    out = load_npz(str(path), images_key="x", labels_key="y")
    np.testing.assert_array_equal(out.images, images.astype(np.float32))
    np.testing.assert_array_equal(out.labels, labels)


def _save(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


_IMG = np.zeros((3, 4, 4), np.uint8)
_LAB = np.array([0, 1, 2])


@pytest.mark.parametrize(
    ("arrays", "error", "match"),
    [
        ({"images": _IMG, "labels": _LAB[:2]}, ValueError, r"2 labels but there are 3 images"),
        ({"images": _IMG, "labels": _LAB * 1.0}, TypeError, r"must be integer class ids"),
        ({"images": _IMG, "labels": _LAB > 0}, TypeError, r"must be integer class ids"),
        ({"images": _IMG, "labels": _LAB - 1}, ValueError, r">= 0, got minimum -1"),
        ({"images": _IMG, "labels": _LAB[:, None]}, ValueError, r"must be 1-D"),
        ({"images": np.zeros((3, 16), np.uint8), "labels": _LAB}, ValueError, r"\(N, H, W\)"),
        ({"images": np.zeros((3, 4, 4, 4), np.uint8), "labels": _LAB}, ValueError, r"alpha"),
        ({"images": np.zeros((0, 4, 4), np.uint8), "labels": _LAB[:0]}, ValueError, r"no images"),
        ({"images": _IMG.astype(np.int16), "labels": _LAB}, TypeError, r"uint8 .* or floating"),
        ({"images": np.full((3, 4, 4), 255.0), "labels": _LAB}, ValueError, r"divide by 255"),
        ({"images": np.full((3, 4, 4), -0.1), "labels": _LAB}, ValueError, r"\[0, 1\], got"),
    ],
)
def test_npz_errors(tmp_path, arrays, error, match):
    with pytest.raises(error, match=match):
        load_npz(_save(tmp_path, **arrays))


def test_npz_nan(tmp_path):
    images = np.zeros((3, 4, 4), np.float32)
    images[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf .*first in image 1"):
        load_npz(_save(tmp_path, images=images, labels=_LAB))


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_npz(tmp_path / "nope.npz")


def test_npz_missing_key_lists_keys(tmp_path):
    path = _save(tmp_path, x=_IMG, labels=_LAB)
    with pytest.raises(KeyError, match=r"'images'.*keys present: \['labels', 'x'\]"):
        load_npz(path)
    with pytest.raises(KeyError, match=r"'targets' \(labels_key\)"):
        load_npz(path, images_key="x", labels_key="targets")


def test_npz_never_unpickles(tmp_path):
    path = _save(tmp_path, images=np.array([{"a": 1}], dtype=object), labels=_LAB)
    with pytest.raises(ValueError, match=r"never unpickled"):
        load_npz(path)


def test_npz_rejects_npy_and_garbage(tmp_path):
    npy = tmp_path / "a.npy"
    np.save(npy, _IMG)
    with pytest.raises(ValueError, match=r"single \.npy array"):
        load_npz(npy)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match=r"could not be read as an \.npz"):
        load_npz(junk)


# ----------------------------------------------------------------------------------- folder


def _write(path, mode, size, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_grey(tmp_path):
    _write(tmp_path / "b" / "1.png", "L", (3, 2), 255)
    _write(tmp_path / "b" / "0.png", "L", (3, 2), 0)
    _write(tmp_path / "a" / "x.PNG", "L", (3, 2), 51)
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"ignored")
    (tmp_path / ".cache").mkdir()
    out = load_image_folder(tmp_path)
    assert out.class_names == ("a", "b")
    assert out.images.shape == (3, 2, 3, 1) and out.images.dtype == np.float32
    assert out.labels.dtype == np.int32
    np.testing.assert_array_equal(out.labels, [0, 1, 1])
    # Files within a class in sorted order: b/0.png (black) before b/1.png (white).
    np.testing.assert_allclose(out.images[:, 0, 0, 0], [0.2, 0.0, 1.0], atol=1e-7)


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    _write(tmp_path / "grey" / "0.png", "L", (4, 4), 128)
    _write(tmp_path / "red" / "0.png", "RGBA", (4, 4), (255, 0, 0, 10))
    out = load_image_folder(tmp_path)
    assert out.images.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(out.images[0, 0, 0], [128 / 255] * 3, atol=1e-7)
    np.testing.assert_allclose(out.images[1, 0, 0], [1.0, 0.0, 0.0])  # alpha dropped


def test_image_folder_mixed_sizes(tmp_path):
    _write(tmp_path / "a" / "0.png", "L", (4, 4), 0)
    _write(tmp_path / "b" / "big.png", "L", (5, 4), 0)
    with pytest.raises(ValueError, match=r"0\.png.* 4 x 4 .*big\.png.* 5 x 4\. Resize"):
        load_image_folder(tmp_path)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a folder"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no class subfolders"):
        load_image_folder(tmp_path)
    _write(tmp_path / "loose.png", "L", (2, 2), 0)
    with pytest.raises(ValueError, match=r"1 image files directly"):
        load_image_folder(tmp_path)
    _write(tmp_path / "a" / "0.png", "L", (2, 2), 0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*b' holds no image files"):
        load_image_folder(tmp_path)


def test_image_folder_unreadable_and_16_bit(tmp_path):
    _write(tmp_path / "a" / "0.png", "L", (2, 2), 0)
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Pillow cannot read .*1\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "a" / "1.png").unlink()
    Image.new("I;16", (2, 2), 1000).save(tmp_path / "a" / "2.png")
    with pytest.raises(ValueError, match=r"mode 'I;16'"):
        load_image_folder(tmp_path)
