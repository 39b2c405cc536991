"""Compilations and cold- vs warm-cache time of the digits demo (issue 13's "compile once" target).

Runs ``pejax demo`` three times, each in a fresh process:

1. cold: ``PEJAX_CACHE_DIR=off`` (no persistent compilation cache) and ``JAX_LOG_COMPILES=1``: counts the XLA
   programs compiled ("Finished XLA compilation" lines) and sums their compile seconds;
2. fill: a fresh cache folder is filled (not reported);
3. warm: the same cache folder, now warm.

All three use ``--noise-seed 0`` (the same run each time: a fresh secret noise key gives other noisy class counts,
hence possibly other padded sizes and programs).

PE time is the sum of the engine's phase timings over all iterations (``report.json``: iteration 0's generation
plus each iteration's total); run time is ``wall_seconds`` (``PrivateEvolution.run`` with its callbacks). The
machine state (load average before and after, cores, thread settings) is recorded beside the figures; the script
refuses to write a results file when the 1-minute load average is above 0.5 unless ``--allow-busy`` (then the
file says so).

    python benchmarks/bench_compile.py --out benchmarks/results/compile_cold_warm.md
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
from _machine import busy_cpu_s
from _machine import own_cpu_s


def _demo(out: pathlib.Path, env: dict[str, str], extra: list[str]) -> tuple[dict, str]:
    cmd = [str(pathlib.Path(sys.executable).parent / "pejax"), "demo", "--out", str(out), *extra]
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text()), proc.stdout + proc.stderr


def pe_seconds(report: dict) -> float:
    """Sum of the engine's phase timings (iteration 0: generation; then each iteration's total)."""
    total = 0.0
    for it in report["iterations"]:
        t = it["timings"]
        total += t.get("total", sum(t.values()))
    return total


def compiles(log: str) -> tuple[int, float]:
    seconds = [
        float(s) for s in re.findall(r"Finished XLA compilation of .* in ([0-9.eE+-]+) sec", log)
    ]
    return len(seconds), sum(seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=None, help="markdown results file")
    ap.add_argument("--iterations", type=int, default=None, help="override pe.iterations")
    ap.add_argument("--allow-busy", action="store_true")
    args = ap.parse_args(argv)
    # A fixed noise seed: the class sizes (hence the padded shapes) come from noisy class counts, so runs with
    # fresh secret noise may need other programs; the comparison is of the same run, cold and warm.
    extra = ["--noise-seed", "0"]
    extra += [] if args.iterations is None else ["--iterations", str(args.iterations)]
    load_before = os.getloadavg()[0]
    if load_before > 0.5 and not args.allow_busy and args.out is not None:
        print(
            f"load average {load_before:.2f} > 0.5: refusing to write results (use --allow-busy)."
        )
        return 2
    rows = {}
    busy0, own0 = busy_cpu_s(), own_cpu_s()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        cache = tmp / "cache"
        t0 = time.perf_counter()
        cold, log = _demo(tmp / "cold", {"PEJAX_CACHE_DIR": "off", "JAX_LOG_COMPILES": "1"}, extra)
        rows["cold"] = (cold, *compiles(log))
        _demo(tmp / "fill", {"PEJAX_CACHE_DIR": str(cache)}, extra)
        warm, log = _demo(
            tmp / "warm", {"PEJAX_CACHE_DIR": str(cache), "JAX_LOG_COMPILES": "1"}, extra
        )
        rows["warm"] = (warm, *compiles(log))
        elapsed = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    # Other processes' CPU during the benchmark, in cores (the load average after counts the demo runs themselves).
    others = max(0.0, (busy_cpu_s() - busy0) - (own_cpu_s() - own0)) / elapsed
    busy = load_before > 0.5 or others > 0.2
    ratio = pe_seconds(rows["cold"][0]) / pe_seconds(rows["warm"][0])
    lines = [
        "# Cold vs warm compilation cache: the digits demo",
        "",
        f"- command: `python benchmarks/bench_compile.py {' '.join(argv or sys.argv[1:])}`",
        f"- machine: {os.cpu_count()} CPU cores; jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"OMP/OPENBLAS threads: {os.environ.get('OMP_NUM_THREADS', 'unset')}/"
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}",
        f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} (after includes the demo "
        f"runs themselves); other processes' CPU during the runs: {others:.2f} cores"
        + (" (BUSY: figures not comparable)" if busy else ""),
        f"- total benchmark time {elapsed:.0f} s (three demo runs)",
        "",
        "| run | XLA programs compiled | compile seconds | PE time (s) | run time (s) | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, (report, count, secs) in rows.items():
        acc = report.get("final_metrics", {}).get("test_accuracy", float("nan"))
        lines.append(
            f"| {name} | {count} | {secs:.2f} | {pe_seconds(report):.2f} | {report['wall_seconds']:.2f} | {acc:.3f} |"
        )
    lines += ["", f"PE time cold / warm: {ratio:.2f}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
