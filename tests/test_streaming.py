import doctest
import os
import stat
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import pejax
from pejax import streaming
from pejax.streaming import PrivateDataOnDiskWarning
from pejax.streaming import embed_to_memmap
from pejax.streaming import streamed_vote_histogram


def _data(n=1001, m=37, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)


def _embed(x, path, **kwargs):
    with pytest.warns(PrivateDataOnDiskWarning, match="PRIVATE data"):
        return embed_to_memmap(x, lambda b: b, path, dim=x.shape[1], **kwargs)


@pytest.fixture(scope="module")
def npy(tmp_path_factory):
    private, synthetic = _data()
    path = tmp_path_factory.mktemp("stream") / "private.npy"
    _embed(private, path, batch_size=128)
    return path, private, synthetic


class _Recorder:
    """An array-like that records the rows each read asks for."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

    def __getitem__(self, item):
        self.reads.append(item)
        return self.x[item]


@pytest.mark.parametrize(
    "metric,k,chunk_rows", [("l2", 1, 300), ("cosine", 3, 1001), ("ip", 2, 64), ("l2", 4, 5000)]
)
def test_streamed_equals_vote_histogram(npy, metric, k, chunk_rows):
    path, private, synthetic = npy
    ref = np.asarray(pejax.vote_histogram(private, synthetic, k=k, metric=metric))
    idx = np.asarray(pejax.nearest_neighbors(private, synthetic, k=k, metric=metric).indices)
    counts = np.bincount(idx.ravel(), minlength=len(synthetic))
    for source in (path, str(path), np.load(path, mmap_mode="r"), private):
        got = np.asarray(
            streamed_vote_histogram(source, synthetic, chunk_rows=chunk_rows, k=k, metric=metric)
        )
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_array_equal(np.rint(got * np.sqrt(k)).astype(int), counts)  # same votes
        np.testing.assert_array_equal(got, counts.astype(np.float32) * np.float32(1 / np.sqrt(k)))
        if k == 1:
            np.testing.assert_array_equal(got, ref)
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("metric,k", [("l2", 1), ("cosine", 3)])
def test_streamed_user_level_is_bit_exact(npy, metric, k):
    path, private, synthetic = npy
    groups = np.random.default_rng(2).integers(0, 80, size=len(private)) * 5 - 17  # spanning chunks
    ref = pejax.vote_histogram(private, synthetic, k=k, metric=metric, group_ids=groups)
    got = streamed_vote_histogram(
        path, synthetic, chunk_rows=200, k=k, metric=metric, group_ids=groups
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("k,key_chunk_rows", [(1, 7), (3, 7), (4, 36), (2, 2)])
def test_key_chunks_give_the_same_votes(npy, k, key_chunk_rows):
    """The synthetic side read in key chunks (awkward sizes: 37 keys in chunks of 7, 36, 2) votes exactly as one
    search over all keys, at sample and user level and as lattice votes."""
    path, private, synthetic = npy
    kw = dict(k=k, chunk_rows=300, key_chunk_rows=key_chunk_rows)
    ref = pejax.vote_histogram(private, jnp.asarray(synthetic), k=k)
    for source in (path, private):
        np.testing.assert_array_equal(
            np.asarray(streamed_vote_histogram(source, synthetic, **kw)), np.asarray(ref)
        )
    groups = np.random.default_rng(3).integers(0, 90, size=len(private))
    ref = pejax.vote_histogram(private, jnp.asarray(synthetic), k=k, group_ids=groups)
    got = streamed_vote_histogram(path, synthetic, group_ids=groups, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    lattice = streaming.streamed_lattice_vote_histogram(path, synthetic, **kw)
    ref = pejax.votes.lattice_vote_histogram(private, jnp.asarray(synthetic), k=k)
    np.testing.assert_array_equal(lattice.counts, ref.counts)
    assert lattice.scale == ref.scale


@pytest.mark.parametrize("k", [1, 3])
def test_key_chunks_keep_ties_with_the_lowest_index(k):
    """Small-integer vectors: many keys tie exactly, also across key chunks (39 keys in chunks of 5). The votes
    are those of one search, where ties go to the lowest index."""
    rng = np.random.default_rng(5)
    private = rng.integers(0, 3, size=(60, 2)).astype(np.float32)
    synthetic = rng.integers(0, 3, size=(39, 2)).astype(np.float32)
    ref = pejax.vote_histogram(private, jnp.asarray(synthetic), k=k)
    got = streamed_vote_histogram(private, synthetic, k=k, chunk_rows=16, key_chunk_rows=5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_key_chunk_errors():
    private, synthetic = _data(n=50, m=10, d=4)
    with pytest.raises(ValueError, match="key_chunk_rows=2 is below k=3"):
        streamed_vote_histogram(private, synthetic, k=3, key_chunk_rows=2)
    with pytest.raises(ValueError, match="key_chunk_rows=4 applies to backend='xla'"):
        streamed_vote_histogram(private, synthetic, key_chunk_rows=4, backend="blas")
    with pytest.raises(ValueError, match="key_chunk_rows must be"):
        streamed_vote_histogram(private, synthetic, key_chunk_rows=0)
    synthetic[7, 2] = np.inf
    with pytest.raises(ValueError, match=r"synthetic contains NaN or Inf \(first in row 7\)"):
        streamed_vote_histogram(private, synthetic, key_chunk_rows=4)


def test_reads_are_bounded_and_kernel_compiles_once():
    private, synthetic = _data(n=700, m=29, d=3, seed=4)
    source = _Recorder(private)
    before = streaming._count_chunk._cache_size()
    h = streamed_vote_histogram(source, synthetic, chunk_rows=96, k=2)
    # 8 chunks, the last one padded: one shape, one compilation.
    assert streaming._count_chunk._cache_size() - before <= 1
    assert [s.start for s in source.reads] == list(range(0, 700, 96))  # every row read once ...
    assert all(s.stop - s.start <= 96 for s in source.reads)  # ... at most a chunk at a time
    after = streaming._count_chunk._cache_size()
    streamed_vote_histogram(private[:500], synthetic, chunk_rows=96, k=2)
    assert streaming._count_chunk._cache_size() == after  # same chunk shape: no recompilation
    assert float(h.sum()) == pytest.approx(700 * np.sqrt(2), rel=1e-6)


def test_nonfinite_chunk_names_the_absolute_row(tmp_path):
    private, synthetic = _data(n=500, m=10, d=4)
    private[345, 1] = np.nan
    path = tmp_path / "p.npy"
    np.save(path, private)
    for source in (path, private):
        with pytest.raises(ValueError, match=r"private contains NaN or Inf \(first in row 345\)"):
            streamed_vote_histogram(source, synthetic, chunk_rows=100)


def test_nonfinite_check_sees_inf_and_overflow_alike(tmp_path):
    """The chunk check proves finiteness from a sum: an Inf is still found, and huge finite values whose sum
    overflows are searched row by row and accepted, not refused."""
    private, synthetic = _data(n=300, m=10, d=4)
    private[:, 0] = 2e36  # finite, but their sum (6e38) overflows float32
    path = tmp_path / "big.npy"
    np.save(path, private)
    hist = np.asarray(streamed_vote_histogram(path, synthetic, chunk_rows=128))
    np.testing.assert_array_equal(hist, np.asarray(pejax.vote_histogram(private, synthetic)))
    private[257, 3] = -np.inf
    np.save(path, private)
    with pytest.raises(ValueError, match=r"first in row 257\)"):
        streamed_vote_histogram(path, synthetic, chunk_rows=128)


def test_default_chunk_is_16_mib_of_rows(tmp_path):
    private, synthetic = _data(n=20000, m=20, d=256)
    path = tmp_path / "p.npy"
    np.save(path, private)
    reader = _Recorder(private)
    got = np.asarray(streamed_vote_histogram(reader, synthetic))
    assert [r.stop - r.start for r in reader.reads] == [16384, 20000 - 16384]
    np.testing.assert_array_equal(got, np.asarray(streamed_vote_histogram(path, synthetic)))
    np.testing.assert_array_equal(got, np.asarray(pejax.vote_histogram(private, synthetic)))


def test_bad_files_and_arguments(tmp_path):
    private, synthetic = _data(n=50, m=10, d=4)
    truncated = tmp_path / "t.npy"
    np.save(truncated, private)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 10)
    with pytest.raises(ValueError, match="is truncated"):
        streamed_vote_histogram(truncated, synthetic, chunk_rows=16)
    fortran = tmp_path / "f.npy"
    np.save(fortran, np.asfortranarray(private))
    with pytest.raises(ValueError, match="Fortran"):
        streamed_vote_histogram(fortran, synthetic)
    text = tmp_path / "x.npy"
    text.write_text("not an array")
    with pytest.raises(ValueError, match=r"is not a \.npy file"):
        streamed_vote_histogram(text, synthetic)
    with pytest.raises(TypeError, match="floating dtype"):
        streamed_vote_histogram(private.astype(np.int32), synthetic)
    with pytest.raises(ValueError, match="same embedding dimension"):
        streamed_vote_histogram(private[:, :3], synthetic)
    with pytest.raises(ValueError, match="k=11 exceeds"):
        streamed_vote_histogram(private, synthetic, k=11)
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1"):
        streamed_vote_histogram(private, synthetic, chunk_rows=0)
    with pytest.raises(ValueError, match="metric must be one of"):
        streamed_vote_histogram(private, synthetic, metric="manhattan")
    with pytest.raises(ValueError, match="group_ids must have shape"):
        streamed_vote_histogram(private, synthetic, group_ids=np.arange(3))
    with pytest.raises(ValueError, match="private must not be empty"):
        streamed_vote_histogram(private[:0], synthetic)


def test_embed_to_memmap_writes_an_owner_only_npy(tmp_path):
    x = np.random.default_rng(0).normal(size=(103, 6))
    path = tmp_path / "emb.npy"
    emb = _embed(x, path, batch_size=10)
    assert isinstance(emb, np.memmap) and emb.shape == (103, 6) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, x.astype(np.float32))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not path.with_name("emb.npy.partial").exists()
    # An iterable of batches, with the embedding function doing real work.
    batches = (x[i : i + 7] for i in range(0, 103, 7))
    with pytest.warns(PrivateDataOnDiskWarning):
        emb2 = embed_to_memmap(
            batches, lambda b: np.tanh(b[:, :2]), tmp_path / "it.npy", dim=2, num_rows=103
        )
    np.testing.assert_allclose(emb2, np.tanh(x[:, :2]), rtol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        embed_to_memmap(x, lambda b: b, path, dim=6, batch_size=10)
    emb3 = _embed(x[:4], path, batch_size=3, overwrite=True)
    assert emb3.shape == (4, 6)


def test_embed_to_memmap_errors_leave_no_partial_file(tmp_path):
    x = np.ones((20, 3))
    path = tmp_path / "e.npy"

    def nan_at_13(b, offset=[0]):  # noqa: B006  (counts rows across calls)
        out = np.array(b, np.float32)
        for r in range(len(b)):
            if offset[0] + r == 13:
                out[r, 0] = np.nan
        offset[0] += len(b)
        return out

    cases = [
        (dict(data=x, fn=nan_at_13, batch_size=5), ValueError, "NaN or Inf for row 13"),
        (dict(data=x, fn=lambda b: b[:, :2], batch_size=5), ValueError, r"to shape \(5, 3\)"),
        (dict(data=x, fn=lambda b: b.astype(int), batch_size=5), TypeError, "floating"),
        (
            dict(data=iter([x[:5]] * 5), fn=lambda b: b, num_rows=20),
            ValueError,
            "more than num_rows",
        ),
        (dict(data=iter([x[:5]] * 3), fn=lambda b: b, num_rows=20), ValueError, "held 15 inputs"),
    ]
    for kwargs, error, match in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrivateDataOnDiskWarning)
            with pytest.raises(error, match=match):
                embed_to_memmap(kwargs.pop("data"), kwargs.pop("fn"), path, dim=3, **kwargs)
        assert not path.exists() and not path.with_name("e.npy.partial").exists()
    with pytest.raises(ValueError, match="batch_size is required"):
        embed_to_memmap(x, lambda b: b, path, dim=3)
    with pytest.raises(ValueError, match="num_rows is required"):
        embed_to_memmap(iter([x]), lambda b: b, path, dim=3)
    with pytest.raises(ValueError, match="batch_size only applies"):
        embed_to_memmap(iter([x]), lambda b: b, path, dim=3, num_rows=20, batch_size=4)
    with pytest.raises(TypeError, match="embedding_fn must be callable"):
        embed_to_memmap(x, None, path, dim=3, batch_size=4)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        embed_to_memmap(x, lambda b: b, path, dim=0, batch_size=4)


def test_warning_is_a_pejax_warning():
    assert issubclass(PrivateDataOnDiskWarning, pejax.PejaxWarning)


def test_docstring_examples():
    result = doctest.testmod(streaming, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("user_level", [False, True])
def test_runner_streams_private_embeddings_like_in_memory(tmp_path, user_level):
    """PrivateEvolution.run(private_stream=...) votes each class's rows of the file in chunks: the released data
    equal the in-memory run's (same public and reproducible noise keys)."""
    import jax
    from _toy import ToyGenerator
    from _toy import flat
    from _toy import private_data

    from pejax import PEConfig
    from pejax import PrivacyConfig
    from pejax import PrivateEvolution

    x, y = private_data()
    path = tmp_path / "private.npy"
    np.save(path, np.asarray(flat(x)))
    groups = (y * 1000 + np.arange(len(y)) // 3) if user_level else None
    privacy = PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=1, user_level=user_level)
    pe = PEConfig(num_classes=3, samples_per_iteration=24, iterations=2, k=2)

    def run(images, **kw):
        runner = PrivateEvolution(generator=ToyGenerator(), embedding=flat, pe=pe, privacy=privacy)
        return runner.run(jax.random.key(0), images, y, group_ids=groups, **kw)

    in_memory = run(x)
    streamed = run(None, private_stream=str(path))
    np.testing.assert_array_equal(np.asarray(streamed.images), np.asarray(in_memory.images))
    assert streamed.ledger == in_memory.ledger
    short = tmp_path / "short.npy"
    np.save(short, np.asarray(flat(x))[:-1])
    with pytest.raises(ValueError, match="one embedding per private sample"):
        run(None, private_stream=str(short))
    with pytest.raises(ValueError, match="give the private data, or private_stream"):
        run(None)
