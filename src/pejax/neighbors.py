"""Streaming k-nearest-neighbour search.

The n x m distance matrix is never built: queries are processed in blocks of ``block_size`` rows (the last block
padded so every block has the same static shape, and the block size balanced so padding wastes at most a few
rows), and when the key set is large, keys are processed in blocks too with a running top-k merge. Extra memory
is O(block_size x key_block_size) floats.

Distances by metric (smaller is always nearer):

* ``"l2"``: *squared* Euclidean distance ``||q - x||^2`` (computed as ``||q||^2 - 2 q.x + ||x||^2`` and clipped
  at 0; ranking uses ``||x||^2 - 2 q.x``, which orders keys identically).
* ``"cosine"``: cosine distance ``1 - cos(q, x)``; zero vectors are treated as having cosine 0 with everything.
* ``"ip"``: negative inner product ``-q.x`` (the largest inner product is nearest).

Ties go to the lowest key index.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pejax import _host_knn
from pejax import _validate
from pejax.buckets import bucket_size

METRICS = ("l2", "cosine", "ip")

# Elements (queries x keys) of one score block by default: 2**23 float32 = 32 MiB. XLA:CPU keeps up to 3
# block-sized buffers live for k = 1 (the matmul output, the biased scores, the column indices of the row
# minimum; measured with ``memory_analysis``), so this bounds the kernel's working memory near 100 MiB.
_MAX_BLOCK_ELEMENTS = 1 << 23
# Fewest query rows of a default block: with many keys, keys are blocked rather than query rows thinned (a
# matmul of a few rows against many keys is bound by reading the keys).
_MIN_QUERY_BLOCK = 256
# Up to this dimension the passes over the score block (bias, reductions, top-k), not the matmul, set the time
# unless the block stays near the CPU caches: the default block then holds about 2**20 scores (4 MiB), with
# keys split into blocks beyond that. Whole kernel, median of 15 interleaved calls on this project's 2-core CPU
# (load 0.9-1.5, this measurement's own), old default block -> this one: 3000 x 20000 x 64, 80.9 -> 40.6 ms
# (faiss-cpu 56.5); 10000 x 10000 x 128, 148 -> 105 ms (faiss 165); 5000 x 20000 x 256, 236 -> 210 ms (faiss
# 292); at 5000 x 20000 x 512 no gain (325 -> 320-335 ms), but the quiet benchmark's 50000 x 20000 x 512 went
# from 4.29 to 3.72 s. At d = 2048 a 2**20 block was 1.07x slower, so the budget stops at 512.
_CACHE_BLOCK_MAX_DIM = 512
_CACHE_BLOCK_ELEMENTS = 1 << 20
_MAX_QUERY_BLOCK = 512
_ROW_MULTIPLE = 8
# Up to this dimension, blocks are scored keys-major ((keys, rows), reduced over the major axis; k > 1 through
# the grouped top-k of :func:`_smallest_keys_major`: 5000 x 20000 x 64, k = 4, 213 -> 114 ms with the same
# 424 x 20000 block). k = 1, whole vote kernel, keys-major / rows-major time (2-core AVX-512 CPU shared with
# other work, load 2.6-2.8, interleaved medians of 80 calls): 0.84 at 2000 x 2000 x 64, 0.86 at 5000 x 5000
# x 16, 0.83 at 1000 x 3000 x 32, 0.95 at d = 128; a bare block took 0.97x at d = 256, 1.03x at d = 512 and
# 1.34x at d = 2048.
_KEYS_MAJOR_MAX_DIM = 128
_INT32_MAX = 2**31 - 1
# Keys per group in :func:`_smallest_keys_major`.
_GROUP = 16


class Neighbors(NamedTuple):
    """Result of :func:`nearest_neighbors`.

    Attributes:
      distances: (n, k) float32, ascending along the last axis (see the module docstring for their meaning).
      indices: (n, k) int32 indices into ``keys``.
    """

    distances: jax.Array
    indices: jax.Array


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def balanced_block(n: int, block_size: int) -> tuple[int, int]:
    """Splits ``n`` rows into equal blocks of at most ``block_size`` rows.

    Returns ``(num_blocks, rows_per_block)`` with rows a multiple of 8 (or ``n`` itself when it is smaller),
    so that the padded total ``num_blocks * rows_per_block`` exceeds ``n`` by fewer than ``8 * num_blocks``.
    """
    num_blocks = max(1, -(-n // block_size))
    rows = -(-n // num_blocks)
    if num_blocks > 1 or rows > _ROW_MULTIPLE:
        rows = _round_up(rows, _ROW_MULTIPLE)
    return num_blocks, rows


def default_block_sizes(
    n: int, m: int, block_size: int | None, dim: int | None = None
) -> tuple[int, int]:
    """Chooses (query block, key block) sizes so one score block holds about 2**23 elements at most.

    Query blocks hold up to 512 rows (at least 256 while n allows); keys are split into balanced blocks (a
    multiple of 128) only when all m keys would not fit the budget with those rows. For embeddings of up to
    512 dimensions (``dim``) the budget is 2**20 elements instead, a block near the CPU caches (see
    ``_CACHE_BLOCK_MAX_DIM``).
    """
    budget = _MAX_BLOCK_ELEMENTS
    if dim is not None and dim <= _CACHE_BLOCK_MAX_DIM:
        budget = _CACHE_BLOCK_ELEMENTS
    if block_size is None:
        block_size = min(max(_MIN_QUERY_BLOCK, min(_MAX_QUERY_BLOCK, budget // max(m, 1))), n)
    key_block = max(1, budget // max(block_size, 1))
    if key_block >= m:
        return block_size, m
    num_key_blocks = -(-m // key_block)
    return block_size, min(m, _round_up(-(-m // num_key_blocks), 128))


def _prepare(x: jax.Array, metric: str) -> jax.Array:
    if metric == "cosine":
        norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
        return (x.astype(jnp.float32) / jnp.where(norm > 0, norm, 1.0)).astype(x.dtype)
    return x


def _min_with_index(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row minimum and the lowest column index attaining it (k = 1), as two plain reductions.

    ``jnp.argmin`` lowers to a variadic (value, index) reduction that XLA:CPU does not vectorise, and
    ``lax.top_k`` sorts; a min followed by a min over the matching column indices is several times faster and
    breaks ties to the lowest index exactly like ``top_k``. Scores are finite or +inf (padded keys).
    """
    best = jnp.min(scores, axis=1, keepdims=True)
    cols = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    idx = jnp.min(jnp.where(scores <= best, cols, _INT32_MAX), axis=1, keepdims=True)
    return best, idx


def _min_with_index_keys_major(scores_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`_min_with_index` of ``scores_t.T`` from the (keys, rows) block: both reductions run over the major
    axis (element-wise minima of whole rows of the block, no horizontal reduction), which XLA:CPU vectorises
    better. Returns (rows, 1) arrays; ties go to the lowest key index."""
    best = jnp.min(scores_t, axis=0, keepdims=True)
    keys = lax.broadcasted_iota(jnp.int32, scores_t.shape, 0)
    idx = jnp.min(jnp.where(scores_t <= best, keys, _INT32_MAX), axis=0, keepdims=True)
    return best.T, idx.T


def _smallest_keys_major(scores_t: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """:func:`_smallest` of ``scores_t.T`` (k > 1) from the (keys, rows) block, sorting 1/16 of the scores.

    ``lax.top_k`` over a whole block is a per-row partial sort of every score. Here one pass over the block
    takes the minimum of each group of :data:`_GROUP` consecutive keys (element-wise over whole rows of the
    block, vectorised); ``top_k`` of those group minima picks k groups; their scores are gathered and ``top_k``
    picks the k smallest of them. Exact, and in the same order as :func:`_smallest`, ties to the lowest key
    index: order the groups by (minimum score, group index); each of the k smallest (score, index) pairs lies in
    a group whose own smallest pair is no larger, and no two of them share that group's smallest pair, so the k
    first groups hold all k answers. The chosen groups are sorted by index before gathering, so the gathered
    candidates run in ascending key order and ``top_k``'s lowest-position tie rule is the lowest-index rule.
    Returns (rows, k) scores ascending and int32 key indices.
    """
    m, rows = scores_t.shape
    num_full = m // _GROUP
    if num_full <= k:
        return _smallest(scores_t.T, k)
    cut = num_full * _GROUP
    group_min = jnp.min(scores_t[:cut].reshape(num_full, _GROUP, rows), axis=1)
    if cut < m:
        group_min = jnp.concatenate([group_min, jnp.min(scores_t[cut:], axis=0, keepdims=True)])
    _, groups = lax.top_k(-group_min.T, k)  # (rows, k): the k groups with the smallest minima
    groups = jnp.sort(groups, axis=1)
    cand = (groups[:, :, None] * _GROUP + jnp.arange(_GROUP, dtype=jnp.int32)).reshape(
        rows, k * _GROUP
    )
    inside = cand < m  # the last group may be shorter than _GROUP
    vals = jnp.take_along_axis(scores_t, jnp.minimum(cand, m - 1).T, axis=0).T  # (rows, k * _GROUP)
    neg, pos = lax.top_k(jnp.where(inside, -vals, -jnp.inf), k)
    return -neg, jnp.take_along_axis(cand, pos, axis=1)


def _smallest(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest scores of each row in ascending order and their column indices (ties: lowest index)."""
    if k == 1:
        return _min_with_index(scores)
    neg, idx = lax.top_k(-scores, k)
    return -neg, idx


def _empty_best(rows: int, k: int) -> tuple[jax.Array, jax.Array]:
    """The start of a running k-nearest search: (rows, k) scores of +inf and indices 0 (see
    :func:`_merge_best`)."""
    return jnp.full((rows, k), jnp.inf, jnp.float32), jnp.zeros((rows, k), jnp.int32)


def _merge_best(best, new):
    """The running (scores, indices) ``best`` (rows, k) merged with the (rows, k' <= k) ``new`` results of a later
    block of keys, whose indices are all higher: the k smallest scores, ties to the lowest index.

    k = 1: only a strictly better score replaces the running best, so on equal scores the earlier block keeps
    the vote. k > 1: the running best comes first in one ``top_k``, which on equal scores keeps the earlier entry.
    """
    best_s, best_i = best
    new_s, new_i = new
    k = best_s.shape[1]
    if k == 1:
        better = new_s < best_s
        return jnp.where(better, new_s, best_s), jnp.where(better, new_i, best_i)
    neg, pos = lax.top_k(-jnp.concatenate([best_s, new_s], axis=1), k)
    return -neg, jnp.take_along_axis(jnp.concatenate([best_i, new_i], axis=1), pos, axis=1)


def _knn_scores(
    queries,
    keys,
    *,
    k,
    metric,
    query_block,
    key_block,
    num_query_blocks,
    precision,
    key_sq=None,
    num_keys=None,
):
    """Ranking scores (smaller is nearer) and int32 indices of the k nearest keys, each (n, k).

    For ``"l2"`` the score is ``||x||^2 - 2 q.x`` (the squared distance less ``||q||^2``); for ``"cosine"``
    and ``"ip"`` it is ``-q.x`` of the (normalised) vectors. ``key_sq`` (m,) float32 replaces the squared key
    norms computed from ``keys`` (the bfloat16 path passes the exact float32 norms). ``num_keys`` (a traced int32
    scalar, default m) masks keys ``num_keys..m-1`` as padding that can never win, so key sets padded to a shared
    size reuse one compiled program. Traceable; the callers jit it.
    """
    n, d = queries.shape
    m = keys.shape[0]
    keys = _prepare(keys, metric)

    if key_block < m:
        # XLA copies each key block for the matmul: keep that copy (key_block x d) within the block budget too.
        key_block = min(key_block, max(128, _MAX_BLOCK_ELEMENTS // d))
    num_key_blocks = -(-m // key_block)
    if metric == "l2" and key_sq is not None:
        key_sq = key_sq.astype(jnp.float32)
    elif metric == "l2":
        key_sq = jnp.sum(jnp.square(keys.astype(jnp.float32)), axis=-1)
    else:
        key_sq = jnp.zeros((m,), jnp.float32)
    if num_keys is not None:  # keys num_keys..m-1 are padding: they can never win
        key_sq = jnp.where(jnp.arange(m) < num_keys, key_sq, jnp.inf)
    # The factor -2 (or -1) is folded into each query block, not into the keys: scaling by a power of two is
    # exact (below 1.7e38, far above where the squared norms overflow), it saves a multiply per score, and a
    # scaled copy of the keys would cost m x d more memory.
    scale = -2.0 if metric == "l2" else -1.0

    def block_scores(q, kb, bb):
        dots = lax.dot_general(
            q, kb, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        return bb[None, :] + dots  # (rows, key_block): smaller is nearer

    def block_smallest(q, kb, bb, kk):
        if d <= _KEYS_MAJOR_MAX_DIM:
            # Small d: the reductions, not the matmul, dominate; score the block keys-major.
            dots_t = lax.dot_general(
                kb,
                q,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            if kk == 1:
                return _min_with_index_keys_major(bb[:, None] + dots_t)
            return _smallest_keys_major(bb[:, None] + dots_t, kk)
        return _smallest(block_scores(q, kb, bb), kk)

    def key_block_at(j):
        """Key block j read in place (no padded copy of the keys): the last block is shifted back to end at
        key m, and the keys it shares with the block before get an infinite bias, so they never win twice."""
        start = jnp.minimum(j * key_block, m - key_block)
        cols = start + jnp.arange(key_block, dtype=jnp.int32)
        bias = jnp.where(
            cols >= j * key_block, lax.dynamic_slice_in_dim(key_sq, start, key_block), jnp.inf
        )
        return lax.dynamic_slice_in_dim(keys, start, key_block, axis=0), bias, start

    def one_query_block(q):
        # Row-wise, so preparing (normalising) one block at a time equals preparing all queries first.
        q = _prepare(q, metric)
        q = q * jnp.asarray(scale, q.dtype)
        if num_key_blocks == 1:
            best_s, best_i = block_smallest(q, keys, key_sq, k)
            if k == 1:
                # A second use of the row minima, so that XLA keeps them as a (rows,) array. A vote drops the
                # scores, and the minima's only use is then their broadcast in the index pass; XLA:CPU fuses
                # that broadcast into the (YNNPACK) min reduction, which then writes a whole score block of
                # copies: one more pass over the block. Same indices (a row of +inf scores gives index 0
                # either way, as with several key blocks). Vote kernel at 2000 x 2000 x 64, 6.2 -> 4.6 ms;
                # 2000 x 2000 x 256, 16.5 -> 14.0 ms (interleaved in one process, this project's 2-core CPU).
                best_i = jnp.where(best_s < jnp.inf, best_i, 0)
            return best_s, best_i

        def step(best, j):
            kb, bb, offset = key_block_at(j)
            blk_s, blk_i = block_smallest(q, kb, bb, min(k, key_block))
            return _merge_best(best, (blk_s, blk_i + offset)), None

        blocks = jnp.arange(num_key_blocks, dtype=jnp.int32)
        return lax.scan(step, _empty_best(q.shape[0], k), blocks)[0]

    if num_query_blocks == 1 or n < query_block:
        # One block (small inputs; padded to the block's rows), or blocks larger than n: pad, no loop saved.
        n_pad = num_query_blocks * query_block
        q_p = jnp.pad(queries, ((0, n_pad - n), (0, 0)))
        if num_query_blocks == 1:
            scores, idx = one_query_block(q_p)
        else:
            scores, idx = lax.map(one_query_block, q_p.reshape(num_query_blocks, query_block, d))
        scores = scores.reshape(n_pad, k)[:n]
        idx = idx.reshape(n_pad, k)[:n]
        return scores, idx.astype(jnp.int32)

    # Several blocks: each reads its rows of the queries in place (no padded copy of the n x d queries).
    # The last block is shifted back to end at row n, so it overlaps the one before; its overlapping rows
    # are dropped below.
    last = n - query_block

    def block_at(_, i):
        start = jnp.minimum(i * query_block, last)
        return None, one_query_block(lax.dynamic_slice_in_dim(queries, start, query_block, axis=0))

    _, (scores, idx) = lax.scan(block_at, None, jnp.arange(num_query_blocks, dtype=jnp.int32))
    overlap = (num_query_blocks - 1) * query_block - last
    scores = jnp.concatenate([scores[:-1].reshape(-1, k), scores[-1, overlap:]], axis=0)
    idx = jnp.concatenate([idx[:-1].reshape(-1, k), idx[-1, overlap:]], axis=0)
    return scores, idx.astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("k", "metric", "query_block", "key_block", "num_query_blocks", "precision"),
)
def _knn(queries, keys, *, k, metric, query_block, key_block, num_query_blocks, precision):
    scores, idx = _knn_scores(
        queries,
        keys,
        k=k,
        metric=metric,
        query_block=query_block,
        key_block=key_block,
        num_query_blocks=num_query_blocks,
        precision=precision,
    )
    if metric == "l2":
        q_sq = jnp.sum(
            jnp.square(_prepare(queries, metric).astype(jnp.float32)), axis=-1, keepdims=True
        )
        dist = jnp.maximum(scores + q_sq, 0.0)
    elif metric == "cosine":
        dist = 1.0 + scores
    else:
        dist = scores
    return Neighbors(dist, idx)


_PRECISIONS = {
    "highest": lax.Precision.HIGHEST,
    "high": lax.Precision.HIGH,
    "default": lax.Precision.DEFAULT,
}

# The mixed-precision mode: bfloat16 operands, float32 accumulation, exact float32 re-check (see
# :func:`knn_bfloat16`). Not a ``lax.Precision``; the single-device entry points route it.
BFLOAT16 = "bfloat16"
PRECISIONS = (*_PRECISIONS, BFLOAT16)
# Unit roundoff of float32 (the bfloat16 rounding is measured, not bounded by its unit roundoff).
_F32_UNIT = 2.0**-24
# Default number of bfloat16 candidates kept beyond k for the float32 re-check.
DEFAULT_EXTRA_CANDIDATES = 16


def _rounding_bound(q, q16, x, x16, key_sq, metric):
    """Per-query bound (n,) on |bfloat16-path score - exact score| for any key, and on f32 rescoring error.

    With ``q16 = q + dq`` and ``x16 = x + dx`` (the rounding errors, measured exactly here),
    ``|q16.x16 - q.x| <= |dq| |x| + |q| |dx| + |dq| |dx|`` (Cauchy-Schwarz), maximised over keys. Float32
    accumulation of d products adds at most ``d u32 |q16| |x16|`` (Higham's gamma_d), counted twice with a
    factor 2 of margin (once for the bfloat16 scores, once for the float32 re-scores), plus the rounding of
    adding the squared norm. Scores of ``"l2"`` carry the factor 2 of ``-2 q.x``.
    """
    d = q.shape[1]
    f32 = jnp.float32
    norm = lambda a: jnp.linalg.norm(a.astype(f32), axis=-1)  # noqa: E731
    q_n, dq_n, q16_n = norm(q), norm(q - q16.astype(f32)), norm(q16)
    x_n = jnp.max(norm(x))
    dx_n = jnp.max(norm(x - x16.astype(f32)))
    x16_n = jnp.max(norm(x16))
    gamma = 4.0 * d * _F32_UNIT
    dot_err = dq_n * x_n + q_n * dx_n + dq_n * dx_n + gamma * q16_n * x16_n
    if metric == "l2":
        return 2.0 * dot_err + 4.0 * _F32_UNIT * (jnp.max(key_sq) + 2.0 * q_n * x_n)
    return dot_err + 4.0 * _F32_UNIT * q_n * x_n


@functools.partial(
    jax.jit,
    static_argnames=("k", "candidates", "metric", "query_block", "key_block", "num_query_blocks"),
)
def _knn_bfloat16_certified(
    queries, keys, *, k, candidates, metric, query_block, key_block, num_query_blocks
):
    """bfloat16 search for ``candidates`` keys, exact float32 re-scoring, and a per-row certificate.

    Returns ``(Neighbors, certified)``: ``certified`` (n,) bool is True where no key outside the candidates can
    be among the k nearest in exact arithmetic (so the row equals a float32 search up to float32 rounding).
    """
    f32 = jnp.float32
    q = _prepare(queries.astype(f32), metric)
    x = _prepare(keys.astype(f32), metric)
    q16, x16 = q.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
    key_sq = jnp.sum(jnp.square(x), axis=-1) if metric == "l2" else jnp.zeros(x.shape[:1], f32)
    # Vectors are already normalised: score cosine as "ip" so that _prepare does not round them again.
    scores16, cand = _knn_scores(
        q16,
        x16,
        k=candidates,
        metric="l2" if metric == "l2" else "ip",
        query_block=query_block,
        key_block=key_block,
        num_query_blocks=num_query_blocks,
        precision=lax.Precision.DEFAULT,
        key_sq=key_sq,
    )

    def rescore(args):
        qb, cb = args
        dots = jnp.einsum("rd,rcd->rc", qb, x[cb], precision=lax.Precision.HIGHEST)
        exact = key_sq[cb] - 2.0 * dots if metric == "l2" else -dots
        # Lexicographic (score, index): ties go to the lowest index, as in the float32 path.
        exact, cb = lax.sort((exact, cb), dimension=1, num_keys=2)
        return exact[:, :k], cb[:, :k]

    n, d = q.shape
    n_pad = num_query_blocks * query_block
    q_b = jnp.pad(q, ((0, n_pad - n), (0, 0))).reshape(num_query_blocks, query_block, d)
    c_b = jnp.pad(cand, ((0, n_pad - n), (0, 0))).reshape(num_query_blocks, query_block, candidates)
    exact, idx = lax.map(rescore, (q_b, c_b))
    exact, idx = exact.reshape(n_pad, k)[:n], idx.reshape(n_pad, k)[:n]

    bound = _rounding_bound(q, q16, x, x16, key_sq, metric)
    # Every key outside the candidates scored >= the last candidate in bfloat16, so its exact score is
    # >= that minus the bound: if this is still above the k-th exact score, it cannot be a neighbour.
    certified = scores16[:, -1] - bound > exact[:, -1]
    if candidates >= keys.shape[0]:
        certified = jnp.ones_like(certified)
    if metric == "l2":
        dist = jnp.maximum(exact + jnp.sum(jnp.square(q), axis=-1, keepdims=True), 0.0)
    elif metric == "cosine":
        dist = 1.0 + exact
    else:
        dist = exact
    return Neighbors(dist, idx), certified


def check_matmul_precision(precision: str, where: str) -> None:
    """Validates ``precision`` for entry points that take a ``lax.Precision`` only (not ``"bfloat16"``)."""
    if precision == BFLOAT16:
        raise ValueError(
            f"precision='bfloat16' is not supported by {where}: its float32 re-check of uncertified rows runs "
            "on one device. Use pejax.vote_histogram (or nearest_neighbors) for the bfloat16 path, or "
            "precision='default' here (the hardware's fast matmul, without the exact re-check)."
        )
    _validate.one_of("precision", precision, tuple(_PRECISIONS))


def knn_bfloat16(
    queries: jax.Array,
    keys: jax.Array,
    *,
    k: int,
    metric: str,
    block_size: int | None = None,
    key_block_size: int | None = None,
    extra_candidates: int = DEFAULT_EXTRA_CANDIDATES,
) -> tuple[Neighbors, int]:
    """k nearest neighbours with bfloat16 matmuls, made exact by a float32 re-check.

    1. Scores of all keys with bfloat16 operands and float32 accumulation (the tensor-core rate on GPUs and
       TPUs); the ``k + extra_candidates`` best keys of each query are kept.
    2. Those candidates are re-scored in float32 (``Precision.HIGHEST``) and the best k taken (ties: lowest
       index).
    3. A row is *certified* when a rigorous bound on the bfloat16 rounding error (measured from the actual
       rounding of each vector, see ``_rounding_bound``) shows that no other key can beat its k-th neighbour.
       Rows that are not certified (near-ties where bfloat16 could change the winners) are searched again over
       all keys in float32.

    The result therefore equals the float32 search's up to float32 near-ties (as between any two float32
    summation orders). Arguments as in :func:`nearest_neighbors`, plus ``extra_candidates`` >= 0.

    Returns:
      ``(Neighbors, num_rechecked)``: the neighbours as :func:`nearest_neighbors` returns them, and how many
      query rows needed the full float32 search.

    Raises:
      ValueError, TypeError: as :func:`nearest_neighbors`, for a negative ``extra_candidates``, and inside
        ``jax.jit`` (the re-check picks rows on the host).
    """
    queries, keys = check_pair(
        queries, keys, k=k, metric=metric, queries_name="queries", keys_name="keys"
    )
    return _knn_bfloat16(
        queries,
        keys,
        k=k,
        metric=metric,
        block_size=block_size,
        key_block_size=key_block_size,
        extra_candidates=extra_candidates,
    )


def _knn_bfloat16(queries, keys, *, k, metric, block_size, key_block_size, extra_candidates):
    """:func:`knn_bfloat16` on inputs already checked by :func:`check_pair`."""
    extra_candidates = _validate.positive_int("extra_candidates", extra_candidates, minimum=0)
    if _validate.is_traced(queries) or _validate.is_traced(keys):
        raise ValueError(
            "precision='bfloat16' cannot run inside jax.jit: its float32 re-check picks the uncertified rows "
            "on the host. Call it outside jit, or use precision='default' inside jit (fast matmul, no re-check)."
        )
    n, m = queries.shape[0], keys.shape[0]
    candidates = min(k + extra_candidates, m)
    plan = block_plan(
        n, m, block_size=block_size, key_block_size=key_block_size, precision="default"
    )
    del plan["precision"]
    res, certified = _knn_bfloat16_certified(
        queries, keys, k=k, candidates=candidates, metric=metric, **plan
    )
    bad = np.flatnonzero(~np.asarray(certified))
    if bad.size == 0:
        return res, 0
    rows = np.pad(
        bad, (0, bucket_size(bad.size, minimum=_ROW_MULTIPLE) - bad.size)
    )  # pad with row 0 (results discarded)
    sub = jnp.take(jnp.asarray(queries), jnp.asarray(rows), axis=0)
    plan = block_plan(
        sub.shape[0], m, block_size=block_size, key_block_size=key_block_size, precision="highest"
    )
    exact = _knn(sub.astype(jnp.float32), keys.astype(jnp.float32), k=k, metric=metric, **plan)
    at = jnp.asarray(bad)
    dist = res.distances.at[at].set(exact.distances[: bad.size])
    idx = res.indices.at[at].set(exact.indices[: bad.size])
    return Neighbors(dist, idx), int(bad.size)


BACKENDS = _host_knn.BACKENDS


def check_backend(backend: str, precision: str, *arrays) -> str:
    """Validates the ``backend`` speed setting (and its pairing with ``precision`` and the arrays' device).

    ``"xla"`` (default) is the jitted kernel of this module on any device. ``"blas"`` and ``"faiss"`` compute the
    same exact float32 search on the host CPU (see :mod:`pejax._host_knn`): they need concrete CPU arrays (not
    inside ``jax.jit``, not on an accelerator) and ``precision="highest"``. A missing faiss raises ImportError
    naming the extra.
    """
    _validate.one_of("backend", backend, BACKENDS)
    if backend == "xla":
        return backend
    if precision != "highest":
        raise ValueError(
            f"precision={precision!r} is not supported with backend={backend!r}: the host backends always "
            "compute in float32 (precision='highest'). Use precision='highest', or backend='xla' for "
            "reduced-precision matmuls on GPUs and TPUs."
        )
    for a in arrays:
        if _validate.is_traced(a):
            raise ValueError(
                f"backend={backend!r} cannot run inside jax.jit or vmap: it searches on the host with "
                "NumPy. Call it outside jit, or use backend='xla' inside jit."
            )
        if not _validate.on_host(a):
            raise ValueError(
                f"backend={backend!r} searches on the host CPU, but an input lives on "
                f"{sorted({str(d) for d in a.devices()})}. Use backend='xla' for arrays on an accelerator."
            )
    if backend == "faiss":
        _host_knn.import_faiss()
    return backend


def host_knn(queries, keys, k, metric, block_size, key_block_size, backend):
    """The search of a host backend on inputs checked by :func:`check_pair` and :func:`check_backend`."""
    block_plan(
        queries.shape[0],
        keys.shape[0],
        block_size=block_size,
        key_block_size=key_block_size,
        precision="highest",
    )  # validates the block sizes
    return _host_knn.knn_host(
        queries,
        keys,
        k=k,
        metric=metric,
        backend=backend,
        block_size=block_size,
        key_block_size=key_block_size,
    )


def check_pair(queries, keys, *, k: int, metric: str, queries_name: str, keys_name: str):
    """Validates a (queries, keys, k, metric) quadruple; returns (queries, keys) as JAX arrays."""
    _validate.one_of("metric", metric, METRICS)
    queries = _validate.matrix(queries_name, queries)
    keys = _validate.matrix(keys_name, keys)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"{queries_name} and {keys_name} must have the same embedding dimension, got "
            f"{queries_name}.shape={tuple(queries.shape)} and {keys_name}.shape={tuple(keys.shape)}. "
            "Embed both with the same embedding function."
        )
    _validate.positive_int("k", k)
    if k > keys.shape[0]:
        raise ValueError(
            f"k={k} exceeds the number of {keys_name} ({keys.shape[0]}); each query needs k distinct "
            f"neighbours. Use k <= {keys.shape[0]} or more {keys_name}."
        )
    if queries.dtype != keys.dtype:
        common = jnp.promote_types(queries.dtype, keys.dtype)
        queries, keys = queries.astype(common), keys.astype(common)
    return queries, keys


def nearest_neighbors(
    queries: jax.Array,
    keys: jax.Array,
    *,
    k: int = 1,
    metric: str = "l2",
    block_size: int | None = None,
    key_block_size: int | None = None,
    precision: str = "highest",
    backend: str = "xla",
) -> Neighbors:
    """Finds the ``k`` nearest keys of every query, streaming in blocks.

    Args:
      queries: (n, d) floating array (e.g. private embeddings). Must be finite.
      keys: (m, d) floating array (e.g. synthetic embeddings), with the same ``d``. Must be finite.
      k: number of neighbours, 1 <= k <= m.
      metric: ``"l2"`` (squared Euclidean), ``"cosine"`` or ``"ip"`` (inner product); see the module docstring.
      block_size: queries per block (default: up to 512, and at least 256 while n allows, as many as keep one
        score block under 2**23 elements, or 2**20 for d <= 512, where a cache-sized block makes the passes
        over the scores cheaper). The last block reads the last rows again (no padded copy of the queries), so
        all blocks share one static shape.
      key_block_size: keys per block (default: all keys when a block of scores fits that budget, otherwise
        balanced blocks, a multiple of 128, that do; with several key blocks, at most ``max(128, 2**23 // d)``
        keys, since each key block is copied for the matmul). The kernel's working memory is about 2-3 score
        blocks (``block_size * key_block_size`` float32 each) plus a query block and a key block, beyond the
        inputs (which are used in place when they are JAX arrays or 64-byte-aligned NumPy float arrays).
      precision: matmul precision, ``"highest"`` (full float32; default), ``"high"`` or ``"default"`` (on GPUs
        and TPUs the latter two trade accuracy for speed), or ``"bfloat16"``: bfloat16 matmuls made exact by a
        float32 re-check of the candidates and of every row a rounding bound cannot certify (see
        :func:`pejax.neighbors.knn_bfloat16`; for GPUs and TPUs, slower on CPUs). No precision changes any
        privacy property.
      backend: ``"xla"`` (default: the jitted kernel, any device), ``"blas"`` (the platform BLAS through NumPy
        on the host CPU) or ``"faiss"`` (faiss-cpu, extra ``pejax[faiss]``), the last two for CPU arrays
        outside ``jit`` with ``precision="highest"``. Same metrics, scores and tie rule: the neighbours agree
        up to float32 near-ties. Speed setting only (see :mod:`pejax._host_knn`).

    Returns:
      ``Neighbors(distances, indices)``: (n, k) float32 distances in ascending order and (n, k) int32 indices.
      Ties go to the lowest key index.

    Raises:
      ValueError: non-2-D, empty or non-finite inputs, mismatched dimensions, unknown metric, k out of range.
      TypeError: non-floating inputs or a non-integer k.

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.array([[0.0, 0.0], [1.0, 1.0]])
      >>> x = jnp.array([[1.0, 1.2], [0.1, 0.0], [5.0, 5.0]])
      >>> nearest_neighbors(q, x, k=1).indices.ravel().tolist()
      [1, 0]
    """
    queries, keys = check_pair(
        queries, keys, k=k, metric=metric, queries_name="queries", keys_name="keys"
    )
    _validate.one_of("precision", precision, PRECISIONS)
    if check_backend(backend, precision, queries, keys) != "xla":
        dist, idx = host_knn(queries, keys, k, metric, block_size, key_block_size, backend)
        return Neighbors(jax.device_put(dist), jax.device_put(idx))
    if precision == BFLOAT16:
        # The core, not the public knn_bfloat16: the inputs were validated just above.
        return _knn_bfloat16(
            queries,
            keys,
            k=k,
            metric=metric,
            block_size=block_size,
            key_block_size=key_block_size,
            extra_candidates=DEFAULT_EXTRA_CANDIDATES,
        )[0]
    plan = block_plan(
        queries.shape[0],
        keys.shape[0],
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
        dim=queries.shape[1],
    )
    return _knn(queries, keys, k=k, metric=metric, **plan)


def block_plan(
    n: int,
    m: int,
    *,
    block_size: int | None,
    key_block_size: int | None,
    precision: str,
    dim: int | None = None,
) -> dict:
    """Validates the speed settings and returns the static keyword arguments of the blocked kernel.

    Returns a dict with ``query_block`` (rows per balanced block), ``num_query_blocks``, ``key_block`` and
    ``precision`` (a ``lax.Precision``). The score block holds ``query_block * key_block`` float32.
    """
    if block_size is not None:
        _validate.positive_int("block_size", block_size)
    if key_block_size is not None:
        _validate.positive_int("key_block_size", key_block_size)
    _validate.one_of("precision", precision, tuple(_PRECISIONS))
    qb, kb = default_block_sizes(n, m, block_size, dim)
    if key_block_size is not None:
        kb = min(key_block_size, m)
    num_blocks, rows = balanced_block(n, qb)
    return {
        "query_block": rows,
        "key_block": kb,
        "num_query_blocks": num_blocks,
        "precision": _PRECISIONS[precision],
    }


def padded_work_fraction(n: int, block_size: int) -> float:
    """Fraction of the query rows computed that are padding, for a given ``n`` and ``block_size``."""
    num_blocks, rows = balanced_block(n, block_size)
    return 1.0 - n / (num_blocks * rows) if n else 0.0


__all__ = ["BACKENDS", "METRICS", "PRECISIONS", "Neighbors", "knn_bfloat16", "nearest_neighbors"]
