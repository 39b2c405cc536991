"""Times ``pejax.vote_histogram`` against the reference implementation's nearest-neighbour backends, honestly.

The reference (microsoft/DPSDA, package ``pe``) builds the vote histogram with one of three backends:
faiss-cpu ``IndexFlatL2`` + ``np.bincount``, scikit-learn ``NearestNeighbors(algorithm="brute", metric="l2")``
and ``torch.cdist`` + ``topk`` on the full n x m matrix. pejax runs with each of its search backends
(``backend="xla"``, ``"blas"``, ``"faiss"``). Inputs are NumPy float32 for every method.

How the numbers are made trustworthy:

* **One process per method** (a worker started for each case), so every method's import, threads and memory
  are its own. Each worker reports its thread settings and which BLAS / OpenMP libraries it loaded
  (threadpoolctl), printed and written to the results file.
* **Peak memory per call**: before each timed call the worker resets its peak RSS (``/proc/self/clear_refs``)
  and reads it back after; the table gives the peak minus the RSS before the call (the method's extra memory,
  beyond its runtime and the inputs) and the peak itself.
* **Interleaved**: the parent asks the workers for one call at a time, method after method, in an order rotated
  every repetition, so drifts of the machine's speed hit every method alike; ``--gap`` seconds of pause before
  each call let the previous method's idle BLAS/OpenMP threads stop spinning. The GEMM floor ``2 n m d / rate``
  (the fastest NumPy or JAX float32 matmul at the case's shape) is measured in every repetition too.
* **Repeated until the spread is stated**: at least ``--repeats`` repetitions, more (up to ``--max-repeats``)
  while any method's interquartile range exceeds ``--spread`` of its median; the table shows the median and
  the [min, max] of the repetitions and ratios as medians of per-repetition ratios with their range.
* **Single calls or bursts**: by default each timed repetition is one call after the pause, so every call
  starts on idle cores; ``--burst N`` times N back-to-back calls per repetition and reports the time per call,
  the steady state of a run that votes once per class in a row. Calls of a few milliseconds spread 2-10x from
  one to the next when timed singly (waking idle cores costs milliseconds on this VM); the file says which.
* **Machine state**: the 1-minute load average is read before each case (after waiting up to ``--settle``
  seconds for it to fall below 0.5) and after it (after the same wait, once this benchmark's own work has
  stopped: the load average lags by about a minute), and the CPU time used by *other* processes during the case
  is measured from ``/proc/stat`` less this benchmark's own CPU time. When a load average is above 0.5 or other
  processes used more than half a core, the script refuses to write the results file, or with
  ``--allow-busy`` writes it marked BUSY.

Usage (from the repository root)::

  python benchmarks/bench_votes.py                           # all cases; writes benchmarks/results/bench_votes.md
  python benchmarks/bench_votes.py --cases small,d2048 --methods pejax,pejax-blas,faiss
  python benchmarks/bench_votes.py --quick --allow-busy --settle 0 --out ''   # tiny smoke test

Requires the ``bench`` extra (faiss-cpu, scikit-learn, torch, threadpoolctl).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

import numpy as np
from _machine import busy_cpu_s
from _machine import own_cpu_s

SEED = 0
AGREEMENT_ROWS = 500
BUSY_LOAD = 0.5
BUSY_FOREIGN_CORES = 0.5


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
    "lowdim": Case(name="lowdim", n=5000, m=5000, d=16, k=1),
    "d2048": Case(name="d2048", n=10000, m=10000, d=2048, k=1),
    "d512": Case(name="d512", n=50000, m=20000, d=512, k=1),
    "k4": Case(name="k4", n=20000, m=20000, d=2048, k=4),
    "large": Case(name="large", n=200000, m=50000, d=256, k=1, full_matrix=False),
    # Shapes a user tries: a few thousand private samples against many more low-dimensional candidates.
    "wide": Case(name="wide", n=3000, m=20000, d=64, k=1),
    "wide-k4": Case(name="wide-k4", n=5000, m=20000, d=64, k=4),
    "lowdim-wide": Case(name="lowdim-wide", n=5000, m=50000, d=32, k=1),
}

QUICK = {
    "small": Case(name="small", n=300, m=200, d=16, k=1),
    "lowdim": Case(name="lowdim", n=400, m=300, d=4, k=1),
    "d2048": Case(name="d2048", n=600, m=500, d=128, k=1),
    "d512": Case(name="d512", n=900, m=400, d=64, k=1),
    "k4": Case(name="k4", n=500, m=500, d=128, k=4),
    "large": Case(name="large", n=3000, m=1500, d=32, k=1, full_matrix=False),
    "wide": Case(name="wide", n=200, m=700, d=16, k=1),
    "wide-k4": Case(name="wide-k4", n=300, m=700, d=16, k=4),
    "lowdim-wide": Case(name="lowdim-wide", n=300, m=900, d=8, k=1),
}

METHODS = (
    "pejax",
    "pejax-blas",
    "pejax-faiss",
    "faiss",
    "sklearn-euclidean",
    "sklearn-l2",
    "torch",
)
PEJAX = {"pejax": "xla", "pejax-blas": "blas", "pejax-faiss": "faiss"}
FULL_MATRIX_ONLY = ("sklearn-euclidean", "sklearn-l2", "torch")


def make_data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian float32 data with cluster structure: 64 shared centres plus unit noise (fixed seed).

    The noise is added in row chunks, so making the data allocates little beyond the two arrays.
    """
    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((64, case.d), dtype=np.float32) * 2.0
    out = []
    for rows in (case.n, case.m):
        x = centres[rng.integers(0, 64, rows)]
        for start in range(0, rows, 4096):
            stop = min(start + 4096, rows)
            x[start:stop] += rng.standard_normal((stop - start, case.d), dtype=np.float32)
        out.append(x)
    return out[0], out[1]


def agreement_rows(case: Case) -> np.ndarray:
    return np.random.default_rng(SEED + 1).choice(
        case.n, size=min(case.n, AGREEMENT_ROWS), replace=False
    )


# ---------------------------------------------------------------------------------------------------------
# Worker side: one method, one case. Commands on stdin, one JSON reply per line on the original stdout.


def _method(name: str):
    """Returns (run(private, synthetic, k) -> (hist, ids or None), ids(queries, synthetic, k) -> ids)."""
    if name in PEJAX:
        import pejax

        backend = PEJAX[name]

        def run(p, s, k):
            return np.asarray(pejax.vote_histogram(p, s, k=k, backend=backend)), None

        def ids(q, s, k):
            return np.asarray(pejax.nearest_neighbors(q, s, k=k, backend=backend).indices)

        return run, ids
    if name == "faiss":
        import faiss

        def ids(q, s, k):
            index = faiss.IndexFlatL2(s.shape[1])
            index.add(s)
            return index.search(q, k)[1]

        def run(p, s, k):
            i = ids(p, s, k)
            return (np.bincount(i.ravel(), minlength=s.shape[0]) / np.sqrt(k)).astype(np.float32), i

        return run, ids
    if name.startswith("sklearn"):
        from sklearn.neighbors import NearestNeighbors

        metric = name.split("-", 1)[1]

        def ids(q, s, k):
            nn = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute", n_jobs=-1)
            return nn.fit(s).kneighbors(q)[1]

        def run(p, s, k):
            i = ids(p, s, k)
            return (np.bincount(i.ravel(), minlength=s.shape[0]) / np.sqrt(k)).astype(np.float32), i

        return run, ids
    if name == "torch":
        import torch

        def ids(q, s, k):
            dist = torch.cdist(torch.from_numpy(q), torch.from_numpy(s), p=2)
            return torch.topk(dist, k=k, dim=1, largest=False)[1].numpy()

        def run(p, s, k):
            i = ids(p, s, k)
            return (np.bincount(i.ravel(), minlength=s.shape[0]) / np.sqrt(k)).astype(np.float32), i

        return run, ids
    raise ValueError(name)


def _gemm_timers(private, synthetic):
    """Timers of one float32 matmul each at (block x d) @ (d x m), NumPy and JAX; each returns flop/s."""
    import jax
    import jax.numpy as jnp

    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    n, d = private.shape
    m = synthetic.shape[0]
    b_np = np.ascontiguousarray(synthetic.T)
    b_jax = jnp.asarray(b_np)
    timers = {}
    for rows in sorted({min(n, 512), min(n, 2048)}):
        a_np, a_jax, flops = private[:rows], jnp.asarray(private[:rows]), 2.0 * rows * m * d

        def numpy_rate(a=a_np, flops=flops):
            start = time.perf_counter()
            a @ b_np
            return flops / (time.perf_counter() - start)

        def jax_rate(a=a_jax, flops=flops):
            start = time.perf_counter()
            mm(a, b_jax).block_until_ready()
            return flops / (time.perf_counter() - start)

        timers[f"numpy {rows}x{d}@{d}x{m}"] = numpy_rate
        timers[f"jax {rows}x{d}@{d}x{m}"] = jax_rate
    return timers


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _threads_report(name: str) -> dict:
    from threadpoolctl import threadpool_info

    pools = [
        f"{p.get('internal_api')} {p.get('version')} x{p.get('num_threads')} "
        f"({os.path.basename(p.get('filepath', ''))})"
        for p in threadpool_info()
    ]
    extra = {}
    if name in ("faiss", "pejax-faiss"):
        import faiss

        extra["faiss omp threads"] = faiss.omp_get_max_threads()
    if name == "torch":
        import torch

        extra["torch threads"] = torch.get_num_threads()
    if name in PEJAX or name == "gemm":
        import jax

        extra["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
        extra["jax devices"] = str(jax.devices())
    return {"pools": pools, **extra}


def worker(name: str, case: Case, slow_cap: float, burst: int = 1) -> int:
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    out = os.fdopen(reply_fd, "w", buffering=1)

    def send(obj):
        out.write(json.dumps(obj) + "\n")

    private, synthetic = make_data(case)
    k = case.k
    scale, note = 1.0, ""
    if name == "gemm":
        timers = _gemm_timers(private, synthetic)
        run = lambda p, s, k: {g: t() for g, t in timers.items()}  # noqa: E731
        ids_fn = None
    else:
        run, ids_fn = _method(name)
    inputs = private
    if name == "sklearn-l2":
        # scikit-learn routes metric="l2" to a per-pair loop: time a subsample when the whole would be slow.
        pilot = min(case.n, 200)
        start = time.perf_counter()
        run(private[:pilot], synthetic, k)
        est = (time.perf_counter() - start) * case.n / pilot
        if est > slow_cap:
            sub = max(pilot, int(case.n * slow_cap / est))
            inputs, scale = private[:sub], case.n / sub
            note = f"~ timed on {sub} of {case.n} queries, scaled x{scale:.1f}"
    start = time.perf_counter()
    run(inputs, synthetic, k)  # compiles (pejax) and warms up
    first = time.perf_counter() - start
    send({"ready": True, "first_s": first, "note": note, "threads": _threads_report(name)})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            gc.collect()
            rss = _proc_kib("VmRSS")
            reset = _reset_peak()
            calls = 1 if name == "gemm" else burst  # the GEMM timer takes its own best of several
            start = time.perf_counter()
            for _ in range(calls):
                result = run(inputs, synthetic, k)
            t = (time.perf_counter() - start) / calls * scale
            peak = (
                _proc_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            )
            send(
                {
                    "t": t,
                    "rss_mib": rss / 1024,
                    "peak_mib": peak / 1024,
                    "rates": result if name == "gemm" else None,
                }
            )
        elif cmd == "check":
            if ids_fn is None:
                send({})
                continue
            rows = agreement_rows(case)
            hist, _ = run(private, synthetic, k)
            send(
                {
                    "ids": np.asarray(ids_fn(private[rows], synthetic, k)).tolist(),
                    "hist": np.asarray(hist, np.float64).tolist(),
                }
            )
        elif cmd == "quit":
            break
    return 0


# ---------------------------------------------------------------------------------------------------------
# Parent side.


class Worker:
    def __init__(self, name: str, case_name: str, quick: bool, slow_cap: float, burst: int = 1):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--cases", case_name]
        cmd += ["--slow-cap", str(slow_cap), "--burst", str(burst)] + (["--quick"] if quick else [])
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(
                f"worker {self.name} exited with status {code} (see its stderr above)"
            )
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


def settle(limit_s: float, log) -> float:
    """Waits up to ``limit_s`` seconds for the 1-minute load average to fall below BUSY_LOAD; returns it."""
    deadline = time.monotonic() + limit_s
    load = os.getloadavg()[0]
    if load > BUSY_LOAD and limit_s > 0:
        log(
            f"   waiting up to {limit_s:.0f} s for the load average ({load:.2f}) to fall below {BUSY_LOAD}"
        )
    while load > BUSY_LOAD and time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]
    return load


@dataclasses.dataclass
class Row:
    case: Case
    methods: list[str]
    times: dict[str, list[float]]
    extra_mib: dict[str, float]
    peak_mib: dict[str, float]
    first_s: dict[str, float]
    notes: dict[str, str]
    floor: list[float]
    gemm_best: str
    agree: dict[str, float]
    hist_l1: dict[str, float]
    near_ties: int
    load_before: float
    load_after: float
    foreign_cores: float
    threads: dict[str, dict]

    @property
    def busy(self) -> bool:
        return (
            max(self.load_before, self.load_after) > BUSY_LOAD
            or self.foreign_cores > BUSY_FOREIGN_CORES
        )


def float64_reference(private, synthetic, k, rows):
    """Top-k ids in float64 for the query rows ``rows`` and a mask of rows without a near-tie."""
    q = private[rows].astype(np.float64)
    x = synthetic.astype(np.float64)
    dist = (q * q).sum(1)[:, None] - 2.0 * q @ x.T + (x * x).sum(1)[None, :]
    order = np.argsort(dist, axis=1, kind="stable")[:, : k + 1]
    sorted_d = np.take_along_axis(dist, order, axis=1)
    scale = (q * q).sum(1) + (x * x).sum(1).max()
    clear = (sorted_d[:, k] - sorted_d[:, k - 1]) > 1e-5 * scale
    return order[:, :k], clear


def _iqr_rel(xs) -> float:
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return float((q3 - q1) / med) if med > 0 else 0.0


def time_case(case: Case, methods: list[str], args, log) -> Row:
    n, m, d, k = case.n, case.m, case.d, case.k
    log(f"\n== {case.name}: n={n} m={m} d={d} k={k}")
    notes: dict[str, str] = {}
    chosen = []
    for name in methods:
        if name in FULL_MATRIX_ONLY and not case.full_matrix:
            notes[name] = f"skipped: n x m float32 = {4.0 * n * m / 2**30:.3g} GiB"
        elif name == "torch" and 10.0 * n * m > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf(
            "SC_PAGE_SIZE"
        ):
            notes[name] = "skipped: the full n x m matrix would not fit in free memory"
        else:
            chosen.append(name)
    load_before = settle(args.settle, log)
    wall0, busy0, own0 = time.monotonic(), busy_cpu_s(), own_cpu_s()
    workers: dict[str, Worker] = {}
    try:
        for name in [*chosen, "gemm"]:
            workers[name] = Worker(name, case.name, args.quick, args.slow_cap, args.burst)
            if workers[name].ready.get("note"):
                notes[name] = workers[name].ready["note"]
        times = {name: [] for name in chosen}
        extra = dict.fromkeys(chosen, 0.0)
        peak = dict.fromkeys(chosen, 0.0)
        floor: list[float] = []
        best_rate: dict[str, float] = {}
        rep = 0
        while True:
            order = chosen[rep % len(chosen) :] + chosen[: rep % len(chosen)]
            for name in order:
                # Let the previous method's BLAS/OpenMP threads stop spinning before the next one starts.
                time.sleep(args.gap)
                r = workers[name].ask("run")
                times[name].append(r["t"])
                extra[name] = max(extra[name], r["peak_mib"] - r["rss_mib"])
                peak[name] = max(peak[name], r["peak_mib"])
            rates = workers["gemm"].ask("run")["rates"]
            for g, v in rates.items():
                best_rate[g] = max(best_rate.get(g, 0.0), v)
            floor.append(2.0 * n * m * d / max(rates.values()))
            rep += 1
            log(
                f"   rep {rep}: "
                + ", ".join(f"{name} {times[name][-1]:.4f}s" for name in chosen)
                + f", floor {floor[-1]:.4f}s"
            )
            spreads = [_iqr_rel(times[name]) for name in chosen]
            if rep >= args.repeats and (rep >= args.max_repeats or max(spreads) <= args.spread):
                break
        checks = {name: workers[name].ask("check") for name in chosen}
        first_s = {name: workers[name].ready["first_s"] for name in chosen}
        threads = {name: w.ready["threads"] for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    elapsed = time.monotonic() - wall0
    foreign = max(0.0, ((busy_cpu_s() - busy0) - (own_cpu_s() - own0)) / elapsed)
    load_after = settle(args.settle, log)
    log(
        f"   load average before {load_before:.2f}, after {load_after:.2f}; other processes {foreign:.2f} cores"
    )

    private, synthetic = make_data(case)
    rows = agreement_rows(case)
    ref_ids, clear = float64_reference(private, synthetic, k, rows)
    agree, hist_l1 = {}, {}
    ref_hist = np.asarray(checks["faiss"]["hist"]) if "faiss" in checks else None
    for name, c in checks.items():
        got = np.asarray(c["ids"])
        same = np.array(
            [set(a) == set(b) for a, b in zip(got.tolist(), ref_ids.tolist(), strict=True)]
        )
        agree[name] = float(same[clear].mean()) if clear.any() else 1.0
        if ref_hist is not None:
            hist_l1[name] = float(np.abs(np.asarray(c["hist"]) - ref_hist).sum())
    return Row(
        case=case,
        methods=chosen,
        times=times,
        extra_mib=extra,
        peak_mib=peak,
        first_s=first_s,
        notes=notes,
        floor=floor,
        gemm_best=max(best_rate, key=best_rate.get),
        agree=agree,
        hist_l1=hist_l1,
        near_ties=int((~clear).sum()),
        load_before=load_before,
        load_after=load_after,
        foreign_cores=foreign,
        threads=threads,
    )


def _med(xs) -> float:
    return float(np.median(xs))


def _ratio(a, b) -> str:
    r = np.asarray(a) / np.asarray(b)
    return f"{np.median(r):.2f} [{r.min():.2f}, {r.max():.2f}]"


def tables(rows: list[Row], methods: list[str]) -> str:
    head = (
        ["case", "n x m x d, k", "reps"] + [f"{name} (s)" for name in methods] + ["GEMM floor (s)"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.case
        cells = [c.name, f"{c.n} x {c.m} x {c.d}, k={c.k}", str(len(r.floor))]
        for name in methods:
            if name in r.times:
                ts = r.times[name]
                mark = "~" if name in r.notes else ""
                cells.append(f"{mark}{_med(ts):.4f} [{min(ts):.4f}, {max(ts):.4f}]")
            else:
                cells.append(r.notes.get(name, "-"))
        cells.append(f"{_med(r.floor):.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    pe = [name for name in methods if name in PEJAX]
    head2 = (
        ["case"]
        + [f"{name} / faiss" for name in pe]
        + [f"{name} / floor" for name in (*pe, "faiss") if name in methods]
        + [f"{name} extra / peak RSS (MiB)" for name in methods]
        + [f"ids = f64: {name}" for name in methods]
        + ["load before / after", "other procs (cores)"]
    )
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for r in rows:
        cells = [r.case.name + (" **BUSY**" if r.busy else "")]
        for name in pe:
            ok = name in r.times and "faiss" in r.times
            cells.append(_ratio(r.times[name], r.times["faiss"]) if ok else "-")
        for name in (*pe, "faiss"):
            if name in methods:
                cells.append(_ratio(r.times[name], r.floor) if name in r.times else "-")
        for name in methods:
            has = name in r.extra_mib
            cells.append(f"{r.extra_mib[name]:.0f} / {r.peak_mib[name]:.0f}" if has else "-")
        for name in methods:
            cells.append(f"{100 * r.agree[name]:.2f}%" if name in r.agree else "-")
        cells += [f"{r.load_before:.2f} / {r.load_after:.2f}", f"{r.foreign_cores:.2f}"]
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
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    parts = [f"python {platform.python_version()}"]
    for pkg in (
        "pejax",
        "jax",
        "jaxlib",
        "numpy",
        "faiss-cpu",
        "scikit-learn",
        "torch",
        "threadpoolctl",
    ):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def thread_lines(rows: list[Row]) -> list[str]:
    seen: dict[str, str] = {}
    for r in rows:
        for name, info in r.threads.items():
            pools = "; ".join(info["pools"]) or "none"
            rest = "".join(f"; {k} {v}" for k, v in info.items() if k != "pools")
            seen.setdefault(name, f"{name}: {pools}{rest}")
    return list(seen.values())


def write_results(args, header, rows, methods, log) -> bool:
    result = tables(rows, methods)
    details = [
        f"{r.case.name}: GEMM floor from the fastest of {{numpy, jax}} matmuls (best: {r.gemm_best}); "
        f"{r.near_ties} of {min(r.case.n, AGREEMENT_ROWS)} sampled queries near-tied in float64 (left out); "
        + ", ".join(f"|hist_{name} - hist_faiss|_1 = {v:.3g}" for name, v in r.hist_l1.items())
        + "; first call (compile, warm-up): "
        + ", ".join(f"{name} {v:.2f} s" for name, v in r.first_s.items())
        + "".join(f"; {name}: {note}" for name, note in r.notes.items())
        for r in rows
    ]
    busy = any(r.busy for r in rows)
    log("\n" + result + "\n")
    for line in details:
        log("- " + line)
    if not args.out:
        return True
    if busy and not args.allow_busy:
        log(
            f"\nNOT writing {args.out}: the machine was busy (a 1-minute load average above {BUSY_LOAD} "
            f"or other processes above {BUSY_FOREIGN_CORES} cores). Re-run on a quiet machine, or pass "
            "--allow-busy to write the file marked BUSY."
        )
        return False
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        title = "# vote_histogram benchmark" + (
            " (BUSY MACHINE: timings not trustworthy)" if busy else ""
        )
        f.write(title + "\n\n")
        f.write("\n".join(f"- {line}" for line in header) + "\n")
        f.write("- threads and BLAS per method (threadpoolctl, in each method's own process):\n")
        f.write("".join(f"  - {line}\n" for line in thread_lines(rows)))
        f.write(
            "- timing: each method in its own process, "
            + (
                "one call at a time"
                if args.burst == 1
                else f"{args.burst} back-to-back calls per repetition, timed together and reported per call"
            )
            + ", methods interleaved in an order "
            f"rotated every repetition, {args.gap} s of pause before each repetition; at least {args.repeats} "
            f"repetitions, more (up to {args.max_repeats}) "
            f"while a method's interquartile range exceeded {args.spread:.0%} of its median. Cells: median "
            "[min, max] seconds; ratios: median [min, max] of per-repetition ratios. The first call of each "
            "method (pejax: compilation) is not timed. Inputs are NumPy float32 for every method (pejax's "
            "time includes the host-to-device copy and validation).\n"
        )
        f.write(
            "- memory: extra = peak RSS during a call minus the RSS before it (the method's working memory "
            "beyond its runtime and the inputs), max over repetitions; peak = the process's peak RSS during "
            "the call (runtime, inputs and work).\n"
        )
        f.write(
            f"- ids = f64: fraction of {AGREEMENT_ROWS} random queries whose top-k id set equals the float64 "
            "reference, near-ties left out.\n"
        )
        f.write(
            f"- machine state: 1-minute load average before and after each case (each read after waiting up "
            f"to {args.settle:.0f} s for it to fall below {BUSY_LOAD}), and the CPU used by other processes "
            "during the case (/proc/stat less this benchmark's own CPU time), in cores.\n\n"
        )
        f.write(result + "\n\n" + "\n".join(f"- {line}" for line in details) + "\n")
    log(f"\nwrote {args.out}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}"
    )
    parser.add_argument("--repeats", type=int, default=5, help="least timed repetitions (>= 1)")
    parser.add_argument("--max-repeats", type=int, default=15, help="most timed repetitions")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.05,
        help="repeat while a method's IQR / median exceeds this",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of seconds")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.5,
        help="seconds of pause before each call (idle BLAS/OpenMP threads of the previous method spin "
        "for up to ~0.1 s and would steal cores from the next)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=1,
        help="calls per timed repetition, back to back, reported per call (as the runner's one vote per "
        "class); 1 times single calls after the --gap pause",
    )
    parser.add_argument(
        "--slow-cap", type=float, default=6.0, help="seconds before sklearn-l2 is subsampled"
    )
    parser.add_argument(
        "--settle", type=float, default=180.0, help="most seconds to wait for a quiet load average"
    )
    parser.add_argument(
        "--allow-busy",
        action="store_true",
        help="write the results file even if busy (marked BUSY)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "bench_votes.md"
        ),
        help="markdown results file ('' to skip writing)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    catalogue = QUICK if args.quick else CASES
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    methods = [c.strip() for c in args.methods.split(",") if c.strip()]
    unknown = [c for c in names if c not in catalogue] + [m for m in methods if m not in METHODS]
    if args.worker:
        return worker(args.worker, catalogue[names[0]], args.slow_cap, args.burst)
    if unknown or not names or not methods:
        parser.error(
            f"unknown or missing cases/methods {unknown}: cases from {list(catalogue)}, methods from {list(METHODS)}"
        )
    if args.burst < 1:
        parser.error(f"need --burst >= 1, got {args.burst}")
    if not 1 <= args.repeats <= args.max_repeats:
        parser.error(
            f"need 1 <= --repeats <= --max-repeats, got {args.repeats} and {args.max_repeats}"
        )

    def log(msg):
        print(msg, flush=True)

    command = "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    )
    header = [f"machine: {machine()}", f"versions: {versions()}", f"command: `{command}`"]
    for line in header:
        log(line)
    rows = [time_case(catalogue[name], methods, args, log) for name in names]
    for line in thread_lines(rows):
        log("threads: " + line)
    written = write_results(args, header, rows, methods, log)
    return 0 if written else 3


if __name__ == "__main__":
    raise SystemExit(main())
