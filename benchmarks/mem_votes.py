"""Memory of one vote: extra resident memory of a ``pejax.vote_histogram`` call, and the kernel's compiled temporaries.

Runs in this process (start one process per measurement: peak RSS is per process). The inputs are made first;
one call compiles; then, per call, the peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs`` and the
extra memory is the peak during the call minus the RSS before it (what the call needs beyond the runtime and its
inputs). ``--aligned`` puts the inputs on 64-byte boundaries (XLA:CPU then uses them in place); by default they
are plain NumPy arrays (16-byte aligned, copied to the device), as ``experiments/bench_votes.py`` makes them.
``--stream`` votes a ``.npy`` file of the private rows with ``streamed_vote_histogram`` instead. Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` for figures that do not depend on the allocator's history: glibc otherwise may
keep the previous call's large freed blocks resident and reuse them, hiding a copy (seen: 34 instead of 57 MiB).

Usage (from the repository root)::

  python benchmarks/mem_votes.py 10000 10000 2048 --k 1            # the bench's d2048 case
  python benchmarks/mem_votes.py 10000 10000 2048 --aligned
  python benchmarks/mem_votes.py 70000 100000 256 --stream /tmp/mem_votes   # streamed, 65536-row chunks
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import time

import numpy as np


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _make(rows: int, d: int, seed: int, aligned: bool) -> np.ndarray:
    if aligned:
        buf = np.empty(rows * d * 4 + 64, np.uint8)
        offset = -buf.ctypes.data % 64
        x = buf[offset : offset + rows * d * 4].view(np.float32).reshape(rows, d)
    else:
        x = np.empty((rows, d), np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 4096):
        stop = min(start + 4096, rows)
        x[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int)
    parser.add_argument("m", type=int)
    parser.add_argument("d", type=int)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--aligned", action="store_true", help="64-byte-aligned NumPy inputs")
    parser.add_argument(
        "--stream", metavar="DIR", help="vote a .npy file in DIR with streamed_vote_histogram"
    )
    parser.add_argument(
        "--calls", type=int, default=2, help="measured calls (the largest extra is kept)"
    )
    args = parser.parse_args(argv)

    synthetic = _make(args.m, args.d, 1, args.aligned)
    if args.stream:
        path = pathlib.Path(args.stream) / f"private_{args.n}x{args.d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            np.save(path, _make(args.n, args.d, 0, False))
        private = str(path)
    else:
        private = _make(args.n, args.d, 0, args.aligned)

    import jax
    import jax.numpy as jnp

    import pejax
    from pejax import neighbors
    from pejax.streaming import streamed_vote_histogram

    def call():
        if args.stream:
            return np.asarray(streamed_vote_histogram(private, synthetic, k=args.k))
        return np.asarray(pejax.vote_histogram(private, synthetic, k=args.k))

    call()  # compiles
    extra, seconds, before = 0.0, [], 0.0
    for _ in range(args.calls):
        gc.collect()
        before = _status_mib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        hist = call()
        seconds.append(time.perf_counter() - start)
        extra = max(extra, _status_mib("VmHWM") - before)
    assert round(float(hist.sum()) * np.sqrt(args.k)) == args.n * args.k
    plan = neighbors.block_plan(
        args.n, args.m, block_size=None, key_block_size=None, precision="highest"
    )
    spec = (
        jax.ShapeDtypeStruct((args.n, args.d), jnp.float32),
        jax.ShapeDtypeStruct((args.m, args.d), jnp.float32),
    )
    stats = jax.jit(lambda p, s: pejax.vote_histogram(p, s, k=args.k)).lower(*spec).compile()
    temp = stats.memory_analysis().temp_size_in_bytes / 2**20
    block = plan["query_block"] * plan["key_block"] * 4 / 2**20
    inputs = (args.n + args.m) * args.d * 4 / 2**20
    print(
        f"{args.n} x {args.m} x {args.d}, k={args.k}, {'streamed' if args.stream else 'in memory'}, "
        f"{'64-byte-aligned' if args.aligned else 'plain NumPy (16-byte-aligned)'} inputs ({inputs:.0f} MiB): "
        f"RSS before {before:.0f} MiB, extra during the call {extra:.0f} MiB, peak {before + extra:.0f} MiB; "
        f"kernel temporaries (memory_analysis, whole inputs in memory) {temp:.1f} MiB; score block "
        f"{plan['query_block']} x {plan['key_block']} ({block:.1f} MiB); fastest call {min(seconds):.3f} s; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
