"""The vote histogram on a device mesh, on one host or many, through JAX's own distributed runtime.

:func:`sharded_vote_histogram` is :func:`pejax.vote_histogram` with the private rows split over the devices of
a :class:`jax.sharding.Mesh`: each device finds the nearest synthetic samples of its own rows (with the same
streaming kernel as the single-device path), counts its votes as *integers*, and the per-device counts are
summed with one ``psum``. Integer sums do not depend on the order of addition, so the result does not depend on
the number of devices, hosts or shards; it is scaled to float32 once, at the end::

    histogram = counts.astype(float32) * float32(1 / sqrt(k))

The synthetic embeddings are replicated on every device, or, with ``shard_synthetic=True`` (when they do not
fit one device), split over the same devices and passed around a ring with ``ppermute``: after ``D`` steps every
device has seen every synthetic shard and kept a running top-k, merged lexicographically by (distance, global
index) so that ties still go to the lowest synthetic index.

User-level votes (``group_ids``) are normalised per group, and a group may span shards: the (n, k) neighbour
indices (int32, ``4 * n * k`` bytes; 8 MB for two million samples at k = 1) are gathered on every device and the
user-level histogram is computed there by :func:`pejax.votes.group_votes_from_indices`, exactly as on one device.

Multi-host. Every process runs the same program (JAX's multi-controller model). Call
:func:`initialize_distributed` first, give each process *its own* private rows (the data set is their
concatenation in process order) and the *same* synthetic embeddings, and every process gets the same summed
histogram back. Noise is then added once to that summed histogram, with the same key on every process
(:func:`sharded_noisy_histogram` checks that the keys agree), so every process holds the very same noisy
histogram: one draw of the Gaussian mechanism, released once, which is what the privacy analysis assumes. Noise
is never added to per-device or per-host partial histograms. Only :func:`is_checkpoint_writer` (process 0) should
write checkpoints, reports or the released samples.

Exactness. The votes (integer counts, and the neighbour indices behind them) equal those of the single-device
path, up to float32 near-ties between two synthetic samples, the same caveat as changing ``block_size`` in
:func:`pejax.vote_histogram` (a different block shape may round a distance differently in the last bit). For
``k = 1`` the histogram is bit-for-bit that of :func:`pejax.vote_histogram`; for ``k > 1`` the single-device path
adds ``1/sqrt(k)`` repeatedly in float32, so the two differ by float32 rounding (relative 1e-6), while the sharded
result is the correctly rounded product and is bit-for-bit the same on any mesh. User-level histograms are
bit-for-bit those of :func:`pejax.vote_histogram` whenever the indices are.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from pejax import _validate
from pejax import neighbors as _nn
from pejax import votes as _votes
from pejax.mechanism import add_gaussian_noise
from pejax.votes import HISTOGRAM_SENSITIVITY

# Rows checked for NaN/Inf at a time, to keep the temporary boolean array small.
_CHECK_ROWS = 1 << 16
_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------------------------------------------
# Distributed runtime helpers.


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> tuple[int, int]:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``) once; a no-op when already started.

    Arguments left ``None`` are read from the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
    process 0; JAX reads it too), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (pejax conventions, for launchers
    JAX does not detect), and otherwise JAX's own cluster detection (Slurm, Open MPI, Kubernetes, Cloud TPU). On a
    single machine with none of these set and no arguments, nothing is started and ``(0, 1)`` is returned. On CPU,
    cross-process collectives use gloo (JAX's default, ``jax_cpu_collectives_implementation``). Call this before
    any other JAX computation.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service.
      num_processes: total number of processes, >= 1.
      process_id: this process's id in ``0 .. num_processes - 1``.
      local_device_ids: restricts the devices this process uses (e.g. one GPU per process).
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      ``(jax.process_index(), jax.process_count())``.

    Raises:
      ValueError: a malformed ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` or inconsistent arguments.

    Example:
      >>> initialize_distributed()  # single process, nothing configured: nothing to start
      (0, 1)
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None:
        _validate.positive_int("num_processes", num_processes)
    if process_id is not None:
        _validate.positive_int("process_id", process_id, minimum=0)
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(
                f"process_id must be < num_processes, got process_id={process_id} and "
                f"num_processes={num_processes}. Number the processes 0 .. num_processes - 1."
            )
    configured = (coordinator_address, num_processes, process_id, local_device_ids) != (None,) * 4
    if not configured and not _cluster_detected():
        return 0, 1
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return jax.process_index(), jax.process_count()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer, got {value!r}. Set e.g. {name}=0."
        ) from None


def _cluster_detected() -> bool:
    # The launchers JAX's own cluster detection understands.
    markers = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME")
    return any(m in os.environ for m in markers)


def is_checkpoint_writer() -> bool:
    """True on exactly one process (process 0): the one that should write checkpoints, logs and outputs.

    Every process computes the same histogram and the same noisy histogram; writing them once avoids
    concurrent writes to one file and duplicate copies of released data.

    Example:
      >>> is_checkpoint_writer()
      True
    """
    return jax.process_index() == 0


# --------------------------------------------------------------------------------------------------------------
# Host-side validation (NumPy, chunked, never a full copy of the private data).


def _host_matrix(name: str, x) -> np.ndarray | jax.Array:
    """Checks shape and dtype of a 2-D floating array without copying it; returns it (NumPy view or JAX array)."""
    if isinstance(x, jax.Array):
        if _validate.is_traced(x):
            raise TypeError(
                f"{name} must be a concrete array, not a traced value: call this function outside jax.jit."
            )
        if not x.is_fully_addressable:
            raise TypeError(
                f"{name} must hold this process's own rows (a NumPy array or a single-process JAX array), "
                "got a global jax.Array spanning several processes. Pass the process-local rows instead."
            )
    elif not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    if len(x.shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (num_samples, dim), got shape {tuple(x.shape)}. "
            "Reshape it, e.g. x.reshape(len(x), -1)."
        )
    dtype = np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating) and dtype != jnp.bfloat16:
        raise TypeError(
            f"{name} must have a floating dtype, got {dtype}. Convert it, e.g. {name}.astype(np.float32)."
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}.")
    return x


def _first_nonfinite_row(chunk: np.ndarray) -> int | None:
    finite = np.isfinite(np.asarray(chunk, np.float32)).all(axis=1)
    if finite.all():
        return None
    return int(np.argmin(finite))


def _nonfinite_message(name: str, row: int, where: str = "") -> str:
    return (
        f"{name} contains NaN or Inf (first in row {row}{where}). Embeddings must be finite: check the "
        f"embedding function or the input that produced row {row}; drop or repair those rows before voting."
    )


def _check_finite(name: str, x, *, row_offset: int = 0) -> int | None:
    """Returns the first row (plus ``row_offset``) holding NaN/Inf, or None; reads ``x`` in chunks."""
    for start in range(0, x.shape[0], _CHECK_ROWS):
        bad = _first_nonfinite_row(np.asarray(x[start : start + _CHECK_ROWS]))
        if bad is not None:
            return row_offset + start + bad
    return None


def _common_dtype(*dtypes) -> np.dtype:
    canon = [jax.dtypes.canonicalize_dtype(np.dtype(d)) for d in dtypes]
    return np.dtype(functools.reduce(jnp.promote_types, canon))


def _scale_counts(counts: jax.Array, k: int) -> jax.Array:
    """Integer vote counts to the float32 sample-level histogram: ``counts * float32(1/sqrt(k))``."""
    return counts.astype(jnp.float32) * jnp.float32(1.0 / np.sqrt(k))


# --------------------------------------------------------------------------------------------------------------
# Cross-process agreement (no-ops on one process).


def _process_allgather(x: np.ndarray) -> np.ndarray:
    """(process_count, *x.shape) array of every process's ``x`` (int64 is sent as two int32 words)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    if x.dtype.itemsize == 8:
        words = np.ascontiguousarray(x).view(np.uint32)
        out = np.asarray(multihost_utils.process_allgather(words))
        return np.ascontiguousarray(out).view(x.dtype).reshape((-1, *x.shape))
    return np.asarray(multihost_utils.process_allgather(x)).reshape((-1, *x.shape))


def _fingerprint(x) -> int:
    arr = np.ascontiguousarray(np.asarray(x))
    return zlib.crc32(arr.view(np.uint8).reshape(-1)) ^ zlib.crc32(repr(arr.shape).encode())


def _require_same_everywhere(name: str, x, fix: str) -> None:
    if jax.process_count() == 1:
        return
    prints = _process_allgather(np.array([_fingerprint(x)], np.int64)).ravel()
    if len(set(prints.tolist())) != 1:
        raise ValueError(
            f"{name} differs between processes (fingerprints {prints.tolist()}, one per process). {fix}"
        )


# --------------------------------------------------------------------------------------------------------------
# The sharded kernel.


def _axes(mesh, axis_name) -> tuple[str, ...]:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}. Build one with e.g. "
            "jax.make_mesh((jax.device_count(),), ('data',))."
        )
    if axis_name is None:
        return tuple(mesh.axis_names)
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not names or len(set(names)) != len(names) or any(a not in mesh.axis_names for a in names):
        raise ValueError(
            f"axis_name must name one or more distinct axes of the mesh {tuple(mesh.axis_names)}, "
            f"got {axis_name!r}. Leave it None to shard over every mesh axis."
        )
    return names


class _Layout:
    """Where this process's rows go on the mesh: ``rows`` per shard, this process's shards in row order."""

    def __init__(self, mesh: Mesh, axes: tuple[str, ...], local_rows: int):
        self.spec = PartitionSpec(axes)
        self.sharding = NamedSharding(mesh, self.spec)
        self.num_shards = math.prod(mesh.shape[a] for a in axes)
        # Which row shards this process holds (a shard may sit on several local devices when other mesh axes
        # replicate it).
        probe = self.sharding.addressable_devices_indices_map((self.num_shards, 1))
        self.local_shards = sorted({idx[0].start or 0 for idx in probe.values()})
        per_process = _process_allgather(np.array([local_rows, len(self.local_shards)], np.int64))
        if len(set(per_process[:, 1].tolist())) != 1:
            raise ValueError(
                f"every process must hold the same number of row shards of the mesh, got "
                f"{per_process[:, 1].tolist()} (one per process). Build the mesh over all devices with "
                "jax.make_mesh so each process owns an equal part of the sharded axes."
            )
        self.rows_per_process = per_process[:, 0].astype(int).tolist()
        self.num_rows = int(sum(self.rows_per_process))
        self.rows = max(1, -(-max(self.rows_per_process) // len(self.local_shards)))
        self.padded_rows = self.rows * self.num_shards
        self.local_rows = local_rows
        self._rank = {start: r for r, start in enumerate(self.local_shards)}

    def put(self, x, dtype, fill=0) -> jax.Array:
        """Places this process's rows of ``x`` (rows, ...) on the mesh, padding every shard to ``self.rows``."""
        shape = (self.padded_rows, *x.shape[1:])

        def shard(index):
            rank = self._rank[(index[0].start or 0) // self.rows]
            lo = rank * self.rows
            hi = min(lo + self.rows, self.local_rows)
            block = np.asarray(x[lo:hi] if hi > lo else x[:0]).astype(dtype, copy=False)
            if block.shape[0] < self.rows:
                pad = [(0, self.rows - block.shape[0])] + [(0, 0)] * (block.ndim - 1)
                block = np.pad(block, pad, constant_values=fill)
            return block[(slice(None), *index[1:])]

        return jax.make_array_from_callback(shape, self.sharding, shard)


def _replicated(mesh: Mesh, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, PartitionSpec()), lambda i: x[i]
    )


def _local_knn(q, keys, *, k, metric, block_size, key_block_size, precision):
    rows, m = q.shape[0], keys.shape[0]
    qb, kb = _nn.default_block_sizes(rows, m, block_size, q.shape[1])
    if key_block_size is not None:
        kb = min(key_block_size, m)
    num_blocks, block_rows = _nn.balanced_block(rows, qb)
    return _nn._knn(
        q,
        keys,
        k=k,
        metric=metric,
        query_block=block_rows,
        key_block=kb,
        num_query_blocks=num_blocks,
        precision=_nn._PRECISIONS[precision],
    )


def _ring_knn(
    q, keys_local, *, axes, num_shards, m, k, metric, block_size, key_block_size, precision
):
    """Top-k of the local queries over all synthetic shards, passed around a ring of ``num_shards`` devices."""
    shard_rows = keys_local.shape[0]
    pad_keys = num_shards * shard_rows - m
    # Padded keys (zeros, at most num_shards - 1 of them, all in the last shard) may rank among a shard's
    # top entries: ask each shard for that many more and discard them.
    local_k = min(k + pad_keys, shard_rows)
    me = lax.axis_index(axes)
    rows = q.shape[0]
    perm = [(j, (j - 1) % num_shards) for j in range(num_shards)]

    def merge(best, keys_cur, step):
        best_d, best_i = best
        owner = (me + step) % num_shards  # which synthetic shard ``keys_cur`` is
        res = _local_knn(
            q,
            keys_cur,
            k=local_k,
            metric=metric,
            block_size=block_size,
            key_block_size=key_block_size,
            precision=precision,
        )
        idx = res.indices + (owner * shard_rows).astype(jnp.int32)
        dist = jnp.where(idx < m, res.distances, jnp.inf)
        dist = jnp.where(dist == 0, 0.0, dist)  # -0.0 and 0.0 must tie
        cand_d = jnp.concatenate([best_d, dist], axis=1)
        cand_i = jnp.concatenate([best_i, idx], axis=1)
        # Lexicographic (distance, global index): ties go to the lowest index, as on one device.
        cand_d, cand_i = lax.sort((cand_d, cand_i), dimension=1, num_keys=2)
        return cand_d[:, :k], cand_i[:, :k]

    best = (jnp.full((rows, k), jnp.inf, jnp.float32), jnp.full((rows, k), _INT32_MAX, jnp.int32))
    best = merge(best, keys_local, 0)

    def step(s, carry):
        best, keys_cur = carry
        keys_cur = lax.ppermute(keys_cur, axes, perm)
        return merge(best, keys_cur, s), keys_cur

    if num_shards > 1:
        best, _ = lax.fori_loop(1, num_shards, step, (best, keys_local))
    return best[1]


@functools.lru_cache(maxsize=64)
def _build(
    mesh,
    axes,
    *,
    m,
    k,
    metric,
    num_rows,
    grouped,
    shard_synthetic,
    block_size,
    key_block_size,
    precision,
    lattice=False,
):
    num_shards = math.prod(mesh.shape[a] for a in axes)
    spec = PartitionSpec(axes)
    knn_kwargs = dict(
        k=k,
        metric=metric,
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
    )

    def body(q, valid, keys, groups):
        if shard_synthetic:
            idx = _ring_knn(q, keys, axes=axes, num_shards=num_shards, m=m, **knn_kwargs)
        else:
            idx = _local_knn(q, keys, **knn_kwargs).indices
        if not grouped:
            votes = jnp.repeat(valid.astype(jnp.int32), k)
            counts = jnp.zeros((m,), jnp.int32).at[idx.reshape(-1)].add(votes)
            total = lax.psum(counts, axes)
            return total if lattice else _scale_counts(total, k)
        # Groups may span shards: gather the (small) indices and compute the user-level histogram on every
        # device exactly as on one device, with the padded rows removed and the row order kept.
        idx_all = lax.all_gather(idx, axes, tiled=True)
        valid_all = lax.all_gather(valid, axes, tiled=True)
        groups_all = lax.all_gather(groups, axes, tiled=True)
        order = jnp.argsort(jnp.logical_not(valid_all), stable=True)[:num_rows]
        if lattice:  # the (small) indices and ids: the exact integer snapping runs on the host
            return idx_all[order], groups_all[order]
        return _votes.group_votes_from_indices(idx_all[order], groups_all[order], num_bins=m, k=k)

    keys_spec = spec if shard_synthetic else PartitionSpec()
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spec, spec, keys_spec, spec),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    return jax.jit(fn)


def sharded_vote_histogram(
    private,
    synthetic,
    *,
    mesh: Mesh,
    k: int = 1,
    metric: str = "l2",
    group_ids=None,
    axis_name: str | Sequence[str] | None = None,
    shard_synthetic: bool = False,
    block_size: int | None = None,
    key_block_size: int | None = None,
    precision: str = "highest",
    _lattice: bool = False,
) -> jax.Array:
    """:func:`pejax.vote_histogram` with the private rows sharded over a device mesh (one host or many).

    Each device votes on its rows; integer vote counts are summed over devices with ``psum`` and scaled by
    ``1/sqrt(k)`` once. See the module docstring for exactness and the multi-host contract.

    Args:
      private: (n_local, d) floating array of *this process's* private embeddings (NumPy, memory-mapped or
        JAX, finite). On one process that is the whole private set; on several, the private set is the
        concatenation of every process's rows in process order (rows may differ in number between processes).
      synthetic: (m, d) floating synthetic embeddings, the same on every process, m >= k.
      mesh: the device mesh, e.g. ``jax.make_mesh((jax.device_count(),), ("data",))``; on several processes it
        must span the devices of all of them.
      k: each private sample votes for its k nearest synthetic samples with weight 1/sqrt(k).
      metric: ``"l2"``, ``"cosine"`` or ``"ip"``, as in :func:`pejax.nearest_neighbors`.
      group_ids: optional (n_local,) integer user ids of this process's rows (user-level privacy). Ids are
        global: rows of one user on several processes are one group.
      axis_name: mesh axis name (or names) the private rows are split over; default: every mesh axis.
      shard_synthetic: also split the synthetic embeddings over those axes (for synthetic sets too large for one
        device; each device then holds ~m/D of them and they travel around a ring). Speed/memory setting only.
      block_size, key_block_size, precision: per-device kernel settings, as in :func:`pejax.vote_histogram`.
        These speed settings change neither the votes (beyond float32 near-ties) nor the privacy guarantee.

    Returns:
      (m,) float32 histogram, the same on every process, as an ordinary (single-device) array on this
      process's default device. L2 sensitivity :data:`pejax.HISTOGRAM_SENSITIVITY` = 1.

    Raises:
      ValueError: shapes, non-finite rows (naming the row), unknown metric or axis, k out of range, or inputs
        (synthetic, group layout) that differ between processes.
      TypeError: a non-Mesh ``mesh``, non-floating embeddings, non-integer ids or k.

    Example:
      >>> import jax, numpy as np
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> private = np.array([[0.0], [0.1], [0.9]], np.float32)
      >>> synthetic = np.array([[0.0], [1.0]], np.float32)
      >>> sharded_vote_histogram(private, synthetic, mesh=mesh).tolist()
      [2.0, 1.0]
    """
    _nn.check_matmul_precision(precision, "sharded_vote_histogram")
    axes = _axes(mesh, axis_name)
    _validate.one_of("metric", metric, _nn.METRICS)
    k = _validate.positive_int("k", k)
    if block_size is not None:
        _validate.positive_int("block_size", block_size)
    if key_block_size is not None:
        _validate.positive_int("key_block_size", key_block_size)
    if not isinstance(shard_synthetic, bool):
        raise TypeError(f"shard_synthetic must be a bool, got {shard_synthetic!r}.")
    private = _host_matrix("private", private)
    synthetic = np.asarray(_host_matrix("synthetic", synthetic))
    m, d = synthetic.shape
    if m == 0:
        raise ValueError(f"synthetic must not be empty, got shape {synthetic.shape}.")
    if private.shape[1] != d:
        raise ValueError(
            f"private and synthetic must have the same embedding dimension, got "
            f"private.shape={tuple(private.shape)} and synthetic.shape={synthetic.shape}. "
            "Embed both with the same embedding function."
        )
    if k > m:
        raise ValueError(
            f"k={k} exceeds the number of synthetic ({m}); each private sample needs k distinct "
            f"neighbours. Use k <= {m} or more synthetic."
        )
    dtype = _common_dtype(private.dtype, synthetic.dtype)
    bad_syn = _first_nonfinite_row(synthetic)
    if bad_syn is not None:
        raise ValueError(_nonfinite_message("synthetic", bad_syn))
    _require_same_everywhere(
        "synthetic", synthetic, "Pass the same synthetic embeddings on every process."
    )

    layout = _Layout(mesh, axes, int(private.shape[0]))
    # All processes agree before any collective runs, so that one bad row cannot leave the others waiting.
    bad = _check_finite("private", private)
    first_bad = _process_allgather(np.array([-1 if bad is None else bad], np.int64)).ravel()
    for proc, row in enumerate(first_bad.tolist()):
        if row >= 0:
            where = "" if jax.process_count() == 1 else f" of process {proc}'s rows"
            raise ValueError(_nonfinite_message("private", row, where))
    if layout.num_rows == 0:
        raise ValueError("private must not be empty, got 0 rows on every process.")
    if layout.num_rows > _INT32_MAX // k:
        raise ValueError(
            f"n * k = {layout.num_rows * k} votes overflow int32 counts. Vote in parts of fewer than "
            f"{_INT32_MAX // k} samples and add the histograms."
        )

    groups = None
    if group_ids is not None:
        groups = _global_dense_groups(group_ids, private.shape[0], layout)

    q = layout.put(private, dtype)
    valid = layout.put(np.ones((private.shape[0],), bool), bool, fill=False)
    group_arr = layout.put(
        groups if groups is not None else np.zeros(private.shape[0], np.int32), np.int32
    )
    if shard_synthetic:
        keys_arr = _put_sharded_keys(mesh, axes, synthetic.astype(dtype, copy=False))
    else:
        keys_arr = _replicated(mesh, synthetic.astype(dtype, copy=False))
    fn = _build(
        mesh,
        axes,
        m=m,
        k=k,
        metric=metric,
        num_rows=layout.num_rows,
        grouped=groups is not None,
        shard_synthetic=shard_synthetic,
        block_size=block_size,
        key_block_size=key_block_size,
        precision=precision,
        lattice=_lattice,
    )
    hist = fn(q, valid, keys_arr, group_arr)
    if _lattice:
        if groups is None:
            return _votes.sample_lattice(np.asarray(hist.addressable_data(0)), k=k)
        idx, grp = (np.asarray(a.addressable_data(0)) for a in hist)
        return _votes.user_lattice(idx, grp, num_bins=m, k=k)
    # The result is replicated: hand back this process's copy as an ordinary array (m floats).
    return jnp.asarray(np.asarray(hist.addressable_data(0)))


def sharded_lattice_vote_histogram(private, synthetic, *, mesh: Mesh, **kwargs):
    """:func:`pejax.votes.lattice_vote_histogram` sharded as :func:`sharded_vote_histogram` (same arguments).

    Returns a :class:`pejax.votes.LatticeVotes`, the same on every process.
    """
    return sharded_vote_histogram(private, synthetic, mesh=mesh, _lattice=True, **kwargs)


def _put_sharded_keys(mesh: Mesh, axes: tuple[str, ...], synthetic: np.ndarray) -> jax.Array:
    num_shards = math.prod(mesh.shape[a] for a in axes)
    m = synthetic.shape[0]
    shard_rows = -(-m // num_shards)
    shape = (shard_rows * num_shards, synthetic.shape[1])

    def shard(index):
        lo = index[0].start or 0
        block = synthetic[lo : lo + shard_rows]
        if block.shape[0] < shard_rows:
            block = np.pad(block, ((0, shard_rows - block.shape[0]), (0, 0)))
        return block[:, index[1]]

    return jax.make_array_from_callback(shape, NamedSharding(mesh, PartitionSpec(axes)), shard)


def _global_dense_groups(group_ids, local_rows: int, layout: _Layout) -> np.ndarray:
    """Validates this process's ids and relabels them densely over *all* processes (int32 in [0, n))."""
    _votes.dense_group_ids(group_ids, local_rows)  # shape and dtype checks, with their messages
    ids = np.asarray(group_ids).astype(np.int64)
    if jax.process_count() == 1:
        _, dense = np.unique(ids, return_inverse=True)
        return dense.astype(np.int32)
    longest = max(layout.rows_per_process)
    padded = np.zeros((longest,), np.int64)
    padded[:local_rows] = ids
    every = _process_allgather(padded)
    union = np.unique(np.concatenate([every[p, :r] for p, r in enumerate(layout.rows_per_process)]))
    return np.searchsorted(union, ids).astype(np.int32)


def sharded_noisy_histogram(
    key: jax.Array,
    private,
    synthetic,
    *,
    mesh: Mesh,
    noise_multiplier: float,
    **kwargs,
) -> jax.Array:
    """The Gaussian mechanism on :func:`sharded_vote_histogram`: one noise draw for the summed histogram.

    Noise of standard deviation ``noise_multiplier * HISTOGRAM_SENSITIVITY`` is added by
    :func:`pejax.add_gaussian_noise` to the summed (replicated) histogram, with ``key``, on every process. The key
    must be the same on every process (derive it from one seed, never from ``jax.process_index()``); this is
    checked, so every process holds the identical noisy histogram: one release of one Gaussian mechanism. The
    result equals ``add_gaussian_noise(key, vote_histogram(...))`` on one device whenever the clean histograms
    agree (always at ``k = 1``; see the module docstring).

    Args:
      key: a ``jax.random`` key, identical on every process. Never reuse it for another release.
      private, synthetic: as :func:`sharded_vote_histogram`.
      mesh: the device mesh.
      noise_multiplier: noise standard deviation in units of the sensitivity, >= 0.
      **kwargs: the other keyword arguments of :func:`sharded_vote_histogram`.

    Returns:
      (m,) float32 noisy histogram, identical on every process.

    Raises:
      ValueError: the key differs between processes, or as :func:`sharded_vote_histogram`.

    Example:
      >>> import jax, numpy as np
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> h = sharded_noisy_histogram(jax.random.key(0), np.zeros((4, 2), np.float32),
      ...                             np.eye(2, dtype=np.float32), mesh=mesh, noise_multiplier=1.0)
      >>> h.shape
      (2,)
    """
    _validate.finite_float("noise_multiplier", noise_multiplier, minimum=0.0)
    if not isinstance(key, jax.Array) or _validate.is_traced(key):
        raise TypeError(
            f"key must be a concrete jax.random key, e.g. jax.random.key(seed), got {type(key).__name__}."
        )
    key_bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    _require_same_everywhere(
        "key",
        np.asarray(key_bits),
        "Noise must be drawn once for the summed histogram: derive the key from the same seed on every "
        "process (e.g. jax.random.fold_in(jax.random.key(seed), iteration)), never from the process index.",
    )
    hist = sharded_vote_histogram(private, synthetic, mesh=mesh, **kwargs)
    return add_gaussian_noise(
        key, hist, noise_multiplier=noise_multiplier, sensitivity=HISTOGRAM_SENSITIVITY
    )


__all__ = [
    "initialize_distributed",
    "is_checkpoint_writer",
    "sharded_lattice_vote_histogram",
    "sharded_noisy_histogram",
    "sharded_vote_histogram",
]
