"""The noise mechanisms on the vote histogram, and the post-processing that follows them.

``release_lattice_votes`` is what a PE run releases: the vote histogram on its integer lattice plus exact
discrete Gaussian noise drawn with a secret :class:`pejax.secure_noise.NoiseKey` (see that module for why). Its
output takes only lattice values, so no floating-point support can leak. ``add_gaussian_noise`` (continuous,
float32, keyed by a ``jax.random`` key) stays as a jit-friendly kernel for research and for the audit's fast
unit tests; it is not what runs release. ``threshold`` and ``select`` only post-process the noisy histogram
and cost no privacy.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pejax import _validate
from pejax.errors import PejaxWarning as PejaxWarning
from pejax.secure_noise import NoiseKey
from pejax.secure_noise import discrete_gaussian_noise
from pejax.votes import HISTOGRAM_SENSITIVITY
from pejax.votes import LatticeVotes

SELECTION_MODES = ("sample", "rank")


class AllZeroHistogramWarning(PejaxWarning):
    """Every bin of a thresholded histogram was zero, so selection fell back to uniform."""


class Selection(NamedTuple):
    """Result of :func:`select_parents`.

    Attributes:
      indices: (num_samples,) int32 indices of the selected bins.
      uniform_fallback: scalar bool, True when every bin was <= 0 and the selection was uniform instead.
    """

    indices: jax.Array
    uniform_fallback: jax.Array


def _histogram(name: str, histogram) -> jax.Array:
    h = histogram if isinstance(histogram, jax.Array) else _validate.to_device(histogram)
    if h.ndim != 1 or h.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of bins, got shape {tuple(h.shape)}."
        )
    if not jnp.issubdtype(h.dtype, jnp.floating):
        h = h.astype(jnp.float32)
    finite = np.isfinite(np.asarray(h)).all() if _validate.on_host(h) else jnp.isfinite(h).all()
    if not _validate.is_traced(h) and not bool(finite):
        raise ValueError(f"{name} contains NaN or Inf; a vote histogram must be finite.")
    return h


@jax.jit
def _noise(key, histogram, std):
    noise = jax.random.normal(key, histogram.shape, jnp.float32)
    return histogram.astype(jnp.float32) + std * noise


def add_gaussian_noise(
    key: jax.Array,
    histogram: jax.Array,
    *,
    noise_multiplier: float,
    sensitivity: float = HISTOGRAM_SENSITIVITY,
) -> jax.Array:
    """Adds i.i.d. Gaussian noise of standard deviation ``noise_multiplier * sensitivity`` to every bin.

    Args:
      key: a ``jax.random`` key. Never reuse it for another release.
      histogram: (m,) float vote histogram.
      noise_multiplier: noise standard deviation in units of the sensitivity, >= 0 (0 means no privacy).
      sensitivity: L2 sensitivity of ``histogram`` (1 for :func:`pejax.vote_histogram`).

    Returns:
      (m,) float32 noisy histogram.

    Example:
      >>> import jax
      >>> h = add_gaussian_noise(jax.random.key(0), jax.numpy.zeros(3), noise_multiplier=2.0)
      >>> h.shape
      (3,)
    """
    h = _histogram("histogram", histogram)
    nm = _validate.finite_float("noise_multiplier", noise_multiplier, minimum=0.0)
    sens = _validate.finite_float("sensitivity", sensitivity, minimum=0.0, strict=True)
    return _noise(key, h, jnp.float32(nm * sens))


def add_discrete_gaussian_noise(key: NoiseKey, counts, *, sigma: float) -> np.ndarray:
    """Adds exact discrete Gaussian noise ``N_Z(0, sigma^2)`` to every entry of an integer vector.

    Args:
      key: the release's secret :class:`pejax.secure_noise.NoiseKey` (one per release; never reused).
      counts: (m,) integer array (e.g. vote counts, class counts).
      sigma: noise scale in the counts' units, >= 0 (0: no noise, no privacy).

    Returns:
      (m,) int64 noisy counts.

    Example:
      >>> from pejax.secure_noise import NoiseKey
      >>> add_discrete_gaussian_noise(NoiseKey.from_seed(0), np.array([5, 0]), sigma=0.0).tolist()
      [5, 0]
    """
    c = np.asarray(counts)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise TypeError(
            f"counts must be a 1-D integer array (the discrete Gaussian adds integer noise to integers), "
            f"got {c.dtype} {c.shape}. Use pejax.votes.lattice_vote_histogram for vote counts."
        )
    noise = discrete_gaussian_noise(key, sigma=sigma, size=c.shape[0])
    return c.astype(np.int64) + noise


def release_lattice_votes(
    key: NoiseKey, votes: LatticeVotes, *, noise_multiplier: float
) -> np.ndarray:
    """The PE release: lattice votes plus discrete Gaussian noise, in vote units.

    Noise has scale ``noise_multiplier * votes.l2_sensitivity`` lattice units, i.e. ``noise_multiplier`` in
    vote units (the histogram's sensitivity is 1 there). The returned values are ``integer * votes.scale``.

    Args:
      key: the release's secret noise key.
      votes: :func:`pejax.votes.lattice_vote_histogram` output.
      noise_multiplier: sigma >= 0 in units of the histogram's sensitivity.

    Returns:
      (m,) float64 noisy histogram (exact lattice points: ``noisy_counts * scale``).
    """
    nm = _validate.finite_float("noise_multiplier", noise_multiplier, minimum=0.0)
    noisy = add_discrete_gaussian_noise(key, votes.counts, sigma=nm * votes.l2_sensitivity)
    return noisy.astype(np.float64) * votes.scale


@jax.jit
def _threshold(histogram, t):
    return jnp.maximum(histogram - t, 0.0)


def threshold(histogram: jax.Array, *, threshold: float) -> jax.Array:
    """Returns ``max(histogram - threshold, 0)`` bin by bin.

    Args:
      histogram: (m,) float histogram (usually noisy).
      threshold: a finite number, in vote units (e.g. a multiple of the noise standard deviation).

    Returns:
      (m,) float32 array, non-negative.

    Example:
      >>> threshold(jax.numpy.array([3.0, 0.5, -1.0]), threshold=1.0).tolist()
      [2.0, 0.0, 0.0]
    """
    h = _histogram("histogram", histogram)
    t = _validate.finite_float("threshold", threshold)
    return _threshold(h.astype(jnp.float32), jnp.float32(t))


@functools.partial(jax.jit, static_argnames=("num_samples", "mode"))
def _select(key, histogram, *, num_samples, mode):
    h = jnp.maximum(histogram.astype(jnp.float32), 0.0)
    all_zero = jnp.all(h <= 0)
    if mode == "rank":
        # top_k returns the lowest index first among equal values.
        _, idx = lax.top_k(h, num_samples)
        return Selection(idx.astype(jnp.int32), all_zero)
    weights = jnp.where(all_zero, jnp.ones_like(h), h)
    logits = jnp.log(weights)  # log(0) = -inf: that bin is never drawn
    idx = jax.random.categorical(key, logits, shape=(num_samples,))
    return Selection(idx.astype(jnp.int32), all_zero)


def select_parents(
    key: jax.Array, histogram: jax.Array, *, num_samples: int, mode: str = "sample"
) -> Selection:
    """Selects parent indices from a (thresholded) histogram and reports whether it fell back to uniform.

    Args:
      key: a ``jax.random`` key (unused by ``mode="rank"``).
      histogram: (m,) non-negative float histogram; negative bins count as 0.
      num_samples: number of indices to return (``mode="rank"``: at most m).
      mode: ``"sample"``: with replacement, with probability proportional to the histogram, uniform when every
        bin is 0; ``"rank"``: the ``num_samples`` largest bins, ties to the lowest index.

    Returns:
      ``Selection(indices, uniform_fallback)``.
    """
    h = _histogram("histogram", histogram)
    _validate.one_of("mode", mode, SELECTION_MODES)
    n = _validate.positive_int("num_samples", num_samples)
    if mode == "rank" and n > h.shape[0]:
        raise ValueError(
            f"mode='rank' selects distinct bins, so num_samples ({n}) must be <= the number of bins "
            f"({h.shape[0]}). Use mode='sample' or a smaller num_samples."
        )
    return _select(key, h, num_samples=n, mode=mode)


def select(
    key: jax.Array, histogram: jax.Array, *, num_samples: int, mode: str = "sample"
) -> jax.Array:
    """Selects parent indices from a (thresholded) histogram; see :func:`select_parents`.

    When every bin is zero, ``mode="sample"`` draws uniformly instead of producing NaN and emits an
    :class:`AllZeroHistogramWarning` (use :func:`select_parents` to get the flag as a value instead).

    Returns:
      (num_samples,) int32 indices.

    Example:
      >>> import jax
      >>> select(jax.random.key(0), jax.numpy.array([0.0, 5.0, 0.0]), num_samples=4).tolist()
      [1, 1, 1, 1]
    """
    selection = select_parents(key, histogram, num_samples=num_samples, mode=mode)
    if not _validate.is_traced(selection.uniform_fallback) and bool(selection.uniform_fallback):
        if mode == "sample":
            warnings.warn(
                "every bin of the histogram is zero (nothing survived the threshold); parents were drawn "
                "uniformly. Lower the threshold or the number of synthetic samples per class.",
                AllZeroHistogramWarning,
                stacklevel=2,
            )
    return selection.indices


__all__ = [
    "SELECTION_MODES",
    "AllZeroHistogramWarning",
    "PejaxWarning",
    "Selection",
    "add_discrete_gaussian_noise",
    "add_gaussian_noise",
    "release_lattice_votes",
    "select",
    "select_parents",
    "threshold",
]
