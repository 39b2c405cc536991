"""The exact discrete Gaussian sampler and the secret noise key."""

import pickle

import jax
import numpy as np
import pytest
from scipy import stats

from pejax.mechanism import add_discrete_gaussian_noise
from pejax.mechanism import release_lattice_votes
from pejax.secure_noise import NoiseKey
from pejax.secure_noise import discrete_gaussian_noise
from pejax.secure_noise import discrete_gaussian_pmf
from pejax.votes import lattice_vote_histogram


def _exact_moments(sigma):
    xs = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41)
    p = discrete_gaussian_pmf(xs, sigma=sigma)
    return xs, p, float((p * xs**2).sum())


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.11, 17.5])
def test_sampler_matches_the_exact_pmf(sigma):
    """Chi-square goodness of fit against the exact pmf, and the variance against its exact value."""
    draws = discrete_gaussian_noise(NoiseKey.from_seed(int(sigma * 100)), sigma=sigma, size=20_000)
    assert draws.dtype == np.int64
    xs, p, var = _exact_moments(sigma)
    # Bins with an expected count >= 5; the tails pooled into the two outer bins.
    expected = p * draws.size
    keep = expected >= 5
    lo, hi = xs[keep].min(), xs[keep].max()
    clipped = np.clip(draws, lo, hi)
    observed = np.bincount(clipped - lo, minlength=hi - lo + 1)
    exp = np.array([p[xs <= lo].sum(), *p[(xs > lo) & (xs < hi)], p[xs >= hi].sum()])
    exp = exp * draws.size
    assert observed.sum() == draws.size and abs(exp.sum() - draws.size) < 1e-6 * draws.size
    _, pvalue = stats.chisquare(observed, exp)
    assert pvalue > 1e-3, pvalue
    # The sample variance is within 5 standard errors of the exact variance (not sigma^2 for small sigma).
    se = np.sqrt((np.mean(draws.astype(float) ** 4) - var**2) / draws.size)
    assert abs(np.var(draws) - var) < 5 * se
    assert abs(draws.mean()) < 5 * np.sqrt(var / draws.size)


def test_sampler_distinguishes_a_wrong_sigma():
    """The goodness-of-fit test above has power: draws with sigma 3 fail against the pmf with sigma 3.3."""
    draws = discrete_gaussian_noise(NoiseKey.from_seed(1), sigma=3.0, size=20_000)
    xs = np.arange(-15, 16)
    p = discrete_gaussian_pmf(xs, sigma=3.3)
    observed = np.bincount(np.clip(draws, -15, 15) + 15, minlength=31)
    exp = p / p.sum() * draws.size
    assert stats.chisquare(observed, exp)[1] < 1e-6


def test_same_key_same_noise_and_fold_in_separates():
    k = NoiseKey.from_seed(5)
    a = discrete_gaussian_noise(k, sigma=2.0, size=50)
    np.testing.assert_array_equal(
        a, discrete_gaussian_noise(NoiseKey.from_seed(5), sigma=2.0, size=50)
    )
    assert not np.array_equal(a, discrete_gaussian_noise(k.fold_in(1), sigma=2.0, size=50))
    assert k.fold_in(1, 2) != k.fold_in(2, 1)
    assert NoiseKey.generate() != NoiseKey.generate()


def test_key_is_secret_in_every_printed_form():
    k = NoiseKey.generate()
    secret = k.export_secret()
    for text in (repr(k), str(k), f"{k}", repr([k]), repr({"k": k})):
        assert secret not in text and "secret" in text
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(k)
    assert NoiseKey.import_secret(secret) == k
    assert NoiseKey.from_seed(3).reproducible and not k.reproducible
    assert "not secret" in repr(NoiseKey.from_seed(3))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match=r"never drawn from a jax\.random key"):
        discrete_gaussian_noise(jax.random.key(0), sigma=1.0, size=3)
    with pytest.raises(ValueError, match="sigma must be finite"):
        discrete_gaussian_noise(NoiseKey.from_seed(0), sigma=float("nan"), size=3)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        discrete_gaussian_noise(NoiseKey.from_seed(0), sigma=-1.0, size=3)
    with pytest.raises(ValueError, match="exactly 32 secret bytes"):
        NoiseKey(b"short")
    with pytest.raises(ValueError, match="malformed noise key"):
        NoiseKey.import_secret("zz")
    with pytest.raises(TypeError, match="1-D integer array"):
        add_discrete_gaussian_noise(NoiseKey.from_seed(0), np.array([0.5, 1.0]), sigma=1.0)
    np.testing.assert_array_equal(
        discrete_gaussian_noise(NoiseKey.from_seed(0), sigma=0.0, size=3), np.zeros(3)
    )


@pytest.mark.parametrize("k", [1, 3])
def test_released_histogram_lies_on_the_vote_lattice(k):
    """Every released value is an integer number of lattice steps (1/sqrt(k) votes)."""
    rng = np.random.default_rng(0)
    private = rng.normal(size=(41, 3)).astype(np.float32)
    synthetic = rng.normal(size=(9, 3)).astype(np.float32)
    votes = lattice_vote_histogram(private, synthetic, k=k)
    noisy = release_lattice_votes(NoiseKey.generate(), votes, noise_multiplier=2.5)
    steps = noisy * np.sqrt(k)
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-9)
    assert not np.allclose(noisy, votes.counts * votes.scale)  # noise was added
