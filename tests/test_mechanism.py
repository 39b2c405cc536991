import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import pejax


@pytest.mark.parametrize("jit", [False, True])
def test_noise_scale_kolmogorov_smirnov(jit):
    h = jnp.linspace(0.0, 50.0, 20000)
    fn = functools.partial(pejax.add_gaussian_noise, noise_multiplier=3.5)
    noisy = (jax.jit(fn) if jit else fn)(jax.random.key(7), h)
    z = (np.asarray(noisy) - np.asarray(h)) / 3.5
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # The test has power: the same draws mis-scaled by 10% are rejected.
    assert scipy.stats.kstest(z * 1.1, "norm").pvalue < 1e-3


def test_sensitivity_scales_noise():
    h = jnp.zeros(20000)
    z = np.asarray(
        pejax.add_gaussian_noise(jax.random.key(1), h, noise_multiplier=2.0, sensitivity=0.5)
    )
    assert np.std(z) == pytest.approx(1.0, rel=0.03)


def test_same_key_same_noise_different_key_different_noise():
    h = jnp.arange(100.0)
    a = pejax.add_gaussian_noise(jax.random.key(0), h, noise_multiplier=1.0)
    b = pejax.add_gaussian_noise(jax.random.key(0), h, noise_multiplier=1.0)
    c = pejax.add_gaussian_noise(jax.random.key(1), h, noise_multiplier=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_zero_noise_is_identity():
    h = jnp.arange(5.0)
    np.testing.assert_array_equal(
        pejax.add_gaussian_noise(jax.random.key(0), h, noise_multiplier=0.0), h
    )


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_noise_multiplier(bad):
    with pytest.raises(ValueError, match="noise_multiplier"):
        pejax.add_gaussian_noise(jax.random.key(0), jnp.zeros(3), noise_multiplier=bad)


def test_nan_histogram_rejected():
    with pytest.raises(ValueError, match="NaN or Inf"):
        pejax.add_gaussian_noise(jax.random.key(0), jnp.array([1.0, jnp.nan]), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="1-D"):
        pejax.threshold(jnp.zeros((2, 2)), threshold=1.0)


@pytest.mark.parametrize("jit", [False, True])
def test_threshold_matches_numpy(jit):
    h = np.random.default_rng(0).normal(size=1001).astype(np.float32) * 5
    fn = functools.partial(pejax.threshold, threshold=1.3)
    got = (jax.jit(fn) if jit else fn)(h)
    np.testing.assert_allclose(
        np.asarray(got), np.maximum(h.astype(np.float64) - 1.3, 0), atol=1e-6
    )


def test_threshold_rejects_nan():
    with pytest.raises(ValueError, match="threshold must be finite"):
        pejax.threshold(jnp.zeros(3), threshold=float("nan"))


def test_sample_mode_is_proportional():
    h = jnp.array([0.0, 1.0, 3.0, 0.0, 6.0])
    idx = np.asarray(pejax.select(jax.random.key(3), h, num_samples=50000))
    counts = np.bincount(idx, minlength=5)
    assert counts[0] == 0 and counts[3] == 0
    expected = np.array([1.0, 3.0, 6.0]) / 10 * 50000
    assert scipy.stats.chisquare(counts[[1, 2, 4]], expected).pvalue > 1e-3


def test_all_zero_falls_back_to_uniform_with_warning_and_flag():
    h = jnp.zeros(7)
    with pytest.warns(pejax.AllZeroHistogramWarning, match="uniformly"):
        idx = pejax.select(jax.random.key(0), h, num_samples=7000)
    counts = np.bincount(np.asarray(idx), minlength=7)
    assert np.isfinite(counts).all() and (counts > 800).all()
    sel = pejax.select_parents(jax.random.key(0), h, num_samples=10)
    assert bool(sel.uniform_fallback)
    sel = pejax.select_parents(jax.random.key(0), h.at[2].set(1.0), num_samples=10)
    assert not bool(sel.uniform_fallback)
    assert np.asarray(sel.indices).tolist() == [2] * 10


def test_no_warning_when_bins_survive():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pejax.select(jax.random.key(0), jnp.array([0.0, 1.0]), num_samples=3)


def test_rank_mode_takes_largest_ties_lowest_index():
    h = jnp.array([1.0, 5.0, 3.0, 5.0, 0.0, 3.0])
    idx = pejax.select(jax.random.key(0), h, num_samples=4, mode="rank")
    assert np.asarray(idx).tolist() == [1, 3, 2, 5]


def test_select_same_key_same_output():
    h = jnp.arange(10.0)
    a = pejax.select(jax.random.key(5), h, num_samples=20)
    b = pejax.select(jax.random.key(5), h, num_samples=20)
    c = pejax.select(jax.random.key(6), h, num_samples=20)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_select_under_jit():
    fn = jax.jit(functools.partial(pejax.select, num_samples=5))
    assert fn(jax.random.key(0), jnp.array([0.0, 2.0])).tolist() == [1] * 5


def test_select_errors():
    h = jnp.ones(3)
    with pytest.raises(ValueError, match="mode must be one of"):
        pejax.select(jax.random.key(0), h, num_samples=2, mode="top")
    with pytest.raises(ValueError, match="num_samples"):
        pejax.select(jax.random.key(0), h, num_samples=0)
    with pytest.raises(ValueError, match=r"num_samples \(4\) must be <= the number of bins"):
        pejax.select(jax.random.key(0), h, num_samples=4, mode="rank")
