"""The vote histogram: the only computation in PE that reads private data.

Each private sample votes for its ``k`` nearest synthetic samples with weight ``1/sqrt(k)``, so its vote vector
has L2 norm exactly 1. At user level (``group_ids`` given), the summed vote vector of each group (all samples of
one person) is divided by its L2 norm, so it too has norm exactly 1. Adding or removing one sample (or, at user
level, one whole group) therefore changes the histogram by a vector of L2 norm at most 1: the histogram's L2
sensitivity under the add/remove-one neighbouring relation is :data:`HISTOGRAM_SENSITIVITY` = 1.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pejax import _validate
from pejax import neighbors as _nn

HISTOGRAM_SENSITIVITY = 1.0
"""L2 sensitivity of :func:`vote_histogram` under adding or removing one private sample (or one group)."""

NEIGHBORING_RELATION_SAMPLE = "add_or_remove_one_sample"
NEIGHBORING_RELATION_GROUP = "add_or_remove_one_group"
REPLACE_ONE_SAMPLE = "replace_one_sample"
REPLACE_ONE_GROUP = "replace_one_group"
NEIGHBORING_RELATIONS = (
    NEIGHBORING_RELATION_SAMPLE,
    NEIGHBORING_RELATION_GROUP,
    REPLACE_ONE_SAMPLE,
    REPLACE_ONE_GROUP,
)
"""Neighbouring relations a release can be accounted under. Add/remove: n is private. Replace-one: n is public,
and one sample (or user) is swapped for another, possibly of another class."""
REPLACE_RELATIONS = (REPLACE_ONE_SAMPLE, REPLACE_ONE_GROUP)

USER_LATTICE_BITS = 16
"""User-level votes are snapped (towards zero) to multiples of 2^-16 before the discrete Gaussian noise."""
_MAX_USER_BIN_VOTES = 1 << 15


class LatticeVotes(NamedTuple):
    """Vote histogram on an integer lattice: the input of the discrete Gaussian mechanism.

    Attributes:
      counts: (m,) int64 lattice votes; the histogram in vote units is ``counts * scale``.
      scale: vote units per lattice unit: ``1/sqrt(k)`` at sample level, ``2^-16`` at user level.
      unit_changes: adding or removing one sample changes ``counts`` by +-1 in at most this many bins (k);
        ``None`` at user level, where a user changes it by an integer vector of L2 norm <= ``l2_sensitivity``.
      l2_sensitivity: L2 sensitivity of ``counts`` in lattice units under add/remove one sample (``sqrt(k)``)
        or one user (``2^16``); always ``1 / scale`` (the histogram's sensitivity is 1 in vote units).
    """

    counts: np.ndarray
    scale: float
    unit_changes: int | None
    l2_sensitivity: float


def histogram_sensitivity(*, user_level: bool = False) -> float:
    """Returns the L2 sensitivity of the vote histogram (1 at sample level and at user level).

    Args:
      user_level: whether neighbouring data sets differ by one group (user) instead of one sample. The value is
        1 either way because each group's vote vector is normalised to norm 1; the argument documents the
        neighbouring relation the caller relies on.
    """
    del user_level
    return HISTOGRAM_SENSITIVITY


@functools.partial(jax.jit, static_argnames=("num_bins", "k"))
def votes_from_indices(indices: jax.Array, *, num_bins: int, k: int) -> jax.Array:
    """Sample-level histogram from neighbour indices.

    Args:
      indices: (n, k) int neighbour indices in [0, num_bins), distinct within a row.
      num_bins: m, the number of synthetic samples.
      k: neighbours per sample (each vote weighs 1/sqrt(k)).

    Returns:
      (num_bins,) float32 histogram summing to n * sqrt(k).
    """
    # Count in integers, scale once: the result does not depend on summation order, so the single-device,
    # sharded and streamed paths give bit-identical histograms.
    counts = jnp.zeros((num_bins,), jnp.int32).at[indices.reshape(-1)].add(1)
    return counts.astype(jnp.float32) * jnp.float32(1.0 / np.sqrt(k))


@functools.partial(jax.jit, static_argnames=("num_bins", "k"))
def group_votes_from_indices(
    indices: jax.Array, groups: jax.Array, *, num_bins: int, k: int
) -> jax.Array:
    """User-level histogram: each group's summed vote vector is scaled to L2 norm 1.

    Args:
      indices: (n, k) int neighbour indices in [0, num_bins).
      groups: (n,) int32 dense group ids in [0, n).
      num_bins: m, the number of synthetic samples.
      k: neighbours per sample.

    Returns:
      (num_bins,) float32 histogram; each group contributes a vector of L2 norm 1.
    """
    n = indices.shape[0]
    flat_bins = indices.reshape(-1).astype(jnp.int32)
    flat_groups = jnp.repeat(groups.astype(jnp.int32), k)
    # Sort the (group, bin) pairs and run-length count them: count[g, b] = votes of group g for bin b.
    g_sorted, b_sorted = lax.sort((flat_groups, flat_bins), num_keys=2)
    new_run = jnp.concatenate(
        [jnp.array([True]), (g_sorted[1:] != g_sorted[:-1]) | (b_sorted[1:] != b_sorted[:-1])]
    )
    run_id = jnp.cumsum(new_run) - 1
    run_count = jax.ops.segment_sum(jnp.ones_like(run_id, jnp.float32), run_id, num_segments=n * k)
    run_group = jax.ops.segment_max(g_sorted, run_id, num_segments=n * k)
    # ||v_g||^2 = sum_b (count[g, b] / sqrt(k))^2; empty runs have count 0 and add nothing.
    sq_norm = jax.ops.segment_sum(
        jnp.square(run_count) / k, jnp.maximum(run_group, 0), num_segments=n
    )
    inv_norm = jnp.where(sq_norm > 0, lax.rsqrt(jnp.maximum(sq_norm, 1e-30)), 0.0)
    weights = inv_norm[flat_groups] / np.sqrt(k)
    return jnp.zeros((num_bins,), jnp.float32).at[flat_bins].add(weights)


def dense_group_ids(group_ids, num_samples: int) -> jax.Array:
    """Validates ``group_ids`` and relabels them densely to 0..G-1 (int32, shape (num_samples,))."""
    ids = np.asarray(group_ids)
    if ids.ndim != 1 or ids.shape[0] != num_samples:
        raise ValueError(
            f"group_ids must have shape ({num_samples},) (one id per private sample), got shape {ids.shape}. "
            "Pass the user id of each private sample, in the same order as the samples."
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(
            f"group_ids must be integers, got dtype {ids.dtype}. Map user names to integers first, e.g. "
            "np.unique(names, return_inverse=True)[1]."
        )
    _, dense = np.unique(ids, return_inverse=True)
    return _validate.to_device(dense.astype(np.int32))


def vote_histogram(
    private: jax.Array,
    synthetic: jax.Array,
    *,
    k: int = 1,
    metric: str = "l2",
    group_ids=None,
    block_size: int | None = None,
    key_block_size: int | None = None,
    precision: str = "highest",
    backend: str = "xla",
    mesh=None,
    chunk_rows: int | None = None,
) -> jax.Array:
    """Nearest-neighbour vote histogram of private embeddings over synthetic embeddings.

    The one vote entry point for every kind of private source (see :func:`private_source`): an in-memory
    array; an array sharded over a device mesh (or any array with ``mesh=``), voted shard by shard with the
    histograms summed over devices and hosts (:func:`pejax.sharding.sharded_vote_histogram`); or a ``.npy`` path or
    ``np.memmap``, streamed in chunks of ``chunk_rows`` rows so it is never loaded whole
    (:func:`pejax.streaming.streamed_vote_histogram`). Every source gives the same histogram. A NumPy array of
    over 64 MiB that the CPU device would copy whole (not 64-byte aligned, as NumPy's own large arrays are not,
    not C-contiguous, or not float32), private or synthetic, is voted in 16 MiB chunks through the same streamed
    core, so its vote needs two chunks of extra memory rather than a copy of it; JAX arrays and aligned float32
    arrays are used in place.

    Args:
      private: (n, d) float private embeddings (finite).
      synthetic: (m, d) float synthetic embeddings (finite), m >= k.
      k: each private sample votes for its k nearest synthetic samples with weight 1/sqrt(k).
      metric: ``"l2"``, ``"cosine"`` or ``"ip"``, as in :func:`pejax.nearest_neighbors`.
      group_ids: optional (n,) integer user ids for user-level privacy; each user's summed vote vector is scaled
        to L2 norm 1.
      block_size, key_block_size, precision, backend: speed settings passed to :func:`pejax.nearest_neighbors`
        (``backend="blas"`` or ``"faiss"``: the exact search with the platform BLAS or faiss, for CPU arrays);
        they do not change the votes (beyond float32 near-ties) nor the privacy guarantee.

    Returns:
      (m,) float32 histogram with L2 sensitivity :data:`HISTOGRAM_SENSITIVITY` = 1. At sample level it sums to
      n * sqrt(k).

    Raises:
      ValueError, TypeError: as :func:`pejax.nearest_neighbors`, and for ``group_ids`` of the wrong length
        or type.

    Example:
      >>> import jax.numpy as jnp
      >>> private = jnp.array([[0.0], [0.1], [0.9]])
      >>> synthetic = jnp.array([[0.0], [1.0]])
      >>> vote_histogram(private, synthetic).tolist()
      [2.0, 1.0]
    """
    kw = dict(
        k=k,
        metric=metric,
        group_ids=group_ids,
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
    )
    routed = _route(private, synthetic, mesh, chunk_rows, backend, kw, lattice=False)
    if routed is not None:
        return routed
    private, synthetic = _nn.check_pair(
        private, synthetic, k=k, metric=metric, queries_name="private", keys_name="synthetic"
    )
    groups = None if group_ids is None else dense_group_ids(group_ids, private.shape[0])
    _validate.one_of("precision", precision, _nn.PRECISIONS)
    if _nn.check_backend(backend, precision, private, synthetic) != "xla" or (
        precision == _nn.BFLOAT16
    ):
        indices = _indices_outside_kernel(
            private, synthetic, k, metric, block_size, key_block_size, backend
        )
        return _votes_from(jax.device_put(indices), groups, m=synthetic.shape[0], k=k)
    plan = _nn.block_plan(
        private.shape[0],
        synthetic.shape[0],
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
        dim=private.shape[1],
    )
    # One compiled program (search and histogram together), one dispatch: this matters for small inputs.
    return _vote_histogram(private, synthetic, groups, k=k, metric=metric, **plan)


@functools.partial(
    jax.jit,
    static_argnames=("k", "metric", "query_block", "key_block", "num_query_blocks", "precision"),
)
def _vote_histogram(
    private, synthetic, groups, *, k, metric, query_block, key_block, num_query_blocks, precision
):
    _, indices = _nn._knn_scores(
        private,
        synthetic,
        k=k,
        metric=metric,
        query_block=query_block,
        key_block=key_block,
        num_query_blocks=num_query_blocks,
        precision=precision,
    )
    return _votes_from(indices, groups, m=synthetic.shape[0], k=k)


@functools.partial(jax.jit, static_argnames=("m", "k"))
def _votes_from(indices, groups, *, m, k):
    if groups is None:
        return votes_from_indices(indices, num_bins=m, k=k)
    return group_votes_from_indices(indices, groups, num_bins=m, k=k)


def sample_lattice(counts, *, k: int) -> LatticeVotes:
    """Sample-level lattice votes from integer vote counts (each sample adds 1 to k distinct bins)."""
    counts = np.asarray(counts).astype(np.int64)
    return LatticeVotes(counts, 1.0 / math.sqrt(k), k, math.sqrt(k))


def user_lattice(indices, groups, *, num_bins: int, k: int) -> LatticeVotes:
    """User-level lattice votes: each user's normalised vote vector snapped towards zero to the 2^-16 grid.

    For user g with c_gb of its samples' votes in bin b, its vote vector is ``c_gb / sqrt(sum_b c_gb^2)`` (norm
    1, as :func:`group_votes_from_indices`); its lattice vector is ``q_gb = floor(2^16 c_gb / sqrt(S_g))`` with
    ``S_g = sum_b c_gb^2``, computed in exact integer arithmetic, so ``||q_g||_2 <= 2^16`` holds exactly.

    Args:
      indices: (n, k) int neighbour indices in [0, num_bins), distinct within a row.
      groups: (n,) int dense user ids.
      num_bins: m.
      k: neighbours per sample.

    Returns:
      :class:`LatticeVotes` with ``scale = 2^-16`` and ``l2_sensitivity = 2^16``.
    """
    idx = np.asarray(indices).astype(np.int64).reshape(-1)
    grp = np.repeat(np.asarray(groups).astype(np.int64), k)
    pairs, c = np.unique(grp * num_bins + idx, return_counts=True)
    if c.size and c.max() > _MAX_USER_BIN_VOTES:
        raise ValueError(
            f"a user has {int(c.max())} samples voting for one candidate (more than {_MAX_USER_BIN_VOTES}); "
            "split such users, or cap the samples per user before the run."
        )
    g = pairs // num_bins
    c = c.astype(np.int64)
    sq = np.zeros(int(g.max()) + 1 if g.size else 0, np.int64)
    np.add.at(sq, g, c * c)
    s_g = sq[g]
    unit = 1 << USER_LATTICE_BITS
    num = c * c * unit * unit  # < 2^30 * 2^32: fits int64
    q = np.floor(np.sqrt(num / s_g)).astype(np.int64)
    # Exact correction of the float estimate: q = max{q : q^2 S <= c^2 2^32}.
    for _ in range(2):
        q = np.where(q * q * s_g > num, q - 1, q)
        q = np.where((q + 1) * (q + 1) * s_g <= num, q + 1, q)
    counts = np.zeros(num_bins, np.int64)
    np.add.at(counts, pairs % num_bins, q)
    return LatticeVotes(counts, 1.0 / unit, None, float(unit))


def lattice_vote_histogram(
    private: jax.Array,
    synthetic: jax.Array,
    *,
    k: int = 1,
    metric: str = "l2",
    group_ids=None,
    block_size: int | None = None,
    key_block_size: int | None = None,
    precision: str = "highest",
    backend: str = "xla",
    num_private: int | None = None,
    num_synthetic: int | None = None,
    mesh=None,
    chunk_rows: int | None = None,
) -> LatticeVotes:
    """:func:`vote_histogram` on its integer lattice, for the discrete Gaussian mechanism.

    Same arguments, private sources and validation as :func:`vote_histogram`. ``counts * scale`` equals its histogram (at user
    level, up to the snapping to the 2^-16 grid, which only shrinks each user's vector).

    ``num_private`` and ``num_synthetic`` (default: every row) say how many leading rows of ``private`` and
    ``synthetic`` are data; the rows after them are padding: padded private rows cast no vote, padded synthetic
    rows receive none, and the result has ``num_synthetic`` bins (``group_ids``, if given, has ``num_private``
    entries). Padding sets of varying sizes to a few shared sizes lets one compiled program serve them all
    (the PE engine pads every class to 4 sizes per octave); it changes no vote.

    Example:
      >>> import jax.numpy as jnp
      >>> v = lattice_vote_histogram(jnp.array([[0.0], [0.1], [0.9]]), jnp.array([[0.0], [1.0]]))
      >>> v.counts.tolist(), v.scale
      ([2, 1], 1.0)
    """
    kw = dict(
        k=k,
        metric=metric,
        group_ids=group_ids,
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
    )
    if num_private is None and num_synthetic is None:
        routed = _route(private, synthetic, mesh, chunk_rows, backend, kw, lattice=True)
        if routed is not None:
            return routed
    elif private_source(private, mesh) != "memory":
        raise ValueError(
            "num_private/num_synthetic (padding) apply to in-memory private arrays only; pass the data rows "
            "of a streamed or sharded source without padding."
        )
    private, synthetic = _nn.check_pair(
        private, synthetic, k=1, metric=metric, queries_name="private", keys_name="synthetic"
    )
    n = _valid_rows("num_private", num_private, private.shape[0], "private")
    m = _valid_rows("num_synthetic", num_synthetic, synthetic.shape[0], "synthetic")
    _validate.positive_int("k", k)
    if k > m:
        raise ValueError(
            f"k={k} exceeds the number of synthetic samples ({m}); each private sample needs k distinct "
            f"neighbours. Use k <= {m} or more synthetic samples."
        )
    groups = None if group_ids is None else np.asarray(dense_group_ids(group_ids, n))
    _validate.one_of("precision", precision, _nn.PRECISIONS)
    if _nn.check_backend(backend, precision, private, synthetic) != "xla" or (
        precision == _nn.BFLOAT16
    ):
        # Host searches and the bfloat16 re-check work on the data rows alone.
        private, synthetic = (
            _validate.leading_rows(private, n),
            _validate.leading_rows(synthetic, m),
        )
        indices = _indices_outside_kernel(
            private, synthetic, k, metric, block_size, key_block_size, backend
        )
        if groups is None:
            return sample_lattice(np.bincount(np.asarray(indices).reshape(-1), minlength=m), k=k)
        return user_lattice(np.asarray(indices), groups, num_bins=m, k=k)
    plan = _nn.block_plan(
        private.shape[0],
        synthetic.shape[0],
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
        dim=private.shape[1],
    )
    counts, indices = _masked_votes(
        private,
        synthetic,
        np.int32(n),
        np.int32(m),
        k=k,
        metric=metric,
        with_indices=groups is not None,
        **plan,
    )
    if groups is None:
        return sample_lattice(np.asarray(counts)[:m], k=k)
    return user_lattice(np.asarray(indices)[:n], groups, num_bins=m, k=k)


PRIVATE_SOURCES = ("memory", "mesh", "stream")
"""Kinds of private side the vote entry points take (see :func:`private_source`)."""


def private_source(private, mesh=None) -> str:
    """The kind of private side: ``"stream"`` for a ``.npy`` path or ``np.memmap`` (read in chunks), ``"mesh"``
    when a mesh is given or ``private`` is a JAX array sharded over several devices, else ``"memory"``."""
    if isinstance(private, str | os.PathLike | np.memmap):
        return "stream"
    if mesh is not None:
        return "mesh"
    sharding = getattr(private, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
        return "mesh"
    return "memory"


def _route(private, synthetic, mesh, chunk_rows, backend, kw, *, lattice: bool):
    """The votes of a streamed or sharded private side (``None`` for an in-memory array)."""
    source = private_source(private, mesh)
    if chunk_rows is not None and source != "stream":
        raise ValueError(
            f"chunk_rows={chunk_rows!r} applies to streamed private data (a .npy path or np.memmap); the "
            f"private side here is {source!r}. Drop chunk_rows."
        )
    if source == "stream":
        from pejax.streaming import streamed_vote_histogram

        if chunk_rows is not None:
            kw = dict(kw, chunk_rows=chunk_rows)
        return streamed_vote_histogram(private, synthetic, backend=backend, _lattice=lattice, **kw)
    if source == "mesh":
        from pejax.sharding import sharded_vote_histogram

        if backend != "xla":
            raise ValueError(
                f"backend={backend!r} searches on the host CPU and cannot vote over a device mesh; use "
                "backend='xla' with a sharded private side."
            )
        mesh = private.sharding.mesh if mesh is None else mesh
        return sharded_vote_histogram(private, synthetic, mesh=mesh, _lattice=lattice, **kw)
    large = next((a for a in (private, synthetic) if _copied_whole(a)), None)
    if backend == "xla" and kw["precision"] != _nn.BFLOAT16 and large is not None:
        from pejax.streaming import streamed_vote_histogram

        chunk_rows = max(1, _HOST_CHUNK_BYTES // (large.shape[1] * 4))
        return streamed_vote_histogram(
            private, synthetic, backend=backend, _lattice=lattice, chunk_rows=chunk_rows, **kw
        )
    return None


# A large NumPy private array that the device would copy whole (see :func:`_copied_whole`) is voted in chunks of
# this many bytes of float32 rows instead, through the streamed core: at most two chunks are held at a time. Such a
# synthetic array is read in key chunks of the same size there (``streaming._KEY_CHUNK_BYTES``).
# Measured (benchmarks/bench_votes.py's data, one process, alternating): 200000 x 256 against 50000 synthetic,
# extra memory 254 -> 96 MiB and 21.9 -> 20.3 s; 10000 x 2048 against 10000, 214 -> 169-187 MiB, 2.3 -> 2.2 s.
# In the quiet benchmark's separate processes the chunked vote took 3-9% longer on the four large cases.
_HOST_CHUNK_BYTES = 1 << 24
_HOST_CHUNKED_MIN_BYTES = 1 << 26


def _copied_whole(array) -> bool:
    """True for a plain 2-D NumPy array of more than 64 MiB that ``jax.device_put`` would copy whole: its data
    not 64-byte aligned (NumPy's own large arrays are 16-byte aligned), not C-contiguous, or not float32."""
    if type(array) is not np.ndarray or array.ndim != 2:
        return False
    if array.nbytes <= _HOST_CHUNKED_MIN_BYTES or not np.issubdtype(array.dtype, np.floating):
        return False
    return (
        array.dtype != np.float32
        or not array.flags.c_contiguous
        or array.ctypes.data % _validate.ALIGN != 0
    )


def _indices_outside_kernel(private, synthetic, k, metric, block_size, key_block_size, backend):
    """(n, k) neighbour indices on the paths outside the fused XLA vote kernel: a host backend (``"blas"``,
    ``"faiss"``), or ``backend="xla"`` with ``precision="bfloat16"`` (bfloat16 search, float32 re-check)."""
    if backend != "xla":
        return _nn.host_knn(private, synthetic, k, metric, block_size, key_block_size, backend)[1]
    return _nn._knn_bfloat16(
        private,
        synthetic,
        k=k,
        metric=metric,
        block_size=block_size,
        key_block_size=key_block_size,
        extra_candidates=_nn.DEFAULT_EXTRA_CANDIDATES,
    )[0].indices


def _valid_rows(name: str, value, rows: int, what: str) -> int:
    if value is None:
        return rows
    value = _validate.positive_int(name, value)
    if value > rows:
        raise ValueError(
            f"{name}={value} exceeds the {rows} rows of {what}; it counts the leading rows that are data "
            "(the rest is padding)."
        )
    return value


@functools.partial(
    jax.jit,
    static_argnames=(
        "k",
        "metric",
        "with_indices",
        "query_block",
        "key_block",
        "num_query_blocks",
        "precision",
    ),
)
def _masked_votes(
    private,
    synthetic,
    num_private,
    num_synthetic,
    *,
    k,
    metric,
    with_indices,
    query_block,
    key_block,
    num_query_blocks,
    precision,
):
    """Integer vote counts (m_pad,) of the first ``num_private`` rows over the first ``num_synthetic`` keys
    (and the (n_pad, k) neighbour indices when ``with_indices``): one program for every padded size pair."""
    _, indices = _nn._knn_scores(
        private,
        synthetic,
        k=k,
        metric=metric,
        query_block=query_block,
        key_block=key_block,
        num_query_blocks=num_query_blocks,
        precision=precision,
        num_keys=num_synthetic,
    )
    m = synthetic.shape[0]
    voting = (jnp.arange(private.shape[0]) < num_private)[:, None]
    bins = jnp.where(voting, indices, m)  # padded rows vote for bin m: dropped
    counts = jnp.zeros((m,), jnp.int32).at[bins.reshape(-1)].add(1, mode="drop")
    return counts, (indices if with_indices else None)


__all__ = [
    "HISTOGRAM_SENSITIVITY",
    "NEIGHBORING_RELATIONS",
    "PRIVATE_SOURCES",
    "LatticeVotes",
    "histogram_sensitivity",
    "lattice_vote_histogram",
    "private_source",
    "vote_histogram",
]
