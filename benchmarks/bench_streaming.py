"""Streaming benchmark: private embeddings on disk, voted in chunks, pejax against faiss-cpu.

The private set is generated straight into a float32 ``.npy`` file in batches (fixed seed, never whole in
memory) with :func:`pejax.streaming.embed_to_memmap`; the synthetic set is generated in memory. Each method runs
in its own subprocess so that its peak resident memory is its own:

* ``pejax``: :func:`pejax.streaming.streamed_vote_histogram` on the file (``chunk_rows`` rows at a time).
* ``faiss``: ``faiss.IndexFlatL2`` holding the synthetic set, searched with the same chunks of private rows
  (read from the file the same way), votes counted with ``np.bincount``.

Both report the time of the vote (synthetic already in memory), RSS before the vote, the peak RSS during the vote
(``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs`` just before the vote, so neither
data generation nor compilation counts; it counts every resident page of the process, runtime included) and the
extra memory of the vote (that peak less the RSS before it), and the histograms are compared (votes that differ:
float32 near-ties).

Usage::

    python benchmarks/bench_streaming.py all --cases 2000000x8192 200000x100000 \
        --workdir /tmp/pejax_bench --out benchmarks/results/bench_streaming.md
    python benchmarks/bench_streaming.py all --cases 20000x1000 --workdir /tmp/pejax_bench_small  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

DIM = 256
GEN_BATCH = 65536


def _rss_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                name, value, _ = line.split()
                out[name.rstrip(":")] = int(value)
    return out


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _synthetic(m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(m, DIM)).astype(np.float32)


def generate(path: pathlib.Path, rows: int, seed: int) -> float:
    """Writes ``rows`` x 256 float32 Gaussian rows to ``path``; batch b uses seed (seed, b), so prefixes agree."""
    from pejax.streaming import PrivateDataOnDiskWarning
    from pejax.streaming import embed_to_memmap

    def batches():
        for b, start in enumerate(range(0, rows, GEN_BATCH)):
            rng = np.random.default_rng([seed, b])
            yield rng.normal(size=(min(GEN_BATCH, rows - start), DIM)).astype(np.float32)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Benchmark data is random, not private; real private embeddings must keep this warning.
        warnings.simplefilter("ignore", PrivateDataOnDiskWarning)
        embed_to_memmap(batches(), lambda x: x, path, dim=DIM, num_rows=rows, overwrite=True)
    return time.perf_counter() - t0


def _read_chunks(path: pathlib.Path, chunk_rows: int):
    """The same plain-read chunking as pejax uses for ``.npy`` files (page cache, not process memory)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        (n, d), _, dtype = read(f)
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            yield np.fromfile(f, dtype=dtype, count=rows * d).reshape(rows, d)


def run_method(
    method: str, path: pathlib.Path, m: int, seed: int, chunk_rows: int, out: pathlib.Path
):
    synthetic = _synthetic(m, seed)
    if method == "pejax":
        import jax

        from pejax.streaming import streamed_vote_histogram

        # Compile on one chunk's shape first, outside the timing (the kernel compiles once per shape).
        warm = np.zeros((chunk_rows, DIM), np.float32)
        streamed_vote_histogram(warm, synthetic, chunk_rows=chunk_rows).block_until_ready()
        del warm
        before = _rss_kib()
        reset = _reset_peak()
        t0 = time.perf_counter()
        hist = streamed_vote_histogram(path, synthetic, chunk_rows=chunk_rows, k=1, metric="l2")
        counts = np.asarray(hist).astype(np.int64)
        seconds = time.perf_counter() - t0
        version = f"jax {jax.__version__} ({jax.default_backend()})"
    elif method == "faiss":
        import faiss

        index = faiss.IndexFlatL2(DIM)
        index.add(synthetic)
        before = _rss_kib()
        reset = _reset_peak()
        t0 = time.perf_counter()
        counts = np.zeros(m, np.int64)
        for chunk in _read_chunks(path, chunk_rows):
            _, nearest = index.search(chunk, 1)
            counts += np.bincount(nearest.ravel(), minlength=m)
        seconds = time.perf_counter() - t0
        version = f"faiss-cpu {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"
    else:
        raise SystemExit(f"unknown method {method!r}")
    after = _rss_kib()
    np.save(out.with_suffix(".npy"), counts)
    out.write_text(
        json.dumps(
            {
                "method": method,
                "version": version,
                "seconds": seconds,
                "rss_before_vote_mib": before["VmRSS"] / 1024,
                "peak_rss_mib": after["VmHWM"] / 1024,
                "extra_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
                "peak_reset": reset,
                "votes": int(counts.sum()),
            }
        )
    )


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, no GPU"


def run_all(args):
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = []
    results = []
    for case in args.cases:
        n, m = (int(v) for v in case.split("x"))
        path = workdir / f"private_{n}x{DIM}.npy"
        gen = generate(path, n, args.seed)
        size_gib = path.stat().st_size / 2**30
        per_method = {}
        for method in ("pejax", "faiss"):
            out = workdir / f"{method}_{n}x{m}.json"
            load = os.getloadavg()[0]
            cmd = [
                sys.executable,
                __file__,
                "method",
                method,
                "--path",
                str(path),
                "--synthetic",
                str(m),
                "--seed",
                str(args.seed + 1),
                "--chunk-rows",
                str(args.chunk_rows),
                "--json",
                str(out),
            ]
            print("running", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            res = json.loads(out.read_text())
            res["load_before"] = load
            res["load_after"] = os.getloadavg()[0]
            per_method[method] = res
            print(res, flush=True)
        a = np.load(workdir / f"pejax_{n}x{m}.npy")
        b = np.load(workdir / f"faiss_{n}x{m}.npy")
        differ = int(np.abs(a - b).sum()) // 2
        flops = 2.0 * n * m * DIM
        for method, res in per_method.items():
            results.append((n, m, size_gib, gen, method, res, flops, differ))
    lines.append(
        "| private n x d | synthetic m | file | method | vote time | GFLOP/s | peak RSS | RSS before vote | "
        "extra during vote | load avg (1 min, before/after) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for n, m, size_gib, _, method, res, flops, _ in results:
        lines.append(
            f"| {n:,} x {DIM} | {m:,} | {size_gib:.2f} GiB | {method}: {res['version']} | {res['seconds']:.1f} s | "
            f"{flops / res['seconds'] / 1e9:.1f} | {res['peak_rss_mib']:.0f} MiB | "
            f"{res['rss_before_vote_mib']:.0f} MiB | "
            f"{res['extra_mib']:.0f} MiB{'' if res['peak_reset'] else ' (peak not reset: whole run)'} | "
            f"{res['load_before']:.1f} / {res['load_after']:.1f} |"
        )
    lines.append("")
    for n, m, _, gen, method, _, _, differ in results:
        if method == "pejax":
            lines.append(
                f"- {n:,} x {m:,}: the pejax and faiss histograms differ by {differ} of {n:,} votes "
                f"(half their L1 distance; float32 near-ties); writing the file took {gen:.1f} s."
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        header = (
            f"Command: `python benchmarks/bench_streaming.py all --cases {' '.join(args.cases)} "
            f"--chunk-rows {args.chunk_rows} --seed {args.seed}`\n\nMachine: {_machine()}.\n\n"
        )
        pathlib.Path(args.out).write_text(header + text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_all = sub.add_parser("all", help="generate the data and run both methods for each case")
    p_all.add_argument(
        "--cases", nargs="+", default=["2000000x100000"], help="N x M, e.g. 2000000x100000"
    )
    p_all.add_argument("--workdir", default="/tmp/pejax_bench")
    p_all.add_argument("--chunk-rows", type=int, default=65536)
    p_all.add_argument("--seed", type=int, default=0)
    p_all.add_argument("--out", default=None, help="markdown file for the results table")
    p_m = sub.add_parser("method", help="one method in this process (used by 'all')")
    p_m.add_argument("method", choices=["pejax", "faiss"])
    p_m.add_argument("--path", required=True)
    p_m.add_argument("--synthetic", type=int, required=True)
    p_m.add_argument("--seed", type=int, default=1)
    p_m.add_argument("--chunk-rows", type=int, default=65536)
    p_m.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.command == "all":
        run_all(args)
    else:
        run_method(
            args.method,
            pathlib.Path(args.path),
            args.synthetic,
            args.seed,
            args.chunk_rows,
            pathlib.Path(args.json),
        )


if __name__ == "__main__":
    main()
