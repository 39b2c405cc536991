"""Size buckets: the padded sizes that compiled programs run at, so that nearby sizes share one compilation.

PE asks generators, embeddings and kernels for a different number of rows per class, per lookahead and per
iteration. Under ``jit`` every new leading size compiles new programs; rounding sizes up to a few buckets and
padding the extra rows (whose results are discarded) bounds the number of compilations at a small cost.
"""

from __future__ import annotations

import numbers

__all__ = ["bucket_size"]


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def bucket_size(
    n: int,
    *,
    per_octave: int = 1,
    minimum: int = 1,
    maximum: int | None = None,
    exact_up_to: int = 0,
) -> int:
    """The bucket that ``n`` rows are padded to.

    ``n`` is rounded up to one of ``per_octave`` evenly spaced sizes in each octave ``[2^k, 2^(k+1)]``: with
    ``per_octave=1`` to the next power of two (at most 2x the rows), with ``per_octave=4`` to a multiple of
    ``2^k / 4`` (less than 25% extra rows, twice as many buckets). Then:

    * ``1 <= n <= exact_up_to`` is returned as it is (small sizes are cheap to compile one by one);
    * the bucket is at least ``minimum`` (``n = 0`` gives ``minimum``);
    * the bucket is at most ``maximum`` when given: a caller cuts larger requests into batches of ``maximum``
      rows, so ``n >= maximum`` gives ``maximum``.

    Args:
      n: the number of rows, an integer >= 0.
      per_octave: buckets per octave, a power of two >= 1.
      minimum: the smallest bucket, >= 1.
      maximum: the largest bucket (``None``: no limit), >= 1.
      exact_up_to: sizes up to this one are not rounded, >= 0.

    Returns:
      The bucket, an int.

    Raises:
      ValueError: an argument is not an integer in its range, or ``per_octave`` is not a power of two.

    Example:
      >>> from pejax.buckets import bucket_size
      >>> [bucket_size(n) for n in (0, 1, 5, 8, 9)]
      [1, 1, 8, 8, 16]
      >>> [bucket_size(n, per_octave=4, exact_up_to=16) for n in (16, 17, 33, 100)]
      [16, 20, 40, 112]
      >>> [bucket_size(n, minimum=8, maximum=64) for n in (3, 20, 64, 1000)]
      [8, 32, 64, 64]
    """
    n = _int("n", n, 0)
    per_octave = _int("per_octave", per_octave, 1)
    if per_octave & (per_octave - 1):
        raise ValueError(f"per_octave must be a power of two (1, 2, 4, ...), got {per_octave}.")
    minimum = _int("minimum", minimum, 1)
    exact_up_to = _int("exact_up_to", exact_up_to, 0)
    if maximum is not None:
        maximum = _int("maximum", maximum, 1)
    if 1 <= n <= exact_up_to:
        return n
    m = max(n, 1)
    step = 1 << max(0, m.bit_length() - per_octave.bit_length())
    size = max(minimum, -(-m // step) * step)
    return size if maximum is None else min(maximum, size)
