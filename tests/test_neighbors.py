import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peak_rss import needs_proc
from _peak_rss import vote_extra_mib
from _reference import knn

import pejax
from pejax import neighbors as nn_mod

# (n, m, d, k, block_size, key_block_size): n not a multiple of the block, m < block, k = m, d = 1, key blocks.
AWKWARD = [
    (37, 5, 1, 1, 8, None),
    (37, 5, 1, 5, 8, None),
    (1001, 300, 7, 3, 100, 128),
    (64, 64, 3, 64, 16, None),
    (13, 1000, 2, 5, None, 256),
    (257, 129, 33, 2, 64, 128),
    (300, 700, 16, 1, 1000, 129),
]


def _data(n, m, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)


def _call(jit, q, x, **kw):
    fn = functools.partial(pejax.nearest_neighbors, **kw)
    return (jax.jit(fn) if jit else fn)(q, x)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("case", AWKWARD)
def test_matches_float64_reference(case, metric, jit):
    n, m, d, k, bs, kbs = case
    q, x = _data(n, m, d, seed=n + m + d)
    out = _call(jit, q, x, k=k, metric=metric, block_size=bs, key_block_size=kbs)
    ref_d, ref_i, full = knn(q, x, k, metric)
    assert out.distances.shape == (n, k) and out.indices.shape == (n, k)
    assert out.distances.dtype == jnp.float32 and out.indices.dtype == jnp.int32
    got_i = np.asarray(out.indices)
    scale = max(1.0, float(np.abs(full).max()))
    np.testing.assert_allclose(np.asarray(out.distances), ref_d, atol=2e-5 * scale, rtol=1e-4)
    # The returned neighbours are truly the k nearest: their float64 distances equal the reference's.
    np.testing.assert_allclose(
        np.take_along_axis(full, got_i, 1), ref_d, atol=2e-5 * scale, rtol=1e-4
    )
    # Distinct neighbours per row.
    assert all(len(set(row)) == k for row in got_i.tolist())
    # Exact id agreement, except where the float64 reference has a near-tie.
    gaps = np.diff(np.sort(full, axis=1)[:, : k + 1], axis=1) if k < m else np.ones((n, 1))
    clear = ((gaps > 1e-5 * scale) | (gaps == 0)).all(axis=1)  # exact ties are decided by index
    np.testing.assert_array_equal(got_i[clear], ref_i[clear])
    if (
        d >= 4
    ):  # in 1-2 dimensions most rows have genuine float32 near-ties; distances are checked above
        assert clear.mean() > 0.9


@pytest.mark.parametrize("key_block_size", [None, 1, 2, 3])
def test_ties_go_to_lowest_index(key_block_size):
    a, b = [1.0, 0.0], [0.0, 1.0]
    keys = jnp.array([b, a, b, a, a, b], jnp.float32)
    queries = jnp.array([a, b], jnp.float32)
    out = pejax.nearest_neighbors(queries, keys, k=3, key_block_size=key_block_size)
    assert out.indices.tolist() == [[1, 3, 4], [0, 2, 5]]


# (m, d, k, key_block_size): many keys (the grouped top-k and group-minimum paths), m not a multiple of the
# 16-key groups, the k answers spread over groups, several key blocks.
TIED_CASES = [
    (203, 3, 1, None),
    (203, 3, 5, None),
    (203, 64, 17, None),
    (517, 8, 4, 128),
    (517, 8, 1, 128),
]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("case", TIED_CASES)
def test_exact_ties_in_many_keys_keep_the_lowest_index_order(case, metric):
    # Small-integer vectors: every score is an exact float32 integer, so the many duplicate keys tie exactly
    # whatever the summation order, and the answer is fixed: ascending score, ties by ascending index.
    m, d, k, kbs = case
    rng = np.random.default_rng(m + d + k)
    distinct = rng.integers(-3, 4, size=(m // 3, d)).astype(np.float32)
    keys = distinct[rng.integers(0, m // 3, size=m)]
    queries = rng.integers(-3, 4, size=(41, d)).astype(np.float32)
    out = pejax.nearest_neighbors(queries, keys, k=k, metric=metric, key_block_size=kbs)
    ref_d, ref_i, _ = knn(queries, keys, k, metric)
    np.testing.assert_array_equal(np.asarray(out.indices), ref_i)
    np.testing.assert_array_equal(np.asarray(out.distances), ref_d.astype(np.float32))


def test_squared_l2_distances():
    out = pejax.nearest_neighbors(jnp.array([[0.0, 0.0]]), jnp.array([[3.0, 4.0]]))
    assert float(out.distances[0, 0]) == pytest.approx(25.0)


def test_ip_prefers_largest_inner_product_and_cosine_ignores_norm():
    q = jnp.array([[1.0, 0.0]])
    x = jnp.array([[1.0, 0.0], [10.0, 1.0]])
    assert pejax.nearest_neighbors(q, x, metric="ip").indices.tolist() == [[1]]
    assert pejax.nearest_neighbors(q, x, metric="cosine").indices.tolist() == [[0]]
    assert float(pejax.nearest_neighbors(q, x, metric="ip").distances[0, 0]) == pytest.approx(-10.0)


def test_float64_and_bfloat16_inputs():
    q, x = _data(50, 40, 8)
    out = pejax.nearest_neighbors(q.astype(np.float64), x.astype(np.float64), k=2)
    np.testing.assert_array_equal(np.asarray(out.indices), knn(q, x, 2, "l2")[1])
    out16 = pejax.nearest_neighbors(jnp.asarray(q, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16))
    assert out16.indices.shape == (50, 1)


def test_compiles_once_per_shape():
    q, x = _data(100, 60, 4)
    pejax.nearest_neighbors(q, x, k=2, block_size=32)
    before = nn_mod._knn._cache_size()
    pejax.nearest_neighbors(q + 1, x - 1, k=2, block_size=32)
    pejax.nearest_neighbors(q * 2, x, k=2, block_size=32)
    assert nn_mod._knn._cache_size() == before


def test_never_materialises_the_full_matrix():
    n, m, d = 1000, 900, 4
    q, x = _data(n, m, d)
    qb, kb = 64, 256
    num_blocks, rows = nn_mod.balanced_block(n, qb)
    jaxpr = jax.make_jaxpr(
        functools.partial(
            nn_mod._knn,
            k=3,
            metric="l2",
            query_block=rows,
            key_block=kb,
            num_query_blocks=num_blocks,
            precision=jax.lax.Precision.HIGHEST,
        )
    )(q, x)

    def sizes(jpr):
        for eqn in jpr.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    yield from sizes(getattr(inner, "jaxpr", inner))

    largest = max(sizes(jaxpr.jaxpr))
    assert largest <= max(rows * kb, n * d, m * d) * 2
    assert largest < n * m


# (n, m, d, k, key_block_size): d large enough that a copy of either input would outweigh the score blocks;
# n not a multiple of the query block; key blocks that do not divide m.
MEMORY_CASES = [(1000, 600, 1024, 1, None), (1000, 600, 1024, 4, None), (1000, 1000, 1024, 1, 384)]


@pytest.mark.parametrize("n,m,d,k,key_block_size", MEMORY_CASES)
def test_kernel_working_memory_is_a_few_score_blocks(n, m, d, k, key_block_size):
    """XLA's own accounting of the compiled vote: its temporaries are at most 3 score blocks (k = 1: the
    matmul output, the biased scores, the column indices of the minimum), one scaled query block and, with
    key blocks, one key block: no scaled or padded copy of the whole queries or keys."""
    vote = jax.jit(functools.partial(pejax.vote_histogram, k=k, key_block_size=key_block_size))
    spec = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((m, d), jnp.float32))
    stats = vote.lower(*spec).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend does not report memory use")
    plan = nn_mod.block_plan(
        n, m, block_size=None, key_block_size=key_block_size, precision="highest"
    )
    block = plan["query_block"] * plan["key_block"] * 4
    assert (
        plan["num_query_blocks"] * plan["query_block"] > n
    )  # the last block overlaps (no padded copy)
    rows, keys = plan["query_block"], plan["key_block"]
    bound = 3 * block + rows * d * 4 + (keys * d * 4 if keys < m else 0) + (1 << 16)
    assert stats.temp_size_in_bytes <= bound, (stats.temp_size_in_bytes, block)


@pytest.mark.parametrize(
    "n,m",
    [
        (2000, 2000),
        (10000, 10000),
        (20000, 20000),
        (200000, 50000),
        (65536, 100000),
        (300, 200000),
        (5, 3000000),
    ],
)
def test_default_score_block_is_bounded(n, m):
    plan = nn_mod.block_plan(n, m, block_size=None, key_block_size=None, precision="highest")
    rows, keys = plan["query_block"], plan["key_block"]
    assert (
        rows * keys <= (1 << 23) * 1.05
    )  # 32 MiB of float32 (rounding to 8 rows and 128 keys aside)
    assert (
        rows >= min(n, 256) // 2
    )  # keys are blocked before query rows get thin (balanced: >= half)
    assert keys == m or keys % 128 == 0
    if keys < m:  # balanced key blocks: the last one, shifted back to end at m, re-reads few keys
        blocks = -(-m // keys)
        assert blocks * keys - m < 128 * blocks


@pytest.mark.parametrize("n,block", [(1000, 256), (1025, 1024), (5, 8), (4097, 2048)])
def test_balanced_blocks_pad_little(n, block):
    num_blocks, rows = nn_mod.balanced_block(n, block)
    assert num_blocks * rows >= n
    assert rows <= max(block, 8)
    assert num_blocks * rows - n < 8 * num_blocks


BAD = [
    (lambda q, x: (q.at[3, 1].set(jnp.nan), x), {}, ValueError, "NaN or Inf"),
    (lambda q, x: (q, x.at[0, 0].set(jnp.inf)), {}, ValueError, "synthetic|keys"),
    (lambda q, x: (q[:, :3], x), {}, ValueError, "same embedding dimension"),
    (lambda q, x: (q, x), {"k": 11}, ValueError, "k=11 exceeds"),
    (lambda q, x: (q, x), {"k": 0}, ValueError, "k must be"),
    (lambda q, x: (q, x), {"k": 1.5}, TypeError, "k must be an integer"),
    (lambda q, x: (q[:0], x), {}, ValueError, "must not be empty"),
    (lambda q, x: (q, x[:, :0]), {}, ValueError, "must not be empty"),
    (lambda q, x: (q, x), {"metric": "euclid"}, ValueError, "metric must be one of"),
    (lambda q, x: (q[0], x), {}, ValueError, "2-D array"),
    (lambda q, x: (q.astype(jnp.int32), x), {}, TypeError, "floating dtype"),
    (lambda q, x: (q, x), {"block_size": 0}, ValueError, "block_size"),
]


@pytest.mark.parametrize("mutate,kwargs,exc,match", BAD)
def test_bad_inputs_raise_clear_errors(mutate, kwargs, exc, match):
    q, x = _data(20, 10, 4)
    q, x = mutate(jnp.asarray(q), jnp.asarray(x))
    with pytest.raises(exc, match=match):
        pejax.nearest_neighbors(q, x, **kwargs)


@needs_proc
def test_aligned_numpy_inputs_are_used_in_place():
    """64-byte-aligned float32 inputs reach the CPU device without a copy: the vote's extra resident memory
    (in a fresh process, peak RSS reset just before the call) stays well below the inputs' 47 MiB. The same
    inputs 16 bytes off alignment are copied (the reference run shows the measurement can see a copy)."""
    inputs_mib = 2 * 1500 * 4096 * 4 / 2**20

    def extra(offset):
        return vote_extra_mib(
            "from _peak_rss import offset_array\n"
            f"private = offset_array(1500, 4096, {offset}, seed=1)\n"
            f"synthetic = offset_array(1500, 4096, {offset}, seed=2)\n"
        )

    in_place, copied = extra(0), extra(16)
    assert in_place < 0.4 * inputs_mib, (in_place, copied)
    assert copied > 0.8 * inputs_mib, (in_place, copied)
