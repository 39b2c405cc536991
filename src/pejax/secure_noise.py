"""Secret noise keys and exact discrete Gaussian noise on integer lattices.

Why not ``jax.random.normal``: a float32 Gaussian sample takes at most 2^23 distinct values, so the set of outputs
reachable from a count h and from h + 1 are largely disjoint, and one published noisy value can tell the two apart
with certainty (Mironov, "On significance of the least significant bits for differential privacy", CCS 2012).
pejax therefore releases vote counts through the discrete Gaussian mechanism instead: the released value is an
integer (a lattice point), the noise is an integer drawn *exactly* from the discrete Gaussian
``N_Z(0, sigma^2)`` with ``P[x] proportional to exp(-x^2 / (2 sigma^2))``, and the privacy analysis is that of
Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020): for neighbouring
integer vectors whose difference has L2 norm Delta it satisfies ``Delta^2 / (2 sigma^2)``-zCDP (their Theorem 14),
exactly the bound of the continuous Gaussian, and its exact privacy loss distribution is built by
``dp_accounting`` (``from_discrete_gaussian_mechanism``). OpenDP and Google's differential-privacy library take
the same route (integer or grid-snapped outputs with exact samplers).

The sampler is Algorithm 3 of Canonne, Kamath and Steinke (rejection from a discrete Laplace, Algorithm 2, with
Bernoulli(exp(-gamma)) trials, Algorithm 1), run in exact rational arithmetic (``fractions.Fraction``) on uniform
integers; no floating-point number enters a decision. OpenDP's exact sampler reads the operating system's entropy
directly and cannot be keyed, and a keyed sampler is what makes a resumed run bit-identical to an unbroken one,
so pejax runs the published algorithm itself on a keyed cryptographic bit stream: BLAKE2b in counter mode under a
256-bit :class:`NoiseKey`. It is tested against the exact probability mass function.

:class:`NoiseKey` is the run's *secret* key. By default it comes from the operating system's entropy
(``secrets``); it is never printed (its ``repr`` hides it), and it is kept only in checkpoints, which are private
artifacts. ``NoiseKey.from_seed`` makes a reproducible key for research; a run that uses one is not a
differentially private release (anyone who knows the seed can subtract the noise).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
from fractions import Fraction

import numpy as np

from pejax import _validate

_KEY_BYTES = 32
_MAX_SIGMA = 2.0**62
"""Largest lattice sigma accepted: the noise must fit in int64 (tails beyond 2^62 have probability 0 in practice
far below 1e-300 at this bound's sigma/2^1 ratio, since |noise| > 30 sigma has mass < 1e-195)."""


class NoiseKey:
    """A 256-bit secret key that drives the DP noise of a run (and nothing else).

    Construct with :meth:`generate` (fresh operating-system entropy: the default of every run) or
    :meth:`from_seed` (reproducible; **not** a differentially private release, see the module docstring).
    ``repr`` and ``str`` never show the key. :meth:`fold_in` derives independent child keys (HMAC-SHA256).

    Example:
      >>> k = NoiseKey.generate()
      >>> repr(k)
      'NoiseKey(<secret>)'
      >>> k.fold_in(3, 1) == k.fold_in(3, 1), k.fold_in(3, 1) == k.fold_in(1, 3)
      (True, False)
    """

    __slots__ = ("_secret", "reproducible")

    def __init__(self, secret: bytes, *, reproducible: bool = False):
        if not isinstance(secret, bytes | bytearray) or len(secret) != _KEY_BYTES:
            raise ValueError(
                f"a NoiseKey holds exactly {_KEY_BYTES} secret bytes; use NoiseKey.generate() for a fresh "
                "secret key or NoiseKey.from_seed(seed) for a reproducible (non-private) one."
            )
        self._secret = bytes(secret)
        self.reproducible = bool(reproducible)

    @classmethod
    def generate(cls) -> NoiseKey:
        """A fresh secret key from the operating system's entropy (``secrets.token_bytes``)."""
        return cls(secrets.token_bytes(_KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int) -> NoiseKey:
        """A reproducible key derived from an integer seed: the run's noise is then NOT secret.

        Use only for research on the algorithm (same seed, same noise); a run with such a key is not a
        differentially private release.
        """
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise TypeError(f"noise seed must be an integer, got {seed!r}.")
        digest = hashlib.sha256(
            b"pejax reproducible noise seed:" + str(int(seed)).encode()
        ).digest()
        return cls(digest, reproducible=True)

    def fold_in(self, *labels: int) -> NoiseKey:
        """A child key for ``labels`` (e.g. iteration and class); distinct labels give independent keys."""
        data = b"pejax fold_in:" + b"".join(struct.pack("<q", int(x)) for x in labels)
        child = hmac.new(self._secret, data, hashlib.sha256).digest()
        return NoiseKey(child, reproducible=self.reproducible)

    def digest(self, data: bytes) -> str:
        """Keyed digest (HMAC-SHA256, hex) of ``data``: it reveals nothing about ``data`` without the key."""
        return hmac.new(self._secret, b"pejax digest:" + bytes(data), hashlib.sha256).hexdigest()

    def export_secret(self) -> str:
        """The key as hex, for the run's private checkpoint only. Never print or publish it."""
        return self._secret.hex()

    @classmethod
    def import_secret(cls, text: str, *, reproducible: bool = False) -> NoiseKey:
        """Inverse of :meth:`export_secret`; raises ``ValueError`` on malformed input."""
        try:
            raw = bytes.fromhex(text)
        except (TypeError, ValueError) as e:
            raise ValueError("malformed noise key in checkpoint (expected 64 hex digits).") from e
        return cls(raw, reproducible=reproducible)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseKey) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self._secret)

    def __repr__(self) -> str:
        return (
            "NoiseKey(<reproducible from a seed: not secret>)"
            if self.reproducible
            else ("NoiseKey(<secret>)")
        )

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError(
            "a NoiseKey is not picklable (it would leak the secret); store export_secret() in a private "
            "checkpoint instead."
        )


class _BitStream:
    """Uniform random integers from BLAKE2b(key, counter): a cryptographic bit stream under a 256-bit key."""

    __slots__ = ("_buf", "_counter", "_key", "_pos")

    def __init__(self, key: NoiseKey):
        self._key = key._secret
        self._counter = 0
        self._buf = b""
        self._pos = 0

    def _bytes(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            fresh = []
            need = n - (len(self._buf) - self._pos)
            while need > 0:
                block = hashlib.blake2b(
                    self._counter.to_bytes(16, "little"), key=self._key, digest_size=64
                ).digest()
                self._counter += 1
                fresh.append(block)
                need -= 64
            self._buf = self._buf[self._pos :] + b"".join(fresh)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def bits(self, k: int) -> int:
        """A uniform integer in [0, 2^k)."""
        n = (k + 7) // 8
        return int.from_bytes(self._bytes(n), "little") >> (8 * n - k)

    def below(self, n: int) -> int:
        """A uniform integer in [0, n) (rejection sampling: exact)."""
        k = n.bit_length()
        while True:
            r = self.bits(k)
            if r < n:
                return r


def _bernoulli_exp_at_most_one(stream: _BitStream, gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for 0 <= gamma <= 1 (Canonne, Kamath, Steinke 2020, Algorithm 1)."""
    num, den = gamma.numerator, gamma.denominator
    k = 1
    while stream.below(den * k) < num:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _bernoulli_exp(stream: _BitStream, gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for gamma >= 0, exactly."""
    whole = math.floor(gamma)
    one = Fraction(1)
    for _ in range(whole):
        if not _bernoulli_exp_at_most_one(stream, one):
            return False
    return _bernoulli_exp_at_most_one(stream, gamma - whole)


def _discrete_laplace(stream: _BitStream, t: int) -> int:
    """P[x] proportional to exp(-|x| / t), for an integer t >= 1 (Algorithm 2)."""
    one = Fraction(1)
    while True:
        u = stream.below(t)
        if not _bernoulli_exp(stream, Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp_at_most_one(stream, one):
            v += 1
        x = u + t * v
        negative = stream.bits(1)
        if negative and x == 0:
            continue
        return -x if negative else x


def _discrete_gaussian(stream: _BitStream, sigma: Fraction, sigma_sq: Fraction, t: int) -> int:
    """One draw of N_Z(0, sigma^2) (Algorithm 3), with t = floor(sigma) + 1."""
    two_sigma_sq = 2 * sigma_sq
    shift = sigma_sq / t
    while True:
        y = _discrete_laplace(stream, t)
        if _bernoulli_exp(stream, (abs(y) - shift) ** 2 / two_sigma_sq):
            return y


def discrete_gaussian_noise(key: NoiseKey, *, sigma: float, size: int) -> np.ndarray:
    """``size`` independent exact draws of the discrete Gaussian ``N_Z(0, sigma^2)``.

    Args:
      key: the :class:`NoiseKey` of this release (derive one per release with :meth:`NoiseKey.fold_in`; never
        reuse a key for two releases).
      sigma: the distribution's scale parameter in lattice units, >= 0 (``sigma`` is taken as the exact binary
        rational of the float given; 0 returns zeros, i.e. no privacy).
      size: number of draws, >= 0.

    Returns:
      (size,) int64 array.

    Example:
      >>> noise = discrete_gaussian_noise(NoiseKey.from_seed(0), sigma=3.0, size=4)
      >>> noise.dtype, noise.shape
      (dtype('int64'), (4,))
    """
    if not isinstance(key, NoiseKey):
        raise TypeError(
            f"key must be a pejax NoiseKey (NoiseKey.generate() or NoiseKey.from_seed(seed)), got "
            f"{type(key).__name__}. DP noise is never drawn from a jax.random key, which is public."
        )
    s = _validate.finite_float("sigma", sigma, minimum=0.0)
    if s > _MAX_SIGMA:
        raise ValueError(
            f"sigma must be at most 2^62 lattice units so the noise fits int64, got {s:g}."
        )
    n = _validate.positive_int("size", size, minimum=0)
    out = np.zeros(n, np.int64)
    if s == 0 or n == 0:
        return out
    stream = _BitStream(key)
    frac = Fraction(s)
    sigma_sq = frac * frac
    t = math.floor(frac) + 1
    for i in range(n):
        out[i] = _discrete_gaussian(stream, frac, sigma_sq, t)
    return out


def discrete_gaussian_pmf(x, *, sigma: float) -> np.ndarray:
    """Exact-to-float64 probability mass of N_Z(0, sigma^2) at integers ``x`` (a reference for tests).

    The normaliser sums exp(-y^2 / (2 sigma^2)) over |y| <= 40 sigma + 40 (the rest is below 1e-300).
    """
    s = _validate.finite_float("sigma", sigma, minimum=0.0, strict=True)
    bound = int(40 * s) + 40
    ys = np.arange(-bound, bound + 1, dtype=np.float64)
    norm = np.exp(-(ys**2) / (2 * s * s)).sum()
    x = np.asarray(x, np.float64)
    return np.exp(-(x**2) / (2 * s * s)) / norm


__all__ = [
    "NoiseKey",
    "discrete_gaussian_noise",
    "discrete_gaussian_pmf",
]
