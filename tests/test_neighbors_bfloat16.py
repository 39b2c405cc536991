"""The bfloat16 search with its exact float32 re-check (``precision="bfloat16"``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import counter_histogram
from _reference import group_histogram
from _reference import knn

import pejax
from pejax import neighbors as nn_mod
from pejax.sharding import sharded_vote_histogram
from pejax.streaming import streamed_vote_histogram


def _clear_rows(full, k, scale):
    """Rows whose float64 top-k is decided by more than float32 rounding."""
    if k >= full.shape[1]:
        return np.ones(full.shape[0], bool)
    gaps = np.diff(np.sort(full, axis=1)[:, : k + 1], axis=1)
    return ((gaps > 1e-5 * scale) | (gaps == 0)).all(axis=1)


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize(
    "n, m, d, k, block_size, key_block_size",
    [(37, 5, 3, 2, 8, None), (301, 257, 33, 3, 64, 128), (129, 1000, 130, 1, None, 256)],
)
def test_matches_float64_reference(metric, n, m, d, k, block_size, key_block_size):
    rng = np.random.default_rng(n + m + d)
    q = rng.normal(size=(n, d)).astype(np.float32)
    x = rng.normal(size=(m, d)).astype(np.float32)
    out = pejax.nearest_neighbors(
        q,
        x,
        k=k,
        metric=metric,
        precision="bfloat16",
        block_size=block_size,
        key_block_size=key_block_size,
    )
    ref_d, ref_i, full = knn(q, x, k, metric)
    assert out.distances.dtype == jnp.float32 and out.indices.dtype == jnp.int32
    scale = max(1.0, float(np.abs(full).max()))
    # Distances are float32-exact (re-scored), not bfloat16-rounded.
    np.testing.assert_allclose(np.asarray(out.distances), ref_d, atol=2e-5 * scale, rtol=1e-4)
    clear = _clear_rows(full, k, scale)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(out.indices)[clear], ref_i[clear])


def _near_tie_data(seed, n=400, m=300, d=64, spread=1e-2):
    """Keys in pairs closer together than bfloat16 can resolve (float32 can), so bfloat16 alone often errs."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(m // 2, d))
    keys = np.concatenate([base, base + spread * rng.normal(size=base.shape)]).astype(np.float32)
    queries = (base[rng.integers(m // 2, size=n)] + 0.05 * rng.normal(size=(n, d))).astype(
        np.float32
    )
    return queries, keys


@pytest.mark.parametrize("extra", [0, 1, 16])
def test_recheck_makes_near_ties_exact(extra):
    q, x = _near_tie_data(seed=extra)
    _, ref_i, full = knn(q, x, 1, "l2")
    # bfloat16 alone (no re-check) gets many rows wrong: the test exercises the re-check.
    wrong16 = np.asarray(
        pejax.nearest_neighbors(
            jnp.asarray(q, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16), precision="default"
        ).indices
    )
    assert (wrong16 != ref_i).mean() > 0.03
    out, rechecked = nn_mod.knn_bfloat16(q, x, k=1, metric="l2", extra_candidates=extra)
    if extra == 0:
        assert (
            rechecked > 0
        )  # each pair's twin is outside the single candidate: rows must be re-searched
    clear = _clear_rows(full, 1, float(np.abs(full).max()))
    assert clear.mean() > 0.7
    np.testing.assert_array_equal(np.asarray(out.indices)[clear], ref_i[clear])
    exact = np.asarray(pejax.nearest_neighbors(q, x).indices)
    np.testing.assert_array_equal(np.asarray(out.indices)[clear], exact[clear])


def test_certificate_is_sound_on_every_row():
    """No certified row is wrong, with a single spare candidate, over several data sets."""
    for seed in range(5):
        q, x = _near_tie_data(seed, n=300, m=400, d=40, spread=5e-3)
        res, certified = nn_mod._knn_bfloat16_certified(
            q, x, k=2, candidates=3, metric="l2", query_block=300, key_block=400, num_query_blocks=1
        )
        _, ref_i, full = knn(q, x, 2, "l2")
        clear = _clear_rows(full, 2, float(np.abs(full).max()))
        ok = np.asarray(certified) & clear
        assert 0 < ok.sum() < len(ok)  # both kinds of row occur
        got = np.sort(np.asarray(res.indices)[ok], axis=1)
        np.testing.assert_array_equal(got, np.sort(ref_i[ok], axis=1))


def test_all_candidates_means_certified():
    q, x = _near_tie_data(seed=3, n=20, m=10)
    out, rechecked = nn_mod.knn_bfloat16(q, x, k=2, metric="cosine", extra_candidates=8)
    assert rechecked == 0
    np.testing.assert_array_equal(
        np.asarray(out.indices),
        np.asarray(pejax.nearest_neighbors(q, x, k=2, metric="cosine").indices),
    )


@pytest.mark.parametrize("grouped", [False, True])
def test_vote_histogram_bfloat16_equals_float32(grouped):
    q, x = _near_tie_data(seed=7, n=250, m=120, d=24)
    groups = np.arange(250) % 37 if grouped else None
    hist16 = pejax.vote_histogram(q, x, k=3, group_ids=groups, precision="bfloat16")
    hist32 = pejax.vote_histogram(q, x, k=3, group_ids=groups)
    np.testing.assert_array_equal(np.asarray(hist16), np.asarray(hist32))
    _, ref_i, _ = knn(q, x, 3, "l2")
    ref = group_histogram(ref_i, groups, 120, 3) if grouped else counter_histogram(ref_i, 120, 3)
    np.testing.assert_allclose(np.asarray(hist16), ref, rtol=1e-5, atol=1e-5)


def test_refused_where_unsupported():
    q, x = _near_tie_data(seed=1, n=16, m=8, d=4)
    with pytest.raises(ValueError, match=r"inside jax\.jit"):
        jax.jit(lambda a, b: pejax.nearest_neighbors(a, b, precision="bfloat16").indices)(q, x)
    with pytest.raises(ValueError, match="not supported by streamed_vote_histogram"):
        streamed_vote_histogram(q, x, precision="bfloat16")
    with pytest.raises(ValueError, match="not supported by sharded_vote_histogram"):
        sharded_vote_histogram(q, x, mesh=jax.make_mesh((1,), ("data",)), precision="bfloat16")
    with pytest.raises(ValueError, match="precision"):
        pejax.nearest_neighbors(q, x, precision="float8")
    with pytest.raises(ValueError, match="extra_candidates"):
        nn_mod.knn_bfloat16(q, x, k=1, metric="l2", extra_candidates=-1)
    bad = q.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"queries contains NaN or Inf .*first in row 3"):
        nn_mod.knn_bfloat16(bad, x, k=1, metric="l2")
    with pytest.raises(ValueError, match=r"k=9 exceeds the number of keys"):
        nn_mod.knn_bfloat16(q, x, k=9, metric="l2")
