import doctest

import pytest

from pejax import buckets
from pejax.buckets import bucket_size


def _next_pow2_ref(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


def _diffusion_ref(n: int, batch_size: int) -> int:
    """The diffusion sampler's rule before the helper: batch_size, or the next power of two (>= 8) below it."""
    if n >= batch_size:
        return batch_size
    return min(batch_size, max(8, _next_pow2_ref(n)))


def _glyphs_ref(n: int) -> int:
    """The glyph simulator's rule: exact up to 16, then the smallest of 4 evenly spaced sizes per octave."""
    if n <= 16:
        return n
    low = 1
    while low * 2 <= n:
        low *= 2
    candidates = [low + i * low // 4 for i in range(5)]
    return min(c for c in candidates if c >= n)


def _neighbors_ref(n: int) -> int:
    """The float32 re-check's rule: the next power of two, at least 8."""
    return max(8, _next_pow2_ref(max(n, 1)))


def test_doctests():
    result = doctest.testmod(buckets, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("n", [*range(0, 300), 511, 512, 513, 1023, 1601, 4097, 100_000])
def test_rules_match_the_three_former_copies(n):
    assert bucket_size(n, minimum=8) == _neighbors_ref(n)
    if n >= 1:  # the simulator never batches 0 rows; bucket_size gives `minimum` for 0
        assert bucket_size(n, per_octave=4, exact_up_to=16) == _glyphs_ref(n)
    else:
        assert bucket_size(n, per_octave=4, exact_up_to=16) == 1
    for batch_size in (1, 5, 8, 64, 100, 512):
        assert bucket_size(n, minimum=8, maximum=batch_size) == _diffusion_ref(n, batch_size)


@pytest.mark.parametrize("per_octave", [1, 2, 4, 8, 16])
def test_buckets_cover_and_bound_the_extra_rows(per_octave):
    seen = set()
    for n in range(1, 5000):
        size = bucket_size(n, per_octave=per_octave)
        assert n <= size < n * (1 + 1 / per_octave) + 1
        seen.add(size)
    # per_octave buckets per octave (13 octaves below 5000, plus the top one), not one per size.
    assert len(seen) <= per_octave * 14


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": -1}, r"n must be an integer >= 0, got -1"),
        ({"n": 2.0}, r"n must be an integer >= 0, got 2.0"),
        ({"n": True}, r"n must be an integer"),
        ({"n": 4, "per_octave": 3}, r"per_octave must be a power of two .* got 3"),
        ({"n": 4, "per_octave": 0}, r"per_octave must be an integer >= 1, got 0"),
        ({"n": 4, "minimum": 0}, r"minimum must be an integer >= 1, got 0"),
        ({"n": 4, "maximum": 0}, r"maximum must be an integer >= 1, got 0"),
        ({"n": 4, "exact_up_to": -2}, r"exact_up_to must be an integer >= 0, got -2"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bucket_size(**kwargs)
