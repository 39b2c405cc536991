"""Exact k-nearest-neighbour search on the host CPU with the platform BLAS (``backend="blas"``) or faiss.

XLA's CPU matmul reaches about 258 GFLOP/s on the 2-core AVX-512 development machine where OpenBLAS reaches 337,
and faiss-cpu rides OpenBLAS: on CPU arrays these backends compute the same search as the XLA kernel of
:mod:`pejax.neighbors` with the platform's ``sgemm``. They are speed settings only: same metrics, same scores
(``||x||^2 - 2 q.x`` for ``"l2"``, ``-q.x`` of the normalised or raw vectors for ``"cosine"`` and ``"ip"``), same
tie rule (the lowest key index), so the votes agree with the XLA backend up to float32 near-ties (two float32
summation orders of the same dot product).

* ``"blas"``: NumPy ``matmul`` (its bundled OpenBLAS) on query blocks, the squared key norms added in place, then
  ``argmin`` (k = 1, first minimum = lowest index) or ``argpartition`` with an exact lexicographic (score, index)
  fix-up of rows whose k-th score is tied. Extra memory: one score block.
* ``"faiss"``: faiss ``IndexFlatL2`` / ``IndexFlatIP`` finds ``k + 8`` candidates, which are re-scored here in
  float32 and sorted by (score, index). Rows whose last candidate lies within the float32 rounding bound of the
  k-th (a tie or near-tie faiss may have broken another way, or a key left out) are searched again with
  ``"blas"``, so the tie rule holds exactly as for the other backends.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("xla", "blas", "faiss")
HOST_BACKENDS = ("blas", "faiss")
# Score-block elements per query block (2**22 float32 = 16 MiB: the block stays near the caches for the
# reductions after the matmul, and the matmul is still large enough to run at the BLAS rate).
_BLOCK_ELEMENTS = 1 << 22
# Keys per key block by default: above this the key set is split and the running k best merged (the score
# block is then 8 x 2**20 elements). With a given block_size, key blocks keep the score block within
# 2**25 elements, as in the XLA kernel.
_MAX_KEY_BLOCK = 1 << 20
_MAX_BLOCK_ELEMENTS = 1 << 25
_FAISS_EXTRA = 8
_F32_UNIT = 2.0**-24


def import_faiss():
    """Imports faiss, or raises ImportError naming the extra that installs it."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='faiss' needs faiss-cpu, which is not installed: pip install 'pejax[faiss]' (or "
            "faiss-cpu), or use backend='blas' (the platform BLAS through NumPy, no extra dependency)."
        ) from e
    return faiss


def _float_dtype(*arrays) -> np.dtype:
    return (
        np.dtype(np.float64) if any(a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)
    )


def _prepare(x: np.ndarray, metric: str, dtype) -> np.ndarray:
    x = np.asarray(x).astype(dtype, copy=False)
    if metric == "cosine":
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        x = x / np.where(norm > 0, norm, 1.0).astype(dtype)
    return x


def _lex_smallest(scores: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of each row by (score, column), ascending: exactly the XLA kernel's ``top_k`` order."""
    cols = scores.shape[1]
    if k == 1:
        idx = np.argmin(scores, axis=1)[:, None]  # the first minimum: the lowest column on ties
    elif k >= cols:
        idx = np.broadcast_to(np.arange(cols), scores.shape).copy()
    else:
        idx = np.argpartition(scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, idx, axis=1).max(axis=1, keepdims=True)
        # Where more than k scores are <= the k-th, the partition may have kept a tied higher column.
        tied = np.flatnonzero(np.count_nonzero(scores <= kth, axis=1) > k)
        for r in tied:
            idx[r] = np.lexsort((np.arange(cols), scores[r]))[:k]
    best = np.take_along_axis(scores, idx, axis=1)
    if k > 1:
        order = np.lexsort((idx, best), axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        best = np.take_along_axis(best, order, axis=1)
    return best, idx.astype(np.int64) + offset


def _merge(best_s, best_i, blk_s, blk_i, k):
    """Running k best merged with a later key block's (higher indices): ties keep the lower index."""
    if k == 1:
        better = blk_s < best_s
        return np.where(better, blk_s, best_s), np.where(better, blk_i, best_i)
    s = np.concatenate([best_s, blk_s], axis=1)
    i = np.concatenate([best_i, blk_i], axis=1)
    order = np.lexsort((i, s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def _finish(scores, idx, q, metric):
    if metric == "l2":
        dist = np.maximum(scores + np.einsum("ij,ij->i", q, q)[:, None], 0.0)
    elif metric == "cosine":
        dist = 1.0 + scores
    else:
        dist = scores
    return dist.astype(np.float32), idx.astype(np.int32)


def _blas_scores(q, x, metric, block_size, key_block_size):
    """Yields (row slice, key offset, scores) blocks; scores follow the module docstring."""
    n, m = q.shape[0], x.shape[0]
    if key_block_size is None and block_size is not None:
        key_block_size = max(1, _MAX_BLOCK_ELEMENTS // block_size)  # as the XLA kernel's key blocks
    key_block = min(m, key_block_size or _MAX_KEY_BLOCK)
    if block_size is None:
        block_size = max(8, min(1024, _BLOCK_ELEMENTS // max(key_block, 1)))
    scale = x.dtype.type(-2.0 if metric == "l2" else -1.0)
    key_sq = np.einsum("ij,ij->i", x, x) if metric == "l2" else None
    for start in range(0, n, block_size):
        rows = slice(start, min(start + block_size, n))
        # Scaling by a power of two is exact, and a query block is small: the keys are never copied.
        qs = q[rows] * scale
        for k0 in range(0, m, key_block):
            k1 = min(k0 + key_block, m)
            s = qs @ x[k0:k1].T
            if key_sq is not None:
                s += key_sq[k0:k1]
            yield rows, k0, s


def _search(
    q, x, *, k: int, metric: str, block_size: int | None, key_block_size: int | None = None
):
    """Ranking scores and int64 indices (n, k) of prepared (normalised for cosine) vectors, by (score, index)."""
    n, m = q.shape[0], x.shape[0]
    out_s = np.empty((n, k), q.dtype)
    out_i = np.empty((n, k), np.int64)
    current = None
    for rows, k0, s in _blas_scores(q, x, metric, block_size, key_block_size):
        blk = _lex_smallest(s, min(k, s.shape[1]), offset=k0)
        current = blk if k0 == 0 else _merge(*current, *blk, k)
        if k0 + s.shape[1] == m:
            out_s[rows], out_i[rows] = current
    return out_s, out_i


def _faiss_search(q, x, *, k: int, metric: str, block_size: int | None, key_block_size=None):
    """As :func:`_search`, with faiss finding the candidates (see the module docstring)."""
    faiss = import_faiss()
    q = np.ascontiguousarray(q, np.float32)
    x = np.ascontiguousarray(x, np.float32)
    d = q.shape[1]
    m = x.shape[0]
    c = min(k + _FAISS_EXTRA, m)
    index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    index.add(x)
    fd, cand = index.search(q, c)
    cand = cand.astype(np.int64)
    key_sq = np.einsum("ij,ij->i", x, x)
    q_sq = np.einsum("ij,ij->i", q, q)
    n = q.shape[0]
    scores = np.empty((n, k), np.float32)
    best = np.empty((n, k), np.int64)
    rows = max(1, _BLOCK_ELEMENTS // (c * d))  # the gathered candidates of a block: at most 16 MiB
    for a in range(0, n, rows):
        b = min(a + rows, n)
        dots = np.einsum("nd,ncd->nc", q[a:b], x[cand[a:b]])
        sc = key_sq[cand[a:b]] - 2.0 * dots if metric == "l2" else -dots
        order = np.lexsort((cand[a:b], sc), axis=1)[:, :k]
        scores[a:b] = np.take_along_axis(sc, order, axis=1)
        best[a:b] = np.take_along_axis(cand[a:b], order, axis=1)
    cand = best
    if c < m:
        # faiss's score of its last candidate: every key left out scored at least that in faiss.
        last = fd[:, -1] - q_sq if metric == "l2" else -fd[:, -1]
        # Rounding bound of one float32 score (faiss's or ours): d u |q| |x| per dot product, with margin.
        mult = 2.0 if metric == "l2" else 1.0
        x_max = float(key_sq.max())
        bound = (
            4.0
            * (d + 2)
            * _F32_UNIT
            * (mult * np.sqrt(q_sq * x_max) + (x_max + q_sq) * (metric == "l2"))
        )
        # A key left out can only be among the k nearest (or tie the k-th) within 3 bounds of the k-th.
        redo = np.flatnonzero(last - scores[:, -1] <= 3.0 * bound)
        if redo.size:
            s2, i2 = _search(
                q[redo], x, k=k, metric=metric, block_size=block_size, key_block_size=key_block_size
            )
            scores[redo], cand[redo] = s2, i2
    return scores, cand


def _unique_keys(x: np.ndarray):
    """Distinct rows of ``x`` in order of first occurrence: (unique rows, first index of each, members).

    ``members`` is (num_unique, r) int64: the original indices of each distinct row in ascending order, padded
    with ``m`` (r is the largest multiplicity). Identical keys must get identical scores for the lowest-index
    tie rule, but BLAS kernels compute the columns of one product with different summation orders (edge
    tiles), so the search runs over distinct keys only and identical keys are expanded afterwards. Returns
    ``(x, None, None)`` when all rows are distinct (the common case: checked on the first 4 values of each row,
    then on whole rows for the few that share them).
    """
    m, d = x.shape

    def void(a):  # rows as opaque bytes, with -0.0 turned into 0.0 (equal values, equal bytes)
        a = np.ascontiguousarray(a + a.dtype.type(0.0))
        return a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()

    _, head_inv, head_counts = np.unique(
        void(x[:, : min(d, 4)]), return_inverse=True, return_counts=True
    )
    suspect = np.flatnonzero(head_counts[head_inv.reshape(-1)] > 1)
    if suspect.size == 0:
        return x, None, None
    _, first_local, inv_local = np.unique(void(x[suspect]), return_index=True, return_inverse=True)
    if first_local.size == suspect.size:
        return x, None, None
    rep = np.arange(m)
    rep[suspect] = suspect[first_local[inv_local.reshape(-1)]]  # each row's first identical row
    firsts = np.flatnonzero(rep == np.arange(m))  # ascending: ids in order of first occurrence
    inverse = np.searchsorted(firsts, rep)
    counts = np.bincount(inverse)
    members = np.full((firsts.size, int(counts.max())), m, np.int64)
    by_id = np.argsort(inverse, kind="stable")  # original indices grouped by id, ascending within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members[inverse[by_id], np.arange(m) - starts[inverse[by_id]]] = by_id
    return x[firsts], firsts, members


def _expand(scores, uidx, first, members, k, m):
    """k nearest original keys from the k nearest distinct keys (sorted by score, first index).

    Each of the k entries nearest by (score, index) belongs to one of the k nearest distinct keys: every
    distinct key before its own in (score, first index) order has a member before it.
    """
    if k == 1:
        return scores, first[uidx]
    r = min(members.shape[1], k)  # at most k members of one distinct key can be taken
    cand = members[uidx, :r].reshape(len(uidx), -1)  # (n, k' * r), padded with m
    s = np.where(cand < m, np.repeat(scores, r, axis=1), np.inf)
    order = np.lexsort((cand, s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(cand, order, axis=1)


def knn_host(
    queries,
    keys,
    *,
    k: int,
    metric: str,
    backend: str,
    block_size: int | None = None,
    key_block_size: int | None = None,
):
    """k nearest keys of each query on the host; returns NumPy ((n, k) float32 distances, (n, k) int32 ids).

    Inputs already validated (:func:`pejax.neighbors.check_pair`); ``backend`` is ``"blas"`` or ``"faiss"``.
    """
    queries, keys = np.asarray(queries), np.asarray(keys)
    dtype = np.float32 if backend == "faiss" else _float_dtype(queries, keys)
    q = _prepare(queries, metric, dtype)
    x = _prepare(keys, metric, dtype)
    x, first, members = _unique_keys(x)
    search = _faiss_search if backend == "faiss" else _search
    # Normalised vectors are scored as "ip" (-q.x), as in the XLA kernel.
    scoring = "ip" if metric == "cosine" else metric
    scores, idx = search(
        q,
        x,
        k=min(k, x.shape[0]),
        metric=scoring,
        block_size=block_size,
        key_block_size=key_block_size,
    )
    if first is not None:
        scores, idx = _expand(scores, idx, first, members, k, keys.shape[0])
    return _finish(scores, idx, q, metric)
