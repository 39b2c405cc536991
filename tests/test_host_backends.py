"""The host CPU backends of the exact search (backend="blas" and "faiss") against float64 and the XLA kernel."""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import counter_histogram
from _reference import group_histogram
from _reference import knn

import pejax
from pejax.config import SpeedConfig
from pejax.config import speed_from_dict
from pejax.streaming import streamed_lattice_vote_histogram
from pejax.streaming import streamed_vote_histogram
from pejax.votes import lattice_vote_histogram

HAVE_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = [
    "blas",
    pytest.param("faiss", marks=pytest.mark.skipif(not HAVE_FAISS, reason="needs pejax[faiss]")),
]
# (n, m, d, k, block_size, key_block_size): n not a multiple of the block, m < block, k = m, d = 1, key blocks.
AWKWARD = [
    (37, 5, 1, 1, 8, None),
    (37, 5, 1, 5, 8, None),
    (1001, 300, 7, 3, 100, 128),
    (64, 64, 3, 64, 16, None),
    (13, 1000, 2, 5, None, 256),
    (257, 129, 33, 2, 64, 128),
    (300, 700, 16, 1, 1000, 129),
    (240, 20, 2048, 2, None, None),  # high d: the faiss re-scoring runs in row blocks
]


def _data(n, m, d, seed, duplicates=False):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, d)).astype(np.float32)
    x = rng.normal(size=(m, d)).astype(np.float32)
    if duplicates:
        # Every key of the second half repeats one of the first: exact ties, decided by the lowest index.
        half = m // 2
        x[half:] = x[rng.integers(0, max(half, 1), m - half)]
    return q, x


def _check_against_float64(q, x, k, metric, got_d, got_i):
    n, m = q.shape[0], x.shape[0]
    ref_d, ref_i, full = knn(q, x, k, metric)
    scale = max(1.0, float(np.abs(full).max()))
    np.testing.assert_allclose(got_d, ref_d, atol=2e-5 * scale, rtol=1e-4)
    np.testing.assert_allclose(
        np.take_along_axis(full, got_i, 1), ref_d, atol=2e-5 * scale, rtol=1e-4
    )
    assert all(len(set(row)) == k for row in got_i.tolist())
    gaps = np.diff(np.sort(full, axis=1)[:, : k + 1], axis=1) if k < m else np.ones((n, 1))
    clear = ((gaps > 1e-5 * scale) | (gaps == 0)).all(axis=1)  # exact ties are decided by index
    np.testing.assert_array_equal(got_i[clear], ref_i[clear])
    return clear


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("case", AWKWARD)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference_and_xla(backend, case, metric, duplicates):
    n, m, d, k, bs, kbs = case
    q, x = _data(n, m, d, seed=n + m + d, duplicates=duplicates)
    out = pejax.nearest_neighbors(
        q, x, k=k, metric=metric, block_size=bs, key_block_size=kbs, backend=backend
    )
    assert out.distances.shape == (n, k) and out.indices.shape == (n, k)
    assert out.distances.dtype == jnp.float32 and out.indices.dtype == jnp.int32
    got_i = np.asarray(out.indices)
    clear = _check_against_float64(q, x, k, metric, np.asarray(out.distances), got_i)
    # And the XLA backend: the same ids wherever float64 has no near-tie.
    xla = np.asarray(pejax.nearest_neighbors(q, x, k=k, metric=metric, block_size=bs).indices)
    np.testing.assert_array_equal(got_i[clear], xla[clear])
    if d >= 4:
        assert clear.mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_block_size", [None, 1, 2, 3])
def test_ties_go_to_lowest_index(backend, key_block_size):
    a, b = [1.0, 0.0], [0.0, 1.0]
    keys = np.array([b, a, b, a, a, b], np.float32)
    queries = np.array([a, b], np.float32)
    out = pejax.nearest_neighbors(
        queries, keys, k=3, key_block_size=key_block_size, backend=backend
    )
    assert out.indices.tolist() == [[1, 3, 4], [0, 2, 5]]
    # Scaled copies tie under cosine: the lowest index still wins, and k = 1 takes it.
    keys2 = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 0.0]], np.float32)
    out = pejax.nearest_neighbors(queries, keys2, k=2, metric="cosine", backend=backend)
    assert out.indices.tolist() == [[0, 2], [1, 0]]
    out = pejax.nearest_neighbors(queries[:1], keys2, k=1, metric="cosine", backend=backend)
    assert out.indices.tolist() == [[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_bfloat16_inputs(backend):
    q, x = _data(50, 40, 8, seed=1)
    out = pejax.nearest_neighbors(q.astype(np.float64), x.astype(np.float64), k=2, backend=backend)
    np.testing.assert_array_equal(np.asarray(out.indices), knn(q, x, 2, "l2")[1])
    q16, x16 = jnp.asarray(q, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
    out16 = pejax.nearest_neighbors(q16, x16, backend=backend)
    ref = pejax.nearest_neighbors(q16, x16)
    np.testing.assert_array_equal(np.asarray(out16.indices), np.asarray(ref.indices))


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_votes_and_lattice_votes(backend, k, metric):
    n, m, d = 301, 97, 12
    q, x = _data(n, m, d, seed=7, duplicates=True)
    hist = pejax.vote_histogram(q, x, k=k, metric=metric, backend=backend, block_size=64)
    ids = pejax.nearest_neighbors(q, x, k=k, metric=metric, backend=backend).indices
    np.testing.assert_allclose(np.asarray(hist), counter_histogram(ids, m, k), rtol=1e-6)
    xla = pejax.vote_histogram(q, x, k=k, metric=metric)
    # Near-ties (none expected at d = 12 with this seed) could move at most a few votes.
    assert np.abs(np.asarray(hist) - np.asarray(xla)).sum() <= 2 * 2 / np.sqrt(k) + 1e-6
    lat = lattice_vote_histogram(q, x, k=k, metric=metric, backend=backend)
    assert lat.counts.dtype == np.int64 and lat.unit_changes == k
    np.testing.assert_allclose(lat.counts * lat.scale, np.asarray(hist), rtol=1e-6)
    lat_xla = lattice_vote_histogram(q, x, k=k, metric=metric)
    assert np.abs(lat.counts - lat_xla.counts).sum() <= 4
    # User level.
    groups = np.random.default_rng(3).integers(0, 40, n)
    hist_g = pejax.vote_histogram(q, x, k=k, metric=metric, group_ids=groups, backend=backend)
    np.testing.assert_allclose(
        np.asarray(hist_g), group_histogram(np.asarray(ids), groups, m, k), rtol=1e-5, atol=1e-6
    )
    lat_g = lattice_vote_histogram(q, x, k=k, metric=metric, group_ids=groups, backend=backend)
    lat_g_xla = lattice_vote_histogram(q, x, k=k, metric=metric, group_ids=groups)
    if np.array_equal(
        np.asarray(ids), np.asarray(pejax.nearest_neighbors(q, x, k=k, metric=metric).indices)
    ):
        np.testing.assert_array_equal(lat_g.counts, lat_g_xla.counts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_host_backend_equals_in_memory(tmp_path, backend):
    q, x = _data(203, 31, 6, seed=5, duplicates=True)
    path = tmp_path / "private.npy"
    np.save(path, q)
    want = np.asarray(pejax.vote_histogram(q, x, k=2))
    got = streamed_vote_histogram(str(path), x, k=2, chunk_rows=50, backend=backend)
    np.testing.assert_array_equal(np.asarray(got), want)
    lat = streamed_lattice_vote_histogram(str(path), x, k=2, chunk_rows=64, backend=backend)
    np.testing.assert_array_equal(lat.counts, lattice_vote_histogram(q, x, k=2).counts)
    groups = np.arange(203) % 17
    got_g = streamed_lattice_vote_histogram(
        str(path), x, k=2, chunk_rows=64, group_ids=groups, backend=backend
    )
    np.testing.assert_array_equal(
        got_g.counts, lattice_vote_histogram(q, x, k=2, group_ids=groups).counts
    )


def test_bad_backend_arguments(monkeypatch):
    q, x = _data(5, 4, 3, seed=0)
    with pytest.raises(ValueError, match=r"backend.*'cuda'"):
        pejax.nearest_neighbors(q, x, backend="cuda")
    with pytest.raises(ValueError, match=r"backend.*'BLAS'"):
        pejax.vote_histogram(q, x, backend="BLAS")
    with pytest.raises(
        ValueError, match="precision='bfloat16' is not supported with backend='blas'"
    ):
        lattice_vote_histogram(q, x, backend="blas", precision="bfloat16")
    with pytest.raises(ValueError, match=r"inside jax\.jit"):
        jax.jit(lambda a, b: pejax.vote_histogram(a, b, backend="blas"))(q, x)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        pejax.nearest_neighbors(q, x, backend="blas", block_size=0)
    with pytest.raises(ValueError, match=r"k=5 exceeds"):
        pejax.nearest_neighbors(q, x, k=5, backend="blas")
    with pytest.raises(ValueError, match="backend"):
        streamed_vote_histogram(q, x, backend="gpu")
    # A missing faiss names the extra to install.
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pejax\[faiss\]"):
        pejax.vote_histogram(q, x, backend="faiss")


def test_speed_config_backend():
    assert SpeedConfig().backend == "xla"
    assert speed_from_dict({"backend": "faiss"}) == SpeedConfig(backend="faiss")
    assert SpeedConfig(backend="blas").backend == "blas"
    with pytest.raises(ValueError, match=r"speed.backend.*'numpy'"):
        SpeedConfig(backend="numpy")
    with pytest.raises(ValueError, match=r"speed\.precision='highest'"):
        SpeedConfig(backend="blas", precision="bfloat16")
    with pytest.raises(ValueError, match="device mesh"):
        SpeedConfig(backend="blas", devices=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_sharing_leading_values_are_not_merged(backend):
    # Rows 0, 2 and 3 agree on their first 5 values (the duplicate check's first look) but differ after;
    # rows 1 and 4 are identical (the lowest index wins).
    x = np.zeros((5, 7), np.float32)
    x[:, 5] = [1.0, 4.0, 2.0, 3.0, 4.0]
    x[1, :5] = x[4, :5] = 1.0
    q = np.array(
        [[0, 0, 0, 0, 0, 1.1, 0], [1, 1, 1, 1, 1, 4, 0], [0, 0, 0, 0, 0, 2.9, 0]], np.float32
    )
    out = pejax.nearest_neighbors(q, x, k=2, backend=backend)
    assert out.indices.tolist() == [[0, 2], [1, 4], [3, 2]]
    np.testing.assert_allclose(np.asarray(out.distances), knn(q, x, 2, "l2")[0], atol=1e-5)
