"""Subprocess helper for tests/test_sharding.py (not collected by pytest: its name starts with an underscore).

Usage:
  python _sharding_worker.py mesh OUT.npz        # 8 virtual CPU devices (set XLA_FLAGS before starting)
  python _sharding_worker.py multi OUT.npz PORT PROCESS_ID NUM_PROCESSES

Both modes assert what they can locally and save the histograms to OUT.npz for the parent test to compare with
the single-process, single-device result.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

N, M, D = 1001, 37, 5
# Rows of the private set held by each process in "multi" mode (unequal on purpose).
SPLIT = 600

# (metric, k, shard_synthetic, grouped): every metric, k = 1 and k > 1, both key layouts, user level.
CASES = (
    ("l2", 1, False, False),
    ("l2", 3, True, False),
    ("cosine", 1, True, False),
    ("cosine", 2, False, True),
    ("ip", 3, False, False),
    ("ip", 2, True, True),
)
# The cases also run on a 2-D mesh.
CASES_2D = (CASES[1], CASES[5])
# The cases the two-process test runs.
CASES_MULTI = (CASES[0], CASES[3], CASES[5])
NOISE_MULTIPLIER = 2.0


def data():
    rng = np.random.default_rng(7)
    private = rng.normal(size=(N, D)).astype(np.float32)
    synthetic = rng.normal(size=(M, D)).astype(np.float32)
    synthetic[20] = synthetic[
        3
    ]  # exact duplicates: ties must go to the lowest index (3) everywhere
    synthetic[36] = synthetic[3]
    private[5] = synthetic[3]
    groups = rng.integers(0, 60, size=N) * 11 - 50  # sparse, negative, groups spanning every shard
    return private, synthetic, groups


def case_name(metric, k, shard_synthetic, grouped):
    return (
        f"{metric}_k{k}_{'ring' if shard_synthetic else 'repl'}_{'user' if grouped else 'sample'}"
    )


def run_cases(private, synthetic, groups, mesh, cases=CASES, **extra):
    import pejax.sharding as sh

    out = {}
    for metric, k, shard_synthetic, grouped in cases:
        out[case_name(metric, k, shard_synthetic, grouped)] = np.asarray(
            sh.sharded_vote_histogram(
                private,
                synthetic,
                mesh=mesh,
                k=k,
                metric=metric,
                group_ids=groups if grouped else None,
                shard_synthetic=shard_synthetic,
                **extra,
            )
        )
    return out


def mesh_mode(out_path):
    import pejax.sharding as sh

    assert jax.device_count() == 8, jax.devices()
    private, synthetic, groups = data()
    results = {}
    mesh8 = jax.make_mesh((8,), ("data",))
    for name, h in run_cases(private, synthetic, groups, mesh8).items():
        results[f"mesh8/{name}"] = h
    # Two mesh axes, private split over both (default) or over one only (replicated over the other).
    mesh24 = jax.make_mesh((2, 4), ("replica", "data"))
    for name, h in run_cases(private, synthetic, groups, mesh24, CASES_2D).items():
        results[f"mesh2x4/{name}"] = h
    for name, h in run_cases(
        private, synthetic, groups, mesh24, CASES_2D, axis_name="data"
    ).items():
        results[f"mesh2x4_data/{name}"] = h
    # Fewer rows than devices: some shards hold padding only.
    results["tiny/l2_k2_ring"] = np.asarray(
        sh.sharded_vote_histogram(private[:5], synthetic, mesh=mesh8, k=2, shard_synthetic=True)
    )
    # A small block size exercises several query blocks per device.
    results["blocks/l2_k1_repl"] = np.asarray(
        sh.sharded_vote_histogram(private, synthetic, mesh=mesh8, block_size=16, key_block_size=8)
    )
    results["noisy/l2_k1"] = np.asarray(
        sh.sharded_noisy_histogram(
            jax.random.key(3), private, synthetic, mesh=mesh8, noise_multiplier=NOISE_MULTIPLIER
        )
    )
    np.savez(out_path, **results)


def multi_mode(out_path, port, process_id, num_processes):
    import pejax.sharding as sh

    # jax.distributed with gloo CPU collectives (JAX's default on CPU: jax_cpu_collectives_implementation).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    index, count = sh.initialize_distributed(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert (index, count) == (process_id, num_processes)
    assert sh.initialize_distributed() == (index, count)  # a second call is a no-op
    assert sh.is_checkpoint_writer() == (process_id == 0)
    assert jax.device_count() == 2 * num_processes and jax.local_device_count() == 2
    private, synthetic, groups = data()
    bounds = (
        [0, SPLIT, N] if num_processes == 2 else np.linspace(0, N, num_processes + 1).astype(int)
    )
    lo, hi = int(bounds[process_id]), int(bounds[process_id + 1])
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    results = {
        f"multi/{name}": h
        for name, h in run_cases(
            private[lo:hi], synthetic, groups[lo:hi], mesh, CASES_MULTI
        ).items()
    }
    results["noisy/l2_k1"] = np.asarray(
        sh.sharded_noisy_histogram(
            jax.random.key(3),
            private[lo:hi],
            synthetic,
            mesh=mesh,
            noise_multiplier=NOISE_MULTIPLIER,
        )
    )
    # A key that differs between processes would mean one draw per process: refused on every process.
    try:
        sh.sharded_noisy_histogram(
            jax.random.key(100 + process_id),
            private[lo:hi],
            synthetic,
            mesh=mesh,
            noise_multiplier=1.0,
        )
    except ValueError as err:
        assert "differs between processes" in str(err), err
    else:
        raise AssertionError("a per-process key was accepted")
    # A NaN on one process is reported on every process (nobody is left waiting in a collective).
    bad = private[lo:hi].copy()
    if process_id == 1:
        bad[7, 2] = np.nan
    try:
        sh.sharded_vote_histogram(bad, synthetic, mesh=mesh)
    except ValueError as err:
        assert "row 7 of process 1" in str(err), err
    else:
        raise AssertionError("a NaN row was accepted")
    # Different synthetic embeddings on different processes are refused everywhere.
    try:
        sh.sharded_vote_histogram(private[lo:hi], synthetic + process_id, mesh=mesh)
    except ValueError as err:
        assert "synthetic differs between processes" in str(err), err
    else:
        raise AssertionError("inconsistent synthetic embeddings were accepted")
    np.savez(out_path, **results)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "mesh":
        mesh_mode(out)
    elif mode == "multi":
        multi_mode(out, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
