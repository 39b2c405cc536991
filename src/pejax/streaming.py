"""Private embeddings larger than memory: embedded once to a ``.npy`` file, voted in chunks.

:func:`embed_to_memmap` runs an embedding function over the private data in batches and writes the embeddings
to a float32 ``.npy`` file (readable with ``np.load(path, mmap_mode="r")``), one batch at a time, so memory
holds one batch of inputs and embeddings. The file holds embeddings of *private* data: it is as sensitive as the
data itself, pejax never deletes it, and it is created readable by its owner only (mode 0600). A
:class:`PrivateDataOnDiskWarning` says so every time such a file is written.

:func:`streamed_vote_histogram` reads private embeddings ``chunk_rows`` rows at a time (from a ``.npy`` path or
memory-mapped file with plain reads, so the file's pages sit in the page cache, not in the process), votes each
chunk with the same jitted kernel (every chunk is padded to one static shape, so it compiles once), and adds the
integer vote counts. Memory is O(chunk_rows x d + m x d + m) plus the kernel's score blocks, whatever the number
of private rows (chunks of a ``.npy`` file are read into 64-byte-aligned buffers, which XLA:CPU uses in place, so
a chunk is held once, not copied to the device; by default a chunk is 16 MiB); at user level (``group_ids``) it
also keeps the (n, k) int32 neighbour indices (``4 n k`` bytes) because a user's rows may fall in different chunks.
The synthetic side can be read in key chunks too (``key_chunk_rows``; by default for a NumPy array of over 64 MiB
that the device would copy whole): each private chunk then meets every key chunk in turn, and the m x d term
becomes two key chunks. The result equals :func:`pejax.vote_histogram` on
the whole array with the same exactness as :mod:`pejax.sharding` (same votes up to float32 near-ties; bit-for-bit
at ``k = 1`` and at user level, correctly rounded ``count / sqrt(k)`` otherwise).
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings
from collections.abc import Callable
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax import neighbors as _nn
from pejax import votes as _votes
from pejax.mechanism import PejaxWarning
from pejax.sharding import _INT32_MAX
from pejax.sharding import _common_dtype
from pejax.sharding import _first_nonfinite_row as _nonfinite_row_search
from pejax.sharding import _host_matrix
from pejax.sharding import _local_knn
from pejax.sharding import _nonfinite_message
from pejax.sharding import _scale_counts


class PrivateDataOnDiskWarning(PejaxWarning):
    """A file holding embeddings of private data was written; its owner must protect and delete it."""


def _warn_private_file(path: pathlib.Path) -> None:
    warnings.warn(
        f"{str(path)!r} holds embeddings of PRIVATE data: treat it like the private data itself (it is created "
        "readable by its owner only; do not copy, share or check it in). pejax never deletes it: delete it "
        "yourself when the run is done.",
        PrivateDataOnDiskWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------------------
# Writing.


def _batches(data, batch_size: int | None, num_rows: int | None):
    """(num_rows, iterator of input batches) for an array-like or an iterable of batches."""
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        if batch_size is None:
            raise ValueError(
                "batch_size is required when data is an array: pass e.g. batch_size=1024 (inputs embedded "
                "at a time)."
            )
        _validate.positive_int("batch_size", batch_size)
        total = int(data.shape[0])
        if num_rows is not None and num_rows != total:
            raise ValueError(
                f"num_rows={num_rows} but data has {total} rows. Leave num_rows None for array input."
            )
        return total, (data[i : i + batch_size] for i in range(0, total, batch_size))
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an array of inputs or an iterable of input batches, got {type(data).__name__}."
        )
    if num_rows is None:
        raise ValueError(
            "num_rows is required when data is an iterable of batches (the file is allocated up front): "
            "pass the total number of inputs the batches hold."
        )
    if batch_size is not None:
        raise ValueError(
            "batch_size only applies to array input; an iterable of batches sets its own batch size. "
            "Leave batch_size None."
        )
    return num_rows, iter(data)


def embed_to_memmap(
    data,
    embedding_fn: Callable,
    path: str | os.PathLike,
    *,
    dim: int,
    batch_size: int | None = None,
    num_rows: int | None = None,
    overwrite: bool = False,
) -> np.memmap:
    """Embeds private inputs batch by batch into a float32 ``.npy`` file and returns it memory-mapped.

    The file is written under ``path + ".partial"`` and renamed when complete, so ``path`` never holds a
    half-written file; on any error the partial file is removed. Emits :class:`PrivateDataOnDiskWarning`.

    Args:
      data: the private inputs, either an array-like with ``shape`` and row slicing (NumPy, memory-mapped,
        JAX), embedded ``batch_size`` rows at a time, or an iterable of input batches (then ``num_rows`` is
        required).
      embedding_fn: maps one batch of b inputs to a (b, dim) floating array (NumPy or JAX).
      path: the ``.npy`` file to create. It must not exist unless ``overwrite``.
      dim: embedding dimension d >= 1.
      batch_size: inputs per batch, for array ``data`` only.
      num_rows: total number of inputs, for iterable ``data`` only.
      overwrite: replace an existing file at ``path``.

    Returns:
      The embeddings, (num_rows, dim) float32, as a read-only ``np.memmap`` of ``path``.

    Raises:
      ValueError: missing or inconsistent ``batch_size``/``num_rows``, embeddings of the wrong shape, batches
        that hold more or fewer rows than ``num_rows``, non-finite embeddings (naming the first bad row).
      TypeError: non-floating embeddings or an unusable ``data``.
      FileExistsError: ``path`` exists and ``overwrite`` is False.

    Example:
      >>> import os, tempfile, warnings, numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "private.npy")
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore", PrivateDataOnDiskWarning)
      ...     emb = embed_to_memmap(np.ones((5, 3)), lambda x: x[:, :2] * 2, path, dim=2, batch_size=2)
      >>> emb.shape, emb.dtype, float(emb.sum())
      ((5, 2), dtype('float32'), 20.0)
      >>> os.remove(path)  # the caller owns the file
    """
    dim = _validate.positive_int("dim", dim)
    if num_rows is not None:
        _validate.positive_int("num_rows", num_rows, minimum=0)
    if not callable(embedding_fn):
        raise TypeError(f"embedding_fn must be callable, got {type(embedding_fn).__name__}.")
    total, batches = _batches(data, batch_size, num_rows)
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(path)!r} already exists. Pass overwrite=True to replace it, or choose another path."
        )
    partial = path.with_name(path.name + ".partial")
    _warn_private_file(path)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (total, dim)}
            np.lib.format.write_array_header_2_0(f, header)
            written = 0
            for batch in batches:
                emb = np.asarray(embedding_fn(batch))
                rows = _check_embedding_batch(emb, batch, dim, written)
                if written + rows > total:
                    raise ValueError(
                        f"the batches hold more than num_rows={total} inputs (at least {written + rows}). "
                        "Pass the exact total as num_rows."
                    )
                f.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
                written += rows
            if written != total:
                raise ValueError(
                    f"the batches held {written} inputs but num_rows={total}. Pass the exact total as num_rows."
                )
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r")


def _check_embedding_batch(emb: np.ndarray, batch, dim: int, offset: int) -> int:
    expected = len(batch) if hasattr(batch, "__len__") else emb.shape[0]
    if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] != expected:
        raise ValueError(
            f"embedding_fn must map a batch of {expected} inputs to shape ({expected}, {dim}), got shape "
            f"{emb.shape} for the batch starting at row {offset}."
        )
    if not np.issubdtype(emb.dtype, np.floating):
        raise TypeError(f"embedding_fn must return floating embeddings, got dtype {emb.dtype}.")
    bad = _first_nonfinite_row(emb)
    if bad is not None:
        raise ValueError(
            f"embedding_fn returned NaN or Inf for row {offset + bad}. Check that input; nothing non-finite "
            "may be written (the partial file was removed)."
        )
    return int(emb.shape[0])


# --------------------------------------------------------------------------------------------------------------
# Reading.


class _Rows:
    """Row-chunk reader: plain file reads for ``.npy`` files, slicing for anything else.

    With ``rows`` (sorted int indices), only those rows are read (a memory map gathers them), in that order.
    """

    def __init__(self, private, rows=None, name="private"):
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.file = None
        if isinstance(private, (str, os.PathLike)):
            self.file = pathlib.Path(private)
            shape, dtype, self.offset = _npy_header(self.file)
        elif isinstance(private, np.memmap) and _is_whole_npy(private):
            self.file = pathlib.Path(private.filename)
            shape, dtype, self.offset = _npy_header(self.file)
        if self.file is not None:
            self.shape, self.dtype = shape, dtype
            # Shape and dtype checks on a zero-stride view: nothing is read.
            _host_matrix(name, np.broadcast_to(np.zeros((), dtype), shape))
            self.array = None
        else:
            self.array = _host_matrix(name, private)
            self.shape, self.dtype = tuple(self.array.shape), np.dtype(self.array.dtype)
        if self.rows is not None:
            if self.rows.ndim != 1 or (
                self.rows.size and (self.rows.min() < 0 or self.rows.max() >= self.shape[0])
            ):
                raise ValueError(
                    f"rows must be a 1-D array of row indices in [0, {self.shape[0]}), got "
                    f"{self.rows.shape} values."
                )
            self.full_shape = self.shape
            self.shape = (int(self.rows.size), self.shape[1])

    def read(self, start: int, stop: int, out_rows: int | None = None) -> np.ndarray:
        """Rows ``start:stop``; with ``out_rows``, in a 64-byte-aligned (out_rows, d) buffer, zero past the rows."""
        if self.rows is None and self.array is None and out_rows is not None:
            # Straight from the file into an aligned buffer: the device uses it in place (no second copy).
            out = _aligned_empty((out_rows, self.shape[1]), self.dtype)
            got = self._read_into(out[: stop - start], start)
            out[stop - start :] = 0
            return out if got else self._truncated(start, stop)
        chunk = self._read(start, stop)
        if out_rows is None or chunk.shape[0] == out_rows:
            return chunk
        out = _aligned_empty((out_rows, chunk.shape[1]), chunk.dtype)
        out[: chunk.shape[0]] = chunk
        out[chunk.shape[0] :] = 0
        return out

    def _read_into(self, out: np.ndarray, start: int) -> bool:
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * self.shape[1] * self.dtype.itemsize)
            return f.readinto(out.reshape(-1).view(np.uint8)) == out.nbytes

    def _truncated(self, start: int, stop: int):
        raise ValueError(
            f"{str(self.file)!r} is truncated: rows {start}..{stop} could not be read. Re-create it "
            "with embed_to_memmap."
        )

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self.rows is not None:
            idx = self.rows[start:stop]
            if self.array is not None:
                return np.asarray(self.array[idx])
            mm = np.memmap(
                self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.full_shape
            )
            return np.asarray(mm[idx])
        if self.array is not None:
            return np.asarray(self.array[start:stop])
        d = self.shape[1]
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * d * self.dtype.itemsize)
            out = np.fromfile(f, dtype=self.dtype, count=(stop - start) * d)
        if out.size != (stop - start) * d:
            self._truncated(start, stop)
        return out.reshape(stop - start, d)


def _first_nonfinite_row(chunk: np.ndarray) -> int | None:
    """The first row holding NaN or Inf, or None. A finite sum proves every entry finite (NaN and Inf
    propagate through additions) without a chunk-sized mask; only a non-finite (or overflowing) sum needs the
    row-by-row search."""
    if chunk.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(chunk, axis=None)):
                return None
    return _nonfinite_row_search(chunk)


# Private embeddings read per chunk by default: 16 MiB (16384 rows of 256 float32). At most two chunks are held.
# Measured (benchmarks/mem_votes.py 70000 100000 256 --stream, one call): 64 MiB chunks, extra memory 236 MiB
# and 73.5 s; 16 MiB chunks, 155 MiB and 49.2 s (a busy host that session; the time is not the chunks' doing).
_CHUNK_BYTES = 1 << 24
# Synthetic embeddings copied per key chunk when the synthetic side is voted in chunks (see
# :func:`streamed_vote_histogram`): 16 MiB. At most two key chunks are held.
_KEY_CHUNK_BYTES = 1 << 24
_aligned_empty = _validate.aligned_empty


def _npy_header(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = reader(f)
            offset = f.tell()
    except ValueError as err:
        raise ValueError(
            f"{str(path)!r} is not a .npy file ({err}). Write it with embed_to_memmap."
        ) from None
    if fortran and len(shape) == 2 and shape[1] > 1:
        raise ValueError(
            f"{str(path)!r} is stored in Fortran (column-major) order, so rows cannot be read in chunks. "
            "Save it in C order, e.g. with embed_to_memmap."
        )
    return tuple(shape), np.dtype(dtype), offset


def _is_whole_npy(mm: np.memmap) -> bool:
    filename = getattr(mm, "filename", None)
    if not filename or not mm.flags.c_contiguous:
        return False
    try:
        shape, dtype, offset = _npy_header(pathlib.Path(filename))
    except (OSError, ValueError):
        return False
    return shape == mm.shape and dtype == mm.dtype and offset == mm.offset


_STATIC = ("k", "metric", "block_size", "key_block_size", "precision")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _index_chunk(chunk, keys, *, k, metric, block_size, key_block_size, precision):
    return _local_knn(
        chunk,
        keys,
        k=k,
        metric=metric,
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
    ).indices


@functools.partial(jax.jit, static_argnames=_STATIC)
def _count_chunk(counts, chunk, num_valid, keys, **kernel):
    idx = _index_chunk(chunk, keys, **kernel)  # inlined into this program by jit
    return _count_indices(counts, idx, num_valid)


@jax.jit
def _count_indices(counts, idx, num_valid):
    """``counts`` plus one vote per neighbour index of the first ``num_valid`` rows of ``idx`` (rows, k)."""
    valid = (jnp.arange(idx.shape[0]) < num_valid).astype(jnp.int32)
    return counts.at[idx.reshape(-1)].add(jnp.repeat(valid, idx.shape[1]))


_PLAN = ("k", "metric", "query_block", "key_block", "num_query_blocks", "precision")


@functools.partial(jax.jit, static_argnames=_PLAN)
def _merge_key_chunk(best_s, best_i, chunk, key_chunk, num_keys, offset, **plan):
    """The running (rows, k) best of ``chunk`` after also searching ``key_chunk``, whose first ``num_keys`` rows are
    synthetic rows ``offset, offset + 1, ...``: ranking scores ascending and global int32 indices.

    Key chunks are searched in ascending order and merged by the kernel's own key-block rule
    (``neighbors._merge_best``): the same (score, then lowest index) order as one search over all keys.
    """
    scores, idx = _nn._knn_scores(chunk, key_chunk, num_keys=num_keys, **plan)
    return _nn._merge_best((best_s, best_i), (scores, idx + offset))


def streamed_vote_histogram(
    private,
    synthetic,
    *,
    chunk_rows: int | None = None,
    k: int = 1,
    metric: str = "l2",
    group_ids=None,
    block_size: int | None = None,
    key_block_size: int | None = None,
    precision: str = "highest",
    backend: str = "xla",
    rows=None,
    key_chunk_rows: int | None = None,
    _lattice: bool = False,
) -> jax.Array:
    """:func:`pejax.vote_histogram` over private embeddings read ``chunk_rows`` rows at a time.

    Args:
      private: (n, d) floating private embeddings: a path to a ``.npy`` file (e.g. from
        :func:`embed_to_memmap`), a memory-mapped array, or any array with row slicing (NumPy, JAX, h5py).
        ``.npy`` files, given by path or as a ``np.memmap`` of a whole file, are read with plain reads.
      synthetic: (m, d) floating synthetic embeddings (finite), m >= k; held on the device (see
        ``key_chunk_rows``).
      chunk_rows: private rows voted per step (default: 16 MiB of rows, e.g. 16384 rows of 256 float32; the
        last chunk is padded, and padded rows cast no vote). Memory setting only: it changes neither the votes
        nor the privacy guarantee.
      k: each private sample votes for its k nearest synthetic samples with weight 1/sqrt(k).
      metric: ``"l2"``, ``"cosine"`` or ``"ip"``, as in :func:`pejax.nearest_neighbors`.
      group_ids: optional (n,) integer user ids (user-level privacy); keeps the (n, k) int32 indices in memory.
      block_size, key_block_size, precision, backend: kernel settings, as in :func:`pejax.vote_histogram`
        (``backend="blas"`` or ``"faiss"``: each chunk searched on the host CPU).
      rows: optional sorted row indices: vote with those rows of ``private`` only (e.g. one class); ``group_ids``
        are then those rows' ids.
      key_chunk_rows: with ``backend="xla"``, also read the synthetic side ``key_chunk_rows`` rows at a time
        (each private chunk is searched against every key chunk in turn, keeping a running best), so that no
        whole copy of it is made. The default does so, in 16 MiB key chunks, for a NumPy array of over 64 MiB
        that the CPU device would copy whole (not 64-byte aligned, not C-contiguous or not float32); a JAX array
        or an aligned float32 array is used in place. Memory setting only: the votes are the same. Must be at
        least ``k``.

    Returns:
      (m,) float32 histogram with L2 sensitivity :data:`pejax.HISTOGRAM_SENSITIVITY` = 1.

    Raises:
      ValueError: shapes, empty inputs, unknown metric, k out of range, a truncated file, or NaN/Inf in a chunk
        (the message names the row, counted from the start of ``private``).
      TypeError: non-floating embeddings, non-integer ids or sizes.

    Example:
      >>> import numpy as np
      >>> private = np.array([[0.0], [0.1], [0.9]], np.float32)
      >>> synthetic = np.array([[0.0], [1.0]], np.float32)
      >>> streamed_vote_histogram(private, synthetic, chunk_rows=2).tolist()
      [2.0, 1.0]
    """
    _validate.one_of("metric", metric, _nn.METRICS)
    _nn.check_matmul_precision(precision, "streamed_vote_histogram")
    k = _validate.positive_int("k", k)
    if chunk_rows is not None:
        chunk_rows = _validate.positive_int("chunk_rows", chunk_rows)
    if block_size is not None:
        _validate.positive_int("block_size", block_size)
    if key_block_size is not None:
        _validate.positive_int("key_block_size", key_block_size)
    rows = _Rows(private, rows)
    if key_chunk_rows is not None:
        key_chunk_rows = _validate.positive_int("key_chunk_rows", key_chunk_rows)
        if backend != "xla":
            raise ValueError(
                f"key_chunk_rows={key_chunk_rows!r} applies to backend='xla'; the host backends read the "
                "synthetic array in place. Drop key_chunk_rows."
            )
    if key_chunk_rows is not None or (backend == "xla" and _votes._copied_whole(synthetic)):
        keys_source = _Rows(synthetic, name="synthetic")  # read per key chunk: no whole copy
        synthetic_shape, synthetic_dtype = keys_source.shape, keys_source.dtype
    else:
        keys_source = None
        synthetic = _validate.matrix("synthetic", synthetic)
        synthetic_shape, synthetic_dtype = tuple(synthetic.shape), synthetic.dtype
    n, d = rows.shape
    m = synthetic_shape[0]
    if n == 0:
        raise ValueError(f"private must not be empty, got shape {rows.shape}.")
    if d != synthetic_shape[1]:
        raise ValueError(
            f"private and synthetic must have the same embedding dimension, got private.shape={rows.shape} "
            f"and synthetic.shape={synthetic_shape}. Embed both with the same embedding function."
        )
    if k > m:
        raise ValueError(
            f"k={k} exceeds the number of synthetic ({m}); each private sample needs k distinct "
            f"neighbours. Use k <= {m} or more synthetic."
        )
    if n > _INT32_MAX // k:
        raise ValueError(
            f"n * k = {n * k} votes overflow int32 counts. Vote in parts of fewer than {_INT32_MAX // k} "
            "samples and add the histograms."
        )
    if key_chunk_rows is not None and key_chunk_rows < k:
        raise ValueError(
            f"key_chunk_rows={key_chunk_rows} is below k={k}: each key chunk must hold k synthetic rows. "
            f"Use key_chunk_rows >= {k}."
        )
    groups = None if group_ids is None else _votes.dense_group_ids(group_ids, n)
    dtype = _common_dtype(rows.dtype, synthetic_dtype)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (d * np.dtype(dtype).itemsize))
    if keys_source is not None:
        key_rows = key_chunk_rows
        if key_rows is None:
            # Balanced chunks of at most 16 MiB: the last one is not mostly padding.
            target = max(k, _KEY_CHUNK_BYTES // (d * np.dtype(dtype).itemsize))
            key_rows = max(k, _nn.balanced_block(m, target)[1])
        return _voted_by_key_chunks(
            rows,
            keys_source,
            min(chunk_rows, n),
            min(key_rows, m),
            dtype,
            groups,
            _lattice,
            **_nn.block_plan(
                min(chunk_rows, n),
                min(key_rows, m),
                block_size=block_size,
                key_block_size=key_block_size,
                precision=precision,
                dim=d,
            ),
            k=k,
            metric=metric,
        )
    if _nn.check_backend(backend, precision, synthetic) != "xla":
        return _streamed_on_host(
            rows,
            np.asarray(synthetic, dtype),
            chunk_rows,
            groups,
            _lattice,
            k,
            metric,
            **{"block_size": block_size, "key_block_size": key_block_size, "backend": backend},
        )
    keys = jnp.asarray(synthetic, dtype)
    chunk_rows = min(chunk_rows, n)
    kernel = dict(
        k=k,
        metric=metric,
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
    )

    counts = jnp.zeros((m,), jnp.int32)
    indices = None if groups is None else np.empty((n, k), np.int32)
    pending = None  # (start, stop, device indices) of the chunk in flight, at user level
    for start, stop, chunk in _aligned_chunks(rows, chunk_rows, dtype, "private"):
        if groups is None:
            previous = counts
            counts = _count_chunk(counts, chunk, jnp.int32(stop - start), keys, **kernel)
            # At most two chunks in flight: reading the next chunk overlaps this one's votes, and memory
            # stays bounded however fast the disk is.
            previous.block_until_ready()
        else:
            current = (start, stop, _index_chunk(chunk, keys, **kernel))
            if pending is not None:
                a, b, idx = pending
                indices[a:b] = np.asarray(idx)[: b - a]
            pending = current
    if groups is None:
        # Wait for the last chunk: an aligned chunk of the caller's array is used in place, so no vote may
        # still read it once this function has returned.
        counts.block_until_ready()
    else:
        a, b, idx = pending
        indices[a:b] = np.asarray(idx)[: b - a]
    return _histogram(counts, indices, groups, _lattice, m, k)


def _histogram(counts, indices, groups, lattice, m, k):
    """The votes of a chunk loop: from the (m,) integer ``counts`` at sample level, from the (n, k) neighbour
    ``indices`` at user level (``groups``); a :class:`pejax.votes.LatticeVotes` when ``lattice``."""
    if groups is None:
        if lattice:
            return _votes.sample_lattice(np.asarray(counts), k=k)
        return _scale_counts(jnp.asarray(counts, jnp.int32), k)
    if lattice:
        return _votes.user_lattice(indices, np.asarray(groups), num_bins=m, k=k)
    return _votes.group_votes_from_indices(jnp.asarray(indices), groups, num_bins=m, k=k)


def _aligned_chunks(reader, chunk_rows, dtype, name, *, check=True):
    """Yields ``(start, stop, device chunk)``: the rows of ``reader`` (a :class:`_Rows`) ``chunk_rows`` at a time,
    checked finite (the error names ``name`` and the row) unless ``check`` is False, in aligned (chunk_rows, d)
    buffers of ``dtype`` padded with zeros, which the device uses in place."""
    n, d = reader.shape
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        chunk = reader.read(start, stop, chunk_rows if reader.dtype == dtype else None)
        if check:
            bad = _first_nonfinite_row(chunk[: stop - start])
            if bad is not None:
                raise ValueError(_nonfinite_message(name, start + bad))
        if chunk.dtype != dtype or chunk.shape[0] < chunk_rows:
            wide = _aligned_empty((chunk_rows, d), dtype)
            wide[: stop - start] = chunk[: stop - start]
            wide[stop - start :] = 0
            chunk = wide
        # device_put uses an aligned chunk in place; the chunk is a fresh buffer, never written again.
        yield start, stop, jax.device_put(chunk)


def _nearest_over_key_chunks(chunk, keys, key_rows, dtype, plan, *, check):
    """(rows, k) int32 indices of the k nearest synthetic rows of the device ``chunk``, the synthetic rows read
    from ``keys`` (a :class:`_Rows`) ``key_rows`` at a time, at most two key chunks held; ``check``: also check
    the synthetic rows finite (done on the first private chunk, before any vote leaves this module)."""
    best = _nn._empty_best(chunk.shape[0], plan["k"])
    for start, stop, part in _aligned_chunks(keys, key_rows, dtype, "synthetic", check=check):
        previous = best
        best = _merge_key_chunk(
            *best, chunk, part, jnp.int32(stop - start), jnp.int32(start), **plan
        )
        previous[0].block_until_ready()  # at most two key chunks in flight
    return best[1]


def _voted_by_key_chunks(rows, keys, chunk_rows, key_rows, dtype, groups, lattice, **plan):
    """The chunk loop of :func:`streamed_vote_histogram` with the synthetic side read in key chunks too."""
    n, m, k = rows.shape[0], keys.shape[0], plan["k"]
    counts = jnp.zeros((m,), jnp.int32)
    indices = None if groups is None else np.empty((n, k), np.int32)
    for start, stop, chunk in _aligned_chunks(rows, chunk_rows, dtype, "private"):
        idx = _nearest_over_key_chunks(chunk, keys, key_rows, dtype, plan, check=start == 0)
        if groups is None:
            counts = _count_indices(counts, idx, jnp.int32(stop - start))
        else:
            indices[start:stop] = np.asarray(idx)[: stop - start]
    counts.block_until_ready()  # no vote may still read an aligned chunk of the caller's array
    return _histogram(counts, indices, groups, lattice, m, k)


def _streamed_on_host(rows, keys, chunk_rows, groups, lattice, k, metric, **kernel):
    """The chunk loop of :func:`streamed_vote_histogram` with a host backend (NumPy indices and counts)."""
    n, m = rows.shape[0], keys.shape[0]
    counts = np.zeros((m,), np.int64)
    indices = None if groups is None else np.empty((n, k), np.int32)
    for start in range(0, n, min(chunk_rows, n)):
        stop = min(start + chunk_rows, n)
        chunk = rows.read(start, stop)
        bad = _first_nonfinite_row(chunk)
        if bad is not None:
            raise ValueError(_nonfinite_message("private", start + bad))
        idx = _nn.host_knn(chunk.astype(keys.dtype, copy=False), keys, k, metric, **kernel)[1]
        if groups is None:
            counts += np.bincount(idx.reshape(-1), minlength=m)
        else:
            indices[start:stop] = idx
    return _histogram(counts, indices, groups, lattice, m, k)


def streamed_lattice_vote_histogram(private, synthetic, **kwargs):
    """:func:`pejax.votes.lattice_vote_histogram` streamed as :func:`streamed_vote_histogram` (same arguments).

    Returns a :class:`pejax.votes.LatticeVotes`.
    """
    return streamed_vote_histogram(private, synthetic, _lattice=True, **kwargs)


def private_rows(private) -> tuple[int, int]:
    """(n, d) of a private-embedding file or array, read from its header only (nothing else is read)."""
    return _Rows(private).shape


__all__ = [
    "PrivateDataOnDiskWarning",
    "embed_to_memmap",
    "private_rows",
    "streamed_lattice_vote_histogram",
    "streamed_vote_histogram",
]
