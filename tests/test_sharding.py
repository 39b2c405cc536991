"""pejax.sharding against the single-device vote histogram: 8 virtual devices, and two jax.distributed processes.

The multi-device checks run in subprocesses (``tests/_sharding_worker.py``) because the device count and the
distributed runtime are fixed when JAX starts; this process compares what they return with
:func:`pejax.vote_histogram` computed here, on one device.
"""

import doctest
import os
import pathlib
import socket
import subprocess
import sys

import _sharding_worker as worker
import jax
import numpy as np
import pytest

import pejax
from pejax import sharding

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
TIMEOUT_S = 180


def _env(device_count):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _reference():
    """Single-device results for every case the workers run, keyed like theirs."""
    private, synthetic, groups = worker.data()
    ref = {}
    for metric, k, shard_synthetic, grouped in worker.CASES:
        name = worker.case_name(metric, k, shard_synthetic, grouped)
        ref[name] = (
            np.asarray(
                pejax.vote_histogram(
                    private, synthetic, k=k, metric=metric, group_ids=groups if grouped else None
                )
            ),
            k,
            grouped,
        )
    return ref


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _check_case(got, ref_hist, k, grouped, *, counts=None):
    assert got.shape == ref_hist.shape and got.dtype == np.float32
    if grouped:
        # Same indices -> group_votes_from_indices on the same input: bit-for-bit.
        np.testing.assert_array_equal(got, ref_hist)
        return
    # The votes (integer counts) are exactly those of the single-device path ...
    if counts is None:
        counts = np.rint(ref_hist * np.sqrt(k)).astype(int)
    np.testing.assert_array_equal(np.rint(got * np.sqrt(k)).astype(int), counts)
    # ... scaled once: the correctly rounded count / sqrt(k).
    np.testing.assert_array_equal(got, (counts.astype(np.float32) * np.float32(1 / np.sqrt(k))))
    if k == 1:
        np.testing.assert_array_equal(got, ref_hist)
    else:  # vote_histogram adds 1/sqrt(k) repeatedly in float32
        np.testing.assert_allclose(got, ref_hist, rtol=1e-5)


def _run(args, device_count, timeout=TIMEOUT_S):
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=_env(device_count),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs, timeout=TIMEOUT_S):
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]


def test_eight_virtual_devices_match_single_device(tmp_path, reference):
    out = tmp_path / "mesh.npz"
    _wait([_run(["mesh", str(out)], device_count=8)])
    got = dict(np.load(out))
    for name, (hist, k, grouped) in reference.items():
        _check_case(got[f"mesh8/{name}"], hist, k, grouped)
    # A 2-D mesh, rows split over both axes or over one (replicated over the other): the same bits.
    for name in worker.CASES_2D:
        key = worker.case_name(*name)
        np.testing.assert_array_equal(got[f"mesh2x4/{key}"], got[f"mesh8/{key}"])
        np.testing.assert_array_equal(got[f"mesh2x4_data/{key}"], got[f"mesh8/{key}"])

    private, synthetic, _ = worker.data()
    tiny = np.asarray(pejax.vote_histogram(private[:5], synthetic, k=2))
    _check_case(got["tiny/l2_k2_ring"], tiny, 2, False)
    np.testing.assert_array_equal(got["blocks/l2_k1_repl"], reference["l2_k1_repl_sample"][0])
    # Duplicated synthetic rows 3, 20, 36 (private row 5 equals them): index 3, the lowest, takes the votes.
    for name, (_, k, _) in reference.items():
        if k == 1:
            h = got[f"mesh8/{name}"]
            assert h[3] > 0 and h[20] == 0 and h[36] == 0, name
    # One noise draw on the summed histogram, equal to the single-device mechanism for the same key.
    noisy = pejax.add_gaussian_noise(
        jax.random.key(3),
        reference["l2_k1_repl_sample"][0],
        noise_multiplier=worker.NOISE_MULTIPLIER,
    )
    np.testing.assert_array_equal(got["noisy/l2_k1"], np.asarray(noisy))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_single_process(tmp_path, reference):
    port = _free_port()
    outs = [tmp_path / f"proc{i}.npz" for i in range(2)]
    procs = [
        _run(["multi", str(outs[i]), str(port), str(i), "2"], device_count=2) for i in range(2)
    ]
    _wait(procs)
    results = [dict(np.load(o)) for o in outs]
    for case in worker.CASES_MULTI:
        name = worker.case_name(*case)
        hist, k, grouped = reference[name]
        _check_case(results[0][f"multi/{name}"], hist, k, grouped)
        # Both processes hold the very same histogram.
        np.testing.assert_array_equal(results[0][f"multi/{name}"], results[1][f"multi/{name}"])
    noisy = pejax.add_gaussian_noise(
        jax.random.key(3),
        reference["l2_k1_repl_sample"][0],
        noise_multiplier=worker.NOISE_MULTIPLIER,
    )
    for (
        r
    ) in results:  # one draw, the same on both processes and equal to the single-process release
        np.testing.assert_array_equal(r["noisy/l2_k1"], np.asarray(noisy))


# ---------------------------------------------------------------------------------------------------------------
# In this process (one CPU device).


def _mesh():
    return jax.make_mesh((jax.device_count(),), ("data",))


@pytest.mark.parametrize(
    "k,metric,shard_synthetic", [(1, "l2", True), (2, "cosine", False), (3, "ip", True)]
)
def test_one_device_mesh_matches_vote_histogram(k, metric, shard_synthetic):
    rng = np.random.default_rng(k)
    private = rng.normal(size=(123, 6)).astype(np.float32)
    synthetic = rng.normal(size=(19, 6)).astype(np.float32)
    got = np.asarray(
        sharding.sharded_vote_histogram(
            private, synthetic, mesh=_mesh(), k=k, metric=metric, shard_synthetic=shard_synthetic
        )
    )
    idx = np.asarray(pejax.nearest_neighbors(private, synthetic, k=k, metric=metric).indices)
    ref = np.asarray(pejax.vote_histogram(private, synthetic, k=k, metric=metric))
    _check_case(got, ref, k, False, counts=np.bincount(idx.ravel(), minlength=19))


def test_float64_and_jax_inputs_are_accepted():
    rng = np.random.default_rng(0)
    private = rng.normal(size=(40, 3))
    synthetic = jax.numpy.asarray(rng.normal(size=(9, 3)), jax.numpy.float32)
    got = sharding.sharded_vote_histogram(private, synthetic, mesh=_mesh())
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(pejax.vote_histogram(private, synthetic))
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mesh="cpu"), TypeError, "mesh must be a jax.sharding.Mesh"),
        (dict(axis_name="model"), ValueError, "axis_name must name"),
        (dict(k=9), ValueError, "k=9 exceeds the number of synthetic"),
        (dict(k=0), ValueError, "k must be an integer >= 1"),
        (dict(metric="hamming"), ValueError, "metric must be one of"),
        (dict(shard_synthetic=1), TypeError, "shard_synthetic must be a bool"),
        (dict(group_ids=np.zeros(3, np.int64)), ValueError, "group_ids must have shape"),
        (dict(group_ids=np.zeros(10)), TypeError, "group_ids must be integers"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    rng = np.random.default_rng(0)
    args = dict(mesh=_mesh())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sharding.sharded_vote_histogram(
            rng.normal(size=(10, 2)).astype(np.float32),
            rng.normal(size=(8, 2)).astype(np.float32),
            **args,
        )


def test_bad_embeddings_are_named():
    mesh = _mesh()
    private = np.zeros((10, 2), np.float32)
    private[6, 1] = np.inf
    with pytest.raises(ValueError, match=r"private contains NaN or Inf \(first in row 6\)"):
        sharding.sharded_vote_histogram(private, np.zeros((3, 2), np.float32), mesh=mesh)
    with pytest.raises(ValueError, match="same embedding dimension"):
        sharding.sharded_vote_histogram(
            np.zeros((4, 3), np.float32), np.zeros((3, 2), np.float32), mesh=mesh
        )
    with pytest.raises(TypeError, match="floating dtype"):
        sharding.sharded_vote_histogram(
            np.zeros((4, 2), np.int32), np.zeros((3, 2), np.float32), mesh=mesh
        )
    with pytest.raises(ValueError, match="private must not be empty"):
        sharding.sharded_vote_histogram(
            np.zeros((0, 2), np.float32), np.zeros((3, 2), np.float32), mesh=mesh
        )


def test_noise_is_the_single_device_mechanism():
    rng = np.random.default_rng(1)
    private = rng.normal(size=(50, 4)).astype(np.float32)
    synthetic = rng.normal(size=(7, 4)).astype(np.float32)
    key = jax.random.key(11)
    got = sharding.sharded_noisy_histogram(
        key, private, synthetic, mesh=_mesh(), noise_multiplier=3.0
    )
    ref = pejax.add_gaussian_noise(
        key, pejax.vote_histogram(private, synthetic), noise_multiplier=3.0
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        sharding.sharded_noisy_histogram(
            key, private, synthetic, mesh=_mesh(), noise_multiplier=-1.0
        )


def test_runtime_helpers_on_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() == (0, 1)
    assert sharding.is_checkpoint_writer()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        sharding.initialize_distributed()
    with pytest.raises(ValueError, match="process_id must be < num_processes"):
        sharding.initialize_distributed(num_processes=2, process_id=2)


def test_docstring_examples():
    result = doctest.testmod(sharding, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
