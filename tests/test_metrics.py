"""Tests for pejax.metrics."""

from __future__ import annotations

import doctest

import jax
import numpy as np
import pytest
import scipy.linalg

from pejax import metrics
from pejax.data import load_digits_split
from pejax.metrics import downstream_accuracy
from pejax.metrics import frechet_distance


def _reference_fd(x, y):
    """FID formula with scipy.linalg.sqrtm, all in NumPy float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = np.atleast_2d(np.cov(x, rowvar=False))
    s2 = np.atleast_2d(np.cov(y, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _correlated(rng, n, d, scale=1.0):
    mix = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_docstring_examples():
    result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(("n1", "n2", "d"), [(37, 53, 5), (200, 101, 17), (64, 64, 1), (90, 13, 3)])
def test_frechet_matches_scipy_reference(n1, n2, d):
    rng = np.random.default_rng(n1 + n2 + d)
    x = _correlated(rng, n1, d)
    y = _correlated(rng, n2, d, scale=0.5)
    expected = _reference_fd(x, y)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_identical_sets_is_zero():
    rng = np.random.default_rng(1)
    x = _correlated(rng, 50, 12)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x) >= 0.0


def test_frechet_symmetric():
    rng = np.random.default_rng(2)
    x, y = _correlated(rng, 41, 9), _correlated(rng, 77, 9, scale=2.0)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-10)


def test_frechet_mean_shift_only():
    rng = np.random.default_rng(3)
    x = _correlated(rng, 30, 4)
    shift = np.array([1.0, -2.0, 0.5, 3.0])
    assert frechet_distance(x, x + shift) == pytest.approx(np.sum(shift**2), rel=1e-9)


def test_frechet_singular_covariance_fewer_samples_than_dims():
    rng = np.random.default_rng(4)
    x, y = rng.uniform(size=(6, 30)), rng.uniform(size=(9, 30))
    fd = frechet_distance(x, y)
    assert np.isfinite(fd)
    assert fd > 0.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize(("n1", "n2", "d"), [(6, 9, 30), (3, 40, 50), (12, 12, 12), (25, 4, 2048)])
def test_frechet_few_samples_matches_eigenvalue_reference(n1, n2, d):
    # n1 * n2 <= d^2: the singular-value path. Reference: tr sqrt(S1 S2) as the sum of the square roots of
    # the eigenvalues of S1 S2 (real, >= 0 up to round-off), in NumPy float64; S1 S2 has rank at most
    # r = min(n1, n2) - 1, so only its r largest eigenvalues count (the square roots of the round-off
    # eigenvalues of the others would add about 1e-6 each).
    rng = np.random.default_rng(n1 * n2 + d)
    x = rng.normal(size=(n1, d)) * rng.uniform(0.5, 2.0, d)
    y = rng.normal(size=(n2, d)) + 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.sort(np.linalg.eigvals(s1 @ s2).real)[::-1][: min(n1, n2, d + 1) - 1]
    tr = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    mean = np.sum((x.mean(0) - y.mean(0)) ** 2)
    expected = mean + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-8)


def test_frechet_float64_regardless_of_input_dtype_and_global_flag():
    rng = np.random.default_rng(5)
    x = _correlated(rng, 60, 6).astype(np.float32)
    y = _correlated(rng, 70, 6).astype(np.float32)
    flag = jax.config.jax_enable_x64
    # float32 inputs are promoted exactly, so the result equals the float64 reference on them.
    assert frechet_distance(x, y) == pytest.approx(_reference_fd(x, y), rel=1e-9)
    assert jax.config.jax_enable_x64 == flag
    assert isinstance(frechet_distance(x, y), float)
    # Integer embeddings are accepted too.
    xi = rng.integers(0, 5, size=(20, 3))
    assert frechet_distance(xi, xi + 1) == pytest.approx(3.0, rel=1e-9)


@pytest.mark.parametrize(
    ("x", "y", "error", "match"),
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), ValueError, r"same embedding dimension"),
        (np.zeros((1, 3)), np.zeros((5, 3)), ValueError, r"x needs at least 2 samples"),
        (np.zeros((5, 3)), np.zeros((1, 3)), ValueError, r"y needs at least 2 samples"),
        (np.zeros(5), np.zeros((5, 1)), ValueError, r"x must be a 2-D array"),
        (np.zeros((5, 3)), np.zeros((5, 0)), ValueError, r"y must have at least one dim"),
        (np.zeros((5, 3), bool), np.zeros((5, 3)), TypeError, r"real numeric dtype"),
    ],
)
def test_frechet_errors(x, y, error, match):
    with pytest.raises(error, match=match):
        frechet_distance(x, y)


def test_frechet_nan():
    x = np.random.default_rng(6).normal(size=(10, 3))
    y = x.copy()
    y[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or Inf .*first in row 4"):
        frechet_distance(x, y)


def test_downstream_accuracy_real_digits(digits):
    acc = downstream_accuracy(
        digits.train_images, digits.train_labels, digits.test_images, digits.test_labels
    )
    assert 0.93 < acc <= 1.0


def test_downstream_accuracy_resizes_to_size(digits):
    # Nearest-neighbour 2x upsampling is undone exactly by 2x2 area averaging.
    train = digits.train_images[:300]
    big = np.repeat(np.repeat(train, 2, axis=1), 2, axis=2)
    test_x, test_y = digits.test_images[:100], digits.test_labels[:100]
    y = digits.train_labels[:300]
    assert downstream_accuracy(big, y, test_x, test_y) == downstream_accuracy(
        train, y, test_x, test_y
    )


def test_downstream_accuracy_single_class_warns_and_scores_constant(digits):
    train = digits.train_images[:20]
    labels = np.full(20, 3)
    with pytest.warns(UserWarning, match=r"single class \(3\)"):
        acc = downstream_accuracy(train, labels, digits.test_images, digits.test_labels)
    assert acc == pytest.approx(np.mean(digits.test_labels == 3))


def test_downstream_accuracy_errors(digits):
    x, y = digits.train_images[:30], digits.train_labels[:30]
    with pytest.raises(TypeError, match=r"train_labels must be integer"):
        downstream_accuracy(x, y.astype(np.float32), x, y)
    with pytest.raises(ValueError, match=r"test_labels must have shape \(30,\)"):
        downstream_accuracy(x, y, x, y[:10])
    with pytest.raises(ValueError, match=r"same number of channels"):
        downstream_accuracy(np.repeat(x, 3, axis=-1), y, x, y)
    with pytest.raises(ValueError, match=r"value_scale must be > 0"):
        downstream_accuracy(x, y, x, y, value_scale=0.0)
    with pytest.raises(ValueError, match=r"test_images must be a 4-D"):
        downstream_accuracy(x, y, x[..., 0], y)
    with pytest.raises(TypeError, match=r"size must be a pair"):
        downstream_accuracy(x, y, x, y, size=8)


def test_downstream_accuracy_uses_c(digits):
    from sklearn.linear_model import LogisticRegression

    x = digits.train_images.reshape(len(digits.train_images), -1) * 16.0
    xt = digits.test_images.reshape(len(digits.test_images), -1) * 16.0
    for c in (0.01, 1.0):
        direct = LogisticRegression(C=c, max_iter=1000).fit(x, digits.train_labels)
        got = downstream_accuracy(
            digits.train_images, digits.train_labels, digits.test_images, digits.test_labels, C=c
        )
        # float32 resizing against float64 here: at most a couple of the 450 test images may differ
        assert got == pytest.approx(direct.score(xt, digits.test_labels), abs=2 / 450)
    with pytest.raises(ValueError, match=r"C must be > 0"):
        downstream_accuracy(digits.train_images, digits.train_labels, xt, digits.test_labels, C=0)


def test_choose_classifier_c_on_digits_matches_cross_validation(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from pejax.metrics import choose_classifier_c

    best, scores = choose_classifier_c(
        digits.train_images, digits.train_labels, grid=(1.0, 0.01, 1e-4)
    )
    assert best == 0.01 and sorted(scores) == [1e-4, 0.01, 1.0]
    x = digits.train_images.reshape(len(digits.train_images), -1) * 16.0
    for c in (0.01, 1e-4):
        cv = cross_val_score(LogisticRegression(C=c, max_iter=5000), x, digits.train_labels, cv=5)
        assert scores[c] == pytest.approx(cv.mean(), abs=1e-3)


def test_choose_classifier_c_errors(digits):
    from pejax.metrics import choose_classifier_c

    x, y = digits.train_images[:40], digits.train_labels[:40]
    with pytest.raises(ValueError, match=r"folds must be an integer >= 2"):
        choose_classifier_c(x, y, folds=1)
    with pytest.raises(ValueError, match=r"grid must hold at least one"):
        choose_classifier_c(x, y, grid=())
    with pytest.raises(ValueError, match=r"grid\[i\] must be > 0"):
        choose_classifier_c(x, y, grid=(0.0,))
    with pytest.raises(ValueError, match=r"at least 2 classes with >= folds=5"):
        choose_classifier_c(x[:12], y[:12])
