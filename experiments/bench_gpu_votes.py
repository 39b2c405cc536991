"""GPU benchmark of the vote histogram: pejax (float32 and bfloat16 + exact re-check) against the matmul floor
and torch (``cdist`` + ``min``/``topk``, and an ``mm``-based l2 + ``min``), k = 1 nearest neighbour, l2.

Every method runs in its own subprocess (JAX and torch do not share one GPU allocator well); the data is
generated once with NumPy (fixed seed, standard normal, float32) and shared through ``.npy`` files.

For each case (n private x m synthetic x d) and method it reports the median time of ``--repeats`` calls after
a warm-up call (which compiles), the achieved rate ``2 n m d / time``, that rate as a share of the measured matmul
rate of the same precision, and the agreement of the winners with a float64 NumPy reference on ``--check-rows``
random private rows. The matmul floor is measured in the same process: one ``(rows, d) @ (d, m)`` product with
the kernel's shapes, in float32 (``Precision.HIGHEST``, no TF32) and in bfloat16 with float32 accumulation.

Usage (on the GPU machine)::

    python experiments/bench_gpu_votes.py --cases 200000x100000x2048 --out /tmp/gpu
    python experiments/bench_gpu_votes.py --cases 20000x10000x256 --repeats 2 --out /tmp/gpu_smoke  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np


def _case(text: str) -> tuple[int, int, int]:
    n, m, d = (int(v) for v in text.lower().split("x"))
    return n, m, d


def _data(workdir: pathlib.Path, n: int, m: int, d: int, seed: int):
    """Standard normal float32 private (n, d) and synthetic (m, d), cached as .npy files."""
    p_path = workdir / f"private_{n}x{d}_s{seed}.npy"
    s_path = workdir / f"synthetic_{m}x{d}_s{seed}.npy"
    for path, rows, sub in ((p_path, n, 0), (s_path, m, 1)):
        if not path.exists():
            rng = np.random.default_rng([seed, sub])
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
            for start in range(0, rows, 65536):
                stop = min(rows, start + 65536)
                out[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
            out.flush()
            del out
    return np.load(p_path, mmap_mode="r"), np.load(s_path, mmap_mode="r")


def _reference_ids(private, synthetic, rows):
    """float64 nearest synthetic index, and the gap to the second nearest, for the given private rows."""
    q = np.asarray(private[rows], np.float64)
    x = np.asarray(synthetic, np.float64)
    scores = (x * x).sum(1)[None, :] - 2.0 * q @ x.T
    order = np.argpartition(scores, 1, axis=1)[:, :2]
    two = np.take_along_axis(scores, order, axis=1)
    first = np.where(two[:, 0] <= two[:, 1], order[:, 0], order[:, 1])
    return first, np.abs(two[:, 0] - two[:, 1])


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_jax(args, private_np, synthetic_np, check_rows) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from pejax import neighbors as nn
    from pejax import votes

    n, d = private_np.shape
    m = synthetic_np.shape[0]
    dev = jax.devices()[0]
    private = jax.device_put(np.asarray(private_np), dev)
    synthetic = jax.device_put(np.asarray(synthetic_np), dev)
    flops = 2.0 * n * m * d
    rows_out = []
    env = {"jax": jax.__version__, "device": dev.device_kind}

    # The floor: one product with the kernel's shapes (a query block against all keys), same precision.
    floor_rows = min(n, 8192)
    rates = {}
    for name, dtype, precision in (
        ("float32", jnp.float32, lax.Precision.HIGHEST),
        ("bfloat16", jnp.bfloat16, lax.Precision.DEFAULT),
    ):
        a = private[:floor_rows].astype(dtype)
        b = synthetic.astype(dtype)
        mm = jax.jit(
            lambda a, b, p=precision: lax.dot_general(
                a, b, (((1,), (1,)), ((), ())), precision=p, preferred_element_type=jnp.float32
            )
        )
        t, _ = _median_time(
            lambda mm=mm, a=a, b=b: mm(a, b).block_until_ready(), max(args.repeats, 5)
        )
        rates[name] = 2.0 * floor_rows * m * d / t
        rows_out.append(
            {
                "method": f"matmul floor ({name}, {floor_rows}x{d} @ {d}x{m})",
                "precision": name,
                "time_s": t,
                "tflops": rates[name] / 1e12,
                **env,
            }
        )
        del a, b

    first_ref, gap_ref = check_rows
    variants = []
    for precision in args.precisions:
        for block in args.block_sizes:
            for key_block in args.key_block_sizes:
                for extra in args.extra if precision == "bfloat16" else [None]:
                    variants.append((precision, block, key_block, extra))
    for precision, block, key_block, extra in variants:
        key_block = None if key_block == 0 else key_block
        label = f"pejax vote_histogram precision={precision} block_size={block} key_block_size={key_block}"
        if extra is not None:
            label += f" extra_candidates={extra}"
        try:
            if precision == "bfloat16":
                rechecked = []

                def call(block=block, key_block=key_block, extra=extra, rechecked=rechecked):
                    res, count = nn.knn_bfloat16(
                        private,
                        synthetic,
                        k=1,
                        metric="l2",
                        block_size=block,
                        key_block_size=key_block,
                        extra_candidates=extra,
                    )
                    rechecked.append(count)
                    return votes._votes_from(res.indices, None, m=m, k=1).block_until_ready()

            else:
                rechecked = None

                def call(precision=precision, block=block, key_block=key_block):
                    return votes.vote_histogram(
                        private,
                        synthetic,
                        k=1,
                        precision=precision,
                        block_size=block,
                        key_block_size=key_block,
                    ).block_until_ready()

            t, times = _median_time(call, args.repeats)
            ids = np.asarray(
                nn.nearest_neighbors(
                    private[args.check_index],
                    synthetic,
                    k=1,
                    precision=precision,
                    block_size=block,
                    key_block_size=key_block,
                ).indices[:, 0]
            )
        except Exception as exc:  # report and go on: one failing variant must not lose the others
            rows_out.append({"method": label, "error": f"{type(exc).__name__}: {exc}", **env})
            print(label, "FAILED", exc, flush=True)
            continue
        rate_key = "bfloat16" if precision == "bfloat16" else "float32"
        row = {
            "method": label,
            "precision": precision,
            "block_size": block,
            "key_block_size": key_block,
            "time_s": t,
            "times_s": times,
            "tflops": flops / t / 1e12,
            "share_of_matmul": flops / t / rates[rate_key],
            "agree_float64": float(np.mean(ids == first_ref)),
            # Rows whose float64 winner leads by more than float32 rounding can blur.
            "agree_float64_clear": float(np.mean((ids == first_ref)[gap_ref > 1e-4 * d])),
            **env,
        }
        if rechecked is not None:
            row["rows_rechecked_float32"] = int(rechecked[-1])
            row["extra_candidates"] = extra
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    return rows_out


def run_torch(args, private_np, synthetic_np, check_rows) -> list[dict]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    private = torch.from_numpy(np.asarray(private_np)).to(dev)
    synthetic = torch.from_numpy(np.asarray(synthetic_np)).to(dev)
    n, d = private.shape
    m = synthetic.shape[0]
    flops = 2.0 * n * m * d
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    block = args.torch_block
    first_ref, _ = check_rows
    out = []

    def sync(x):
        torch.cuda.synchronize()
        return x

    def votes_cdist(dtype):
        s = synthetic.to(dtype)
        counts = torch.zeros(m, dtype=torch.int64, device=dev)
        ids_all = []
        for start in range(0, n, block):
            dist = torch.cdist(private[start : start + block].to(dtype), s)
            ids = dist.argmin(dim=1)
            ids_all.append(ids)
            counts += torch.bincount(ids, minlength=m)
        return sync(counts), torch.cat(ids_all)

    def votes_mm(dtype):
        s = synthetic.to(dtype)
        s_sq = (synthetic * synthetic).sum(1)
        counts = torch.zeros(m, dtype=torch.int64, device=dev)
        ids_all = []
        for start in range(0, n, block):
            scores = s_sq[None, :] - 2.0 * (private[start : start + block].to(dtype) @ s.T).float()
            ids = scores.argmin(dim=1)
            ids_all.append(ids)
            counts += torch.bincount(ids, minlength=m)
        return sync(counts), torch.cat(ids_all)

    for name, fn, dtype in (
        ("torch cdist + argmin (float32)", votes_cdist, torch.float32),
        ("torch mm l2 + argmin (float32)", votes_mm, torch.float32),
        ("torch mm l2 + argmin (bfloat16, no re-check)", votes_mm, torch.bfloat16),
    ):
        try:
            t, times = _median_time(lambda fn=fn, dtype=dtype: fn(dtype), args.repeats)
            _, ids = fn(dtype)
            ids = ids.cpu().numpy()[args.check_index]
        except Exception as exc:
            out.append({"method": name, "error": f"{type(exc).__name__}: {exc}", **env})
            print(name, "FAILED", exc, flush=True)
            torch.cuda.empty_cache()
            continue
        row = {
            "method": f"{name}, blocks of {block} rows",
            "time_s": t,
            "times_s": times,
            "tflops": flops / t / 1e12,
            "agree_float64": float(np.mean(ids == first_ref)),
            **env,
        }
        out.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["200000x100000x2048"])
    parser.add_argument("--methods", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    parser.add_argument("--precisions", nargs="+", default=["highest", "bfloat16"])
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[512, 2048])
    parser.add_argument(
        "--key-block-sizes", nargs="+", type=int, default=[0], help="0: the automatic key block"
    )
    parser.add_argument(
        "--extra", nargs="+", type=int, default=[16], help="bfloat16 candidates beyond k"
    )
    parser.add_argument("--torch-block", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-rows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/pejax_gpu_bench")
    parser.add_argument("--out", default=None, help="folder for results.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if args.child is not None:
        n, m, d = _case(args.cases[0])
        private, synthetic = _data(workdir, n, m, d, args.seed)
        ref = np.load(workdir / f"ref_{n}x{m}x{d}_s{args.seed}.npz")
        args.check_index = ref["rows"]
        check = (ref["first"], ref["gap"])
        fn = run_jax if args.child == "jax" else run_torch
        rows = fn(args, private, synthetic, check)
        for r in rows:
            r["case"] = args.cases[0]
        pathlib.Path(args.child_json).write_text(json.dumps(rows, indent=1))
        return

    results = []
    for case in args.cases:
        n, m, d = _case(case)
        t0 = time.perf_counter()
        private, synthetic = _data(workdir, n, m, d, args.seed)
        rows = np.sort(
            np.random.default_rng(args.seed + 1).choice(n, min(n, args.check_rows), replace=False)
        )
        first, gap = _reference_ids(private, synthetic, rows)
        np.savez(workdir / f"ref_{n}x{m}x{d}_s{args.seed}.npz", rows=rows, first=first, gap=gap)
        print(
            f"case {case}: data and float64 reference in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        for method in args.methods:
            child_json = workdir / f"result_{method}_{case}.json"
            cmd = [sys.executable, __file__, "--child", method, "--child-json", str(child_json)]
            cmd += ["--cases", case, "--precisions", *args.precisions]
            cmd += ["--block-sizes", *map(str, args.block_sizes)]
            cmd += ["--key-block-sizes", *map(str, args.key_block_sizes)]
            cmd += ["--extra", *map(str, args.extra)]
            cmd += ["--torch-block", str(args.torch_block), "--repeats", str(args.repeats)]
            cmd += ["--seed", str(args.seed), "--workdir", str(workdir)]
            proc = subprocess.run(cmd, env=os.environ.copy())
            if proc.returncode != 0 or not child_json.exists():
                results.append({"case": case, "method": method, "error": f"exit {proc.returncode}"})
                continue
            results.extend(json.loads(child_json.read_text()))

    print(
        "\n| case | method | time (s) | TFLOP/s | share of matmul | agree f64 | re-checked rows |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['method']} | error: {r['error'][:80]} | | | | |")
            continue
        share = f"{r['share_of_matmul']:.0%}" if "share_of_matmul" in r else ""
        agree = f"{r['agree_float64']:.4f}" if "agree_float64" in r else ""
        print(
            f"| {r['case']} | {r['method']} | {r['time_s']:.4f} | {r['tflops']:.1f} | {share} | {agree} "
            f"| {r.get('rows_rechecked_float32', '')} |"
        )
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"python": platform.python_version(), "argv": sys.argv}
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
