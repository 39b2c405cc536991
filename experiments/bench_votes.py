"""Times ``pejax.vote_histogram`` against the reference implementation's nearest-neighbour backends.

The reference (microsoft/DPSDA, package ``pe``) builds the vote histogram with one of three backends:
faiss-cpu ``IndexFlatL2`` + ``np.bincount``, scikit-learn ``NearestNeighbors(algorithm="brute", metric="l2")``
and ``torch.cdist`` + ``topk`` on the full n x m matrix. This script times all of them side by side in one
process, alternating the methods within each repetition (the machine's speed drifts), and compares each with
the GEMM floor ``2 n m d / rate``, where ``rate`` is the fastest float32 matmul rate measured on this machine
(NumPy or JAX) at the case's shape.

scikit-learn runs twice: with ``metric="l2"`` as the reference passes it (scikit-learn routes that name to a
generic per-pair distance loop) and with ``metric="euclidean"`` (its matmul path, same distances). When the
``"l2"`` loop would take longer than ``--slow-cap`` seconds, it is timed on a subsample of the queries and
scaled by ``n / subsample`` (it is linear in n), and the table marks the number with ``~``.

Usage (from the repository root)::

  python experiments/bench_votes.py                  # all cases, 3 repetitions; writes the results file
  python experiments/bench_votes.py --quick          # tiny sizes, a smoke test of a few seconds
  python experiments/bench_votes.py --cases small,d2048 --repeats 5

Requires the ``bench`` extra (faiss-cpu, scikit-learn, torch). Thread counts are left at their defaults,
which on this machine means every library uses all cores; the script prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pejax
from pejax import neighbors as pejax_neighbors

SEED = 0
AGREEMENT_ROWS = 500


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    n: int
    m: int
    d: int
    k: int
    full_matrix: bool = True  # False: the n x m matrix does not fit; sklearn and torch are skipped.


CASES = {
    "small": Case(name="small", n=2000, m=2000, d=64, k=1),
    "d2048": Case(name="d2048", n=10000, m=10000, d=2048, k=1),
    "d512": Case(name="d512", n=50000, m=20000, d=512, k=1),
    "k4": Case(name="k4", n=20000, m=20000, d=2048, k=4),
    "large": Case(name="large", n=200000, m=50000, d=256, k=1, full_matrix=False),
}

QUICK = {
    "small": Case(name="small", n=300, m=200, d=16, k=1),
    "d2048": Case(name="d2048", n=600, m=500, d=128, k=1),
    "d512": Case(name="d512", n=900, m=400, d=64, k=1),
    "k4": Case(name="k4", n=500, m=500, d=128, k=4),
    "large": Case(name="large", n=3000, m=1500, d=32, k=1, full_matrix=False),
}


def make_data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian float32 data with cluster structure: 64 shared centres plus unit noise (fixed seed)."""
    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((64, case.d), dtype=np.float32) * 2.0
    private = centres[rng.integers(0, 64, case.n)]
    private += rng.standard_normal((case.n, case.d), dtype=np.float32)
    synthetic = centres[rng.integers(0, 64, case.m)]
    synthetic += rng.standard_normal((case.m, case.d), dtype=np.float32)
    return private, synthetic


# ---------------------------------------------------------------------------------------------------------
# The methods. Each takes (private, synthetic, k) as NumPy float32 and returns ((m,) histogram, ids or None).


def run_pejax(private, synthetic, k):
    hist = pejax.vote_histogram(private, synthetic, k=k)
    return np.asarray(hist), None


def run_faiss(private, synthetic, k):
    import faiss

    index = faiss.IndexFlatL2(synthetic.shape[1])
    index.add(synthetic)
    _, ids = index.search(private, k)
    hist = np.bincount(ids.ravel(), minlength=synthetic.shape[0]) / np.sqrt(k)
    return hist.astype(np.float32), ids


def _sklearn(metric):
    def run(private, synthetic, k):
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute", n_jobs=-1)
        nn.fit(synthetic)
        _, ids = nn.kneighbors(private)
        hist = np.bincount(ids.ravel(), minlength=synthetic.shape[0]) / np.sqrt(k)
        return hist.astype(np.float32), ids

    return run


def run_torch(private, synthetic, k):
    import torch

    priv = torch.tensor(private, dtype=torch.float32)
    syn = torch.tensor(synthetic, dtype=torch.float32)
    dist = torch.cdist(priv, syn, p=2)
    _, ids = torch.topk(dist, k=k, dim=1, largest=False)
    del dist
    ids = ids.numpy()
    hist = np.bincount(ids.ravel(), minlength=synthetic.shape[0]) / np.sqrt(k)
    return hist.astype(np.float32), ids


# ---------------------------------------------------------------------------------------------------------
# The GEMM floor: the fastest float32 matmul rate (flop/s) of NumPy or JAX at (block x d) @ (d x m).


@jax.jit
def _jax_matmul(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def gemm_methods(private, synthetic) -> dict[str, Callable[[], float]]:
    """Returns timers: each runs one matmul and returns its rate in flop/s."""
    n, d = private.shape
    m = synthetic.shape[0]
    b_np = np.ascontiguousarray(synthetic.T)
    b_jax = jnp.asarray(b_np)
    timers = {}
    for rows in sorted({min(n, 512), min(n, 2048)}):
        a_np = private[:rows]
        a_jax = jnp.asarray(a_np)
        flops = 2.0 * rows * m * d

        def numpy_rate(a=a_np, flops=flops):
            start = time.perf_counter()
            a @ b_np
            return flops / (time.perf_counter() - start)

        def jax_rate(a=a_jax, flops=flops):
            start = time.perf_counter()
            _jax_matmul(a, b_jax).block_until_ready()
            return flops / (time.perf_counter() - start)

        timers[f"numpy {rows}x{d}@{d}x{m}"] = numpy_rate
        timers[f"jax {rows}x{d}@{d}x{m}"] = jax_rate
    return timers


# ---------------------------------------------------------------------------------------------------------
# Agreement with a float64 reference on a subsample of queries.


def float64_reference(private, synthetic, k, rows):
    """Top-k ids in float64 for the query rows ``rows`` and a mask of rows without a near-tie."""
    q = private[rows].astype(np.float64)
    x = synthetic.astype(np.float64)
    dist = (q * q).sum(1)[:, None] - 2.0 * q @ x.T + (x * x).sum(1)[None, :]
    order = np.argsort(dist, axis=1, kind="stable")[:, : k + 1]
    sorted_d = np.take_along_axis(dist, order, axis=1)
    # A near-tie: the k-th and (k+1)-th distances differ by less than float32 can resolve.
    scale = (q * q).sum(1) + (x * x).sum(1).max()
    clear = (sorted_d[:, k] - sorted_d[:, k - 1]) > 1e-5 * scale
    return order[:, :k], clear


def agreement(ids, ref_ids, clear) -> float:
    same = np.array([set(a) == set(b) for a, b in zip(ids.tolist(), ref_ids.tolist(), strict=True)])
    return float(same[clear].mean())


# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    case: Case
    times: dict[str, list[float]]
    notes: dict[str, str]
    compile_s: float
    floor: list[float]
    block: tuple[int, int]
    agree_pejax: float
    agree_faiss: float
    near_ties: int
    hist_l1: float
    gemm_best: str


def time_case(case: Case, repeats: int, slow_cap: float, log) -> Row:
    private, synthetic = make_data(case)
    n, m, d, k = case.n, case.m, case.d, case.k
    log(f"\n== {case.name}: n={n} m={m} d={d} k={k}")
    methods: dict[str, Callable] = {"pejax": run_pejax, "faiss": run_faiss}
    notes: dict[str, str] = {}
    scale_factor: dict[str, float] = {}
    inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if case.full_matrix:
        methods["sklearn euclidean"] = _sklearn("euclidean")
        methods["sklearn l2"] = _sklearn("l2")
        full_bytes = 4.0 * n * m
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if full_bytes * 2.5 < avail:
            methods["torch"] = run_torch
        else:
            notes["torch"] = "OOM / skipped"
    else:
        reason = f"skipped: n x m float32 = {4.0 * n * m / 2**30:.3g} GiB"
        notes["sklearn euclidean"] = notes["sklearn l2"] = notes["torch"] = reason

    # Compile pejax (first call) and warm the others up; pilot the slow per-pair sklearn "l2" loop.
    start = time.perf_counter()
    run_pejax(private, synthetic, k)
    first_call = time.perf_counter() - start
    for name in methods:
        inputs[name] = (private, synthetic)
    if "sklearn l2" in methods:
        pilot = min(n, 200)
        start = time.perf_counter()
        methods["sklearn l2"](private[:pilot], synthetic, k)
        est = (time.perf_counter() - start) * n / pilot
        if est > slow_cap:
            sub = max(pilot, int(n * slow_cap / est))
            inputs["sklearn l2"] = (private[:sub], synthetic)
            scale_factor["sklearn l2"] = n / sub
            notes["sklearn l2"] = f"~ timed on {sub} of {n} queries, scaled x{n / sub:.1f}"
            log(f"   sklearn l2 estimated {est:.0f} s: timing {sub} queries and scaling")
    light = n * m * d < 5e11
    for name, fn in methods.items():
        if name != "pejax" and light:
            fn(*inputs[name], k)
    gemms = gemm_methods(private, synthetic)
    for g in gemms.values():
        g()

    times: dict[str, list[float]] = {name: [] for name in methods}
    floor: list[float] = []
    best_gemm: dict[str, float] = {g: 0.0 for g in gemms}
    names = list(methods)
    for rep in range(repeats):
        # Rotate the order each repetition so no method always runs first or after the same neighbour.
        order = names[rep % len(names) :] + names[: rep % len(names)]
        rates = {}
        for name in order:
            gc.collect()
            start = time.perf_counter()
            try:
                methods[name](*inputs[name], k)
            except (RuntimeError, MemoryError) as err:  # torch's full matrix
                notes[name] = f"OOM / skipped ({type(err).__name__})"
                times.pop(name)
                names.remove(name)
                del methods[name]
                continue
            times[name].append((time.perf_counter() - start) * scale_factor.get(name, 1.0))
            if name == "pejax":
                for g, fn in gemms.items():
                    rates[g] = fn()
                    best_gemm[g] = max(best_gemm[g], rates[g])
        floor.append(2.0 * n * m * d / max(rates.values()))
        log(
            f"   rep {rep}: "
            + ", ".join(f"{name} {times[name][-1]:.3f}s" for name in names)
            + f", floor {floor[-1]:.3f}s"
        )
    compile_s = max(0.0, first_call - float(np.median(times["pejax"])))

    # Agreement with float64 on a subsample; pejax ids from nearest_neighbors (same kernel as the histogram).
    rows = np.random.default_rng(SEED + 1).choice(n, size=min(n, AGREEMENT_ROWS), replace=False)
    ref_ids, clear = float64_reference(private, synthetic, k, rows)
    pejax_ids = np.asarray(pejax.nearest_neighbors(private[rows], synthetic, k=k).indices)
    faiss_hist, faiss_ids = run_faiss(private, synthetic, k)
    pejax_hist, _ = run_pejax(private, synthetic, k)
    plan = pejax_neighbors.block_plan(
        n, m, block_size=None, key_block_size=None, precision="highest"
    )
    return Row(
        case=case,
        times=times,
        notes=notes,
        compile_s=compile_s,
        floor=floor,
        block=(plan["query_block"], plan["key_block"]),
        agree_pejax=agreement(pejax_ids, ref_ids, clear),
        agree_faiss=agreement(faiss_ids[rows], ref_ids, clear),
        near_ties=int((~clear).sum()),
        hist_l1=float(np.abs(pejax_hist - faiss_hist).sum()),
        gemm_best=max(best_gemm, key=best_gemm.get),
    )


def _median(xs):
    return float(np.median(xs))


def _paired_ratio(a, b):
    return _median(np.asarray(a) / np.asarray(b))


def table(rows: list[Row]) -> str:
    methods = ["pejax", "faiss", "sklearn l2", "sklearn euclidean", "torch"]
    head = (
        ["case", "n x m x d, k"]
        + [f"{name} (s)" for name in methods]
        + [
            "GEMM floor (s)",
            "pejax / faiss",
            "pejax / floor",
            "faiss / floor",
            "pejax compile (s)",
            "pejax block (rows x keys, MiB)",
            "ids = f64: pejax",
            "ids = f64: faiss",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.case
        cells = [c.name, f"{c.n} x {c.m} x {c.d}, k={c.k}"]
        for name in methods:
            if name in r.times:
                mark = "~" if name in r.notes else ""
                cells.append(f"{mark}{_median(r.times[name]):.3f}")
            else:
                cells.append(r.notes.get(name, "-"))
        rows_, keys_ = r.block
        cells += [
            f"{_median(r.floor):.3f}",
            f"{_paired_ratio(r.times['pejax'], r.times['faiss']):.2f}",
            f"{_paired_ratio(r.times['pejax'], r.floor):.2f}",
            f"{_paired_ratio(r.times['faiss'], r.floor):.2f}",
            f"{r.compile_s:.2f}",
            f"{rows_} x {keys_} ({rows_ * keys_ * 4 / 2**20:.1f})",
            f"{100 * r.agree_pejax:.2f}%",
            f"{100 * r.agree_faiss:.2f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"


def versions() -> str:
    import faiss
    import sklearn
    import torch

    return (
        f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}, "
        f"faiss-cpu {faiss.__version__}, scikit-learn {sklearn.__version__}, torch {torch.__version__}, "
        f"pejax {pejax.__version__}"
    )


def threads() -> str:
    import faiss
    import torch

    return (
        f"faiss omp threads {faiss.omp_get_max_threads()}, torch threads {torch.get_num_threads()}, "
        f"numpy/OpenBLAS and XLA:CPU at their defaults (all {os.cpu_count()} cores)"
    )


def write_results(args, header, rows, log, *, final):
    result = table(rows)
    details = [
        f"- {r.case.name}: GEMM floor from the fastest of {{numpy, jax}} matmuls (best: {r.gemm_best}); "
        f"{r.near_ties} of {min(r.case.n, AGREEMENT_ROWS)} sampled queries near-tied in float64 (left out); "
        f"|hist_pejax - hist_faiss|_1 = {r.hist_l1:.3g} (full run)"
        + "".join(f"; {name}: {note}" for name, note in r.notes.items())
        for r in rows
    ]
    if final:
        log("\n" + result + "\n")
        for line in details:
            log(line)
    if not args.out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# vote_histogram benchmark\n\n")
        f.write("\n".join(f"- {line}" for line in header) + "\n")
        f.write(
            f"- timing: median of {args.repeats} repetitions after pejax's first (compiling) call and, "
            "where n m d < 5e11, one warm-up call of every other method; pejax compile time = first "
            "call - median; methods alternate within each "
            "repetition, in rotated order; ratios are medians of per-repetition ratios. Inputs are "
            "NumPy float32 for every method (pejax's time includes the host-to-device copy, "
            "validation and compilation cache lookup).\n"
        )
        f.write(
            f"- ids = f64: fraction of {AGREEMENT_ROWS} random queries whose top-k id set equals the "
            "float64 reference, near-ties left out. pejax ids from `pejax.nearest_neighbors` on those "
            "queries (the same kernel as the histogram).\n"
        )
        f.write(
            "- pejax block: the query block x key block of one score block; pejax's extra memory is "
            "that many float32 (plus O(n k) outputs and O(m) histogram), never n x m.\n\n"
        )
        f.write(result + "\n\n" + "\n".join(details) + "\n")
    if final:
        log(f"\nwrote {args.out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions after warm-up (>= 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds"
    )
    parser.add_argument(
        "--slow-cap", type=float, default=6.0, help="seconds before sklearn l2 is subsampled"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "bench_votes.md"),
        help="markdown results file ('' to skip writing)",
    )
    args = parser.parse_args(argv)
    catalogue = QUICK if args.quick else CASES
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in catalogue]
    if unknown or args.repeats < 1:
        parser.error(f"unknown cases {unknown} (choose from {list(catalogue)}) or --repeats < 1")

    def log(msg):
        print(msg, flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    header = [
        f"machine: {machine()}",
        f"versions: {versions()}",
        f"threads: {threads()}",
        f"command: `{command}`",
    ]
    for line in header:
        log(line)
    rows: list[Row] = []
    for name in names:
        rows.append(time_case(catalogue[name], args.repeats, args.slow_cap, log))
        # Written after every case, so a long run that is stopped still leaves the finished cases.
        write_results(args, header, rows, log, final=name == names[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
