"""GPU benchmark of the vote histogram and of one steady-state PE iteration at CIFAR-10 sizes.

Vote kernel (k = 1, l2): pejax in float32 and in bfloat16 with the exact float32 re-check, torch (``cdist`` +
``topk`` and an ``mm``-based l2 + ``topk``, float32 without TF32, and bfloat16 without re-check) and faiss-gpu
``GpuIndexFlatL2`` when faiss imports with GPU support (else faiss-cpu ``IndexFlatL2``, labelled so, or a
"skipped" row). Each is reported as time, TFLOP/s and a share of the matmul rate of the same precision measured
in the same process (``(rows, d) @ (d, m)`` with the kernel's shapes; faiss against JAX's float32 rate), with the
agreement of the winners with a float64 NumPy reference on ``--check-rows`` random private rows.

PE iteration: ``PrivateEvolution`` with the Flax DDPM generator (pejax's UNet, random weights: the timing does
not depend on them) at CIFAR-10 sizes, 32x32x3 images, 10 classes, 5000 candidates per class, lookahead 4, 50000
private images and a fixed random-projection embedding to 2048 dimensions (the Inception width); three iterations,
the second one (steady state: compiled, not the final one) reported by phase (generation, embedding, votes,
selection).

Every method runs in its own subprocess (JAX and torch do not share one GPU allocator well); the data is
generated once with NumPy (fixed seed, standard normal, float32) and shared through ``.npy`` files. The defaults
are sized to finish in under 5 minutes on one H100/H200-class GPU.

Usage (on the GPU machine)::

    python benchmarks/bench_gpu_votes.py --out /tmp/gpu
    python benchmarks/bench_gpu_votes.py --cases 20000x10000x256 --repeats 2 --methods jax torch --out /tmp/g

At tiny sizes it runs on a CPU too (the CI test does: tests/test_bench_gpu_votes.py).
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
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    private = torch.from_numpy(np.asarray(private_np)).to(dev)
    synthetic = torch.from_numpy(np.asarray(synthetic_np)).to(dev)
    n, d = private.shape
    m = synthetic.shape[0]
    flops = 2.0 * n * m * d
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    env = {"torch": torch.__version__, "device": name}
    block = args.torch_block
    first_ref, _ = check_rows
    out = []

    def sync(x):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return x

    # torch's own matmul floor per precision: one (rows, d) @ (d, m) product, as in the JAX child.
    rates = {}
    floor_rows = min(n, 8192)
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = private[:floor_rows].to(dtype), synthetic.to(dtype)
        t, _ = _median_time(lambda a=a, b=b: sync(a @ b.T), max(args.repeats, 5))
        rates[label] = 2.0 * floor_rows * m * d / t
        out.append(
            {
                "method": f"torch matmul floor ({label}, {floor_rows}x{d} @ {d}x{m})",
                "precision": label,
                "time_s": t,
                "tflops": rates[label] / 1e12,
                **env,
            }
        )
        del a, b

    def votes_cdist(dtype):
        s = synthetic.to(dtype)
        counts = torch.zeros(m, dtype=torch.int64, device=dev)
        ids_all = []
        for start in range(0, n, block):
            dist = torch.cdist(private[start : start + block].to(dtype), s)
            ids = torch.topk(dist, 1, dim=1, largest=False).indices[:, 0]
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
            ids = torch.topk(scores, 1, dim=1, largest=False).indices[:, 0]
            ids_all.append(ids)
            counts += torch.bincount(ids, minlength=m)
        return sync(counts), torch.cat(ids_all)

    for label, fn, dtype, rate in (
        ("torch cdist + topk (float32)", votes_cdist, torch.float32, "float32"),
        ("torch mm l2 + topk (float32)", votes_mm, torch.float32, "float32"),
        ("torch mm l2 + topk (bfloat16, no re-check)", votes_mm, torch.bfloat16, "bfloat16"),
    ):
        try:
            t, times = _median_time(lambda fn=fn, dtype=dtype: fn(dtype), args.repeats)
            _, ids = fn(dtype)
            ids = ids.cpu().numpy()[args.check_index]
        except Exception as exc:
            out.append({"method": label, "error": f"{type(exc).__name__}: {exc}", **env})
            print(label, "FAILED", exc, flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row = {
            "method": f"{label}, blocks of {block} rows",
            "precision": rate,
            "time_s": t,
            "times_s": times,
            "tflops": flops / t / 1e12,
            "share_of_matmul": flops / t / rates[rate],
            "agree_float64": float(np.mean(ids == first_ref)),
            **env,
        }
        out.append(row)
        print(json.dumps(row), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run_faiss(args, private_np, synthetic_np, check_rows) -> list[dict]:
    """faiss-gpu GpuIndexFlatL2 (faiss-cpu IndexFlatL2 when faiss has no GPU), k = 1, + bincount."""
    try:
        import faiss
    except ImportError as exc:
        return [{"method": "faiss-gpu", "skipped": f"faiss does not import ({exc})"}]
    private = np.ascontiguousarray(private_np, np.float32)
    synthetic = np.ascontiguousarray(synthetic_np, np.float32)
    n, d = private.shape
    m = synthetic.shape[0]
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus > 0:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(res, d)
        label = "faiss-gpu GpuIndexFlatL2 + bincount"
    else:
        index = faiss.IndexFlatL2(d)
        label = "faiss-cpu IndexFlatL2 + bincount (faiss has no GPU here)"
    index.add(synthetic)

    def call():
        _, ids = index.search(private, 1)
        return np.bincount(ids.ravel(), minlength=m), ids

    first_ref, _ = check_rows
    t, times = _median_time(call, args.repeats)
    ids = call()[1][args.check_index, 0]
    env = {"faiss": faiss.__version__, "device": f"{gpus} GPU(s)" if gpus else "cpu"}
    return [
        {
            "method": label,
            "precision": "float32",
            "time_s": t,
            "times_s": times,
            "tflops": 2.0 * n * m * d / t / 1e12,
            "agree_float64": float(np.mean(ids == first_ref)),
            **env,
        }
    ]


def run_pe(args, workdir: pathlib.Path) -> list[dict]:
    """One steady-state PE iteration with the Flax DDPM generator (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pejax.config import PEConfig
    from pejax.config import PrivacyConfig
    from pejax.config import SpeedConfig
    from pejax.generators.diffusion import FlaxDiffusionGenerator
    from pejax.generators.unet import UNet
    from pejax.generators.unet import UNetConfig
    from pejax.runner import PrivateEvolution

    size, classes = args.pe_image_size, args.pe_classes
    shape = (size, size, 3)
    net = UNet(
        UNetConfig(
            image_size=size,
            channels=3,
            base_channels=args.pe_base_channels,
            channel_mults=tuple(args.pe_channel_mults),
            num_classes=classes,
        ),
        rngs=nnx.Rngs(0),
    )
    gen = FlaxDiffusionGenerator(
        net, image_shape=shape, num_steps=args.pe_steps, batch_size=args.pe_batch_size
    )
    flat = size * size * 3
    proj = jax.random.normal(jax.random.key(1), (flat, args.pe_embed_dim), jnp.float32) / np.sqrt(
        flat
    )
    embed = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ proj)
    rng = np.random.default_rng(args.seed)
    private = rng.random((args.pe_private, *shape), dtype=np.float32)
    labels = (np.arange(args.pe_private) % classes).astype(np.int32)
    timings: list[tuple[int, dict]] = []

    def record(info):
        if info.iteration > 0 and not info.final:
            timings.append((info.iteration, dict(info.timings)))

    runner = PrivateEvolution(
        generator=gen,
        embedding=embed,
        pe=PEConfig(
            num_classes=classes,
            samples_per_iteration=args.pe_candidates * classes,
            iterations=args.pe_iterations,
            lookahead_degree=args.pe_lookahead,
            degrees=(0.5, 0.5),
            output="parents",
            final_samples_per_class=4,
        ),
        privacy=PrivacyConfig(epsilon=1.0, max_private_samples=args.pe_private),
        speed=SpeedConfig(precision=args.pe_precision),
        callbacks=[record],
    )
    t0 = time.perf_counter()
    runner.run(jax.random.key(0), private, labels)
    wall = time.perf_counter() - t0
    steady = timings[-1][1]
    cand = args.pe_candidates * classes
    return [
        {
            "method": (
                f"PE iteration, flax-ddpm {size}x{size}x3, {classes} classes x {args.pe_candidates} "
                f"candidates, lookahead {args.pe_lookahead}, {args.pe_steps} DDIM steps (degree 0.5), "
                f"{args.pe_private} private, embedding d={args.pe_embed_dim}, votes precision="
                f"{args.pe_precision}"
            ),
            "time_s": steady["total"],
            "phases_s": steady,
            "first_iteration_s": timings[0][1]["total"],
            "iterations_s": [t["total"] for _, t in timings],
            "run_wall_s": wall,
            "images_generated_per_iteration": cand * (1 + args.pe_lookahead),
            "device": str(jax.devices()[0].device_kind),
        }
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["200000x50000x2048"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["jax", "torch", "faiss", "pe"],
        choices=["jax", "torch", "faiss", "pe"],
    )
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
    pe = parser.add_argument_group("PE iteration (method 'pe')")
    pe.add_argument("--pe-image-size", type=int, default=32)
    pe.add_argument("--pe-classes", type=int, default=10)
    pe.add_argument("--pe-candidates", type=int, default=5000, help="candidates per class")
    pe.add_argument("--pe-lookahead", type=int, default=4)
    pe.add_argument(
        "--pe-iterations",
        type=int,
        default=3,
        help="PE iterations (>= 2); the last before the final one is reported",
    )
    pe.add_argument("--pe-private", type=int, default=50000)
    pe.add_argument("--pe-steps", type=int, default=10, help="DDIM steps of a full trajectory")
    pe.add_argument("--pe-base-channels", type=int, default=32)
    pe.add_argument("--pe-channel-mults", type=int, nargs="+", default=[1, 2, 2])
    pe.add_argument("--pe-batch-size", type=int, default=2048)
    pe.add_argument("--pe-embed-dim", type=int, default=2048)
    pe.add_argument("--pe-precision", default="bfloat16", help="[speed] precision of the votes")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    raw = list(sys.argv[1:] if argv is None else argv)
    if args.child is not None:
        if args.child == "pe":
            rows = run_pe(args, workdir)
            for r in rows:
                r["case"] = "pe"
            pathlib.Path(args.child_json).write_text(json.dumps(rows, indent=1))
            return
        n, m, d = _case(args.cases[0])
        private, synthetic = _data(workdir, n, m, d, args.seed)
        ref = np.load(workdir / f"ref_{n}x{m}x{d}_s{args.seed}.npz")
        args.check_index = ref["rows"]
        check = (ref["first"], ref["gap"])
        fn = {"jax": run_jax, "torch": run_torch, "faiss": run_faiss}[args.child]
        rows = fn(args, private, synthetic, check)
        for r in rows:
            r["case"] = args.cases[0]
        pathlib.Path(args.child_json).write_text(json.dumps(rows, indent=1))
        return

    def child(method: str, case: str) -> list[dict]:
        child_json = workdir / f"result_{method}_{case}.json"
        child_json.unlink(missing_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), *raw, "--cases", case]
        cmd += ["--child", method, "--child-json", str(child_json)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=os.environ.copy())
        print(f"{method} {case}: {time.perf_counter() - t0:.1f} s", flush=True)
        if proc.returncode != 0 or not child_json.exists():
            return [{"case": case, "method": method, "error": f"exit {proc.returncode}"}]
        return json.loads(child_json.read_text())

    start = time.perf_counter()
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
        case_rows = []
        for method in args.methods:
            if method != "pe":
                case_rows.extend(child(method, case))
        # faiss against JAX's float32 matmul rate (faiss-gpu uses cuBLAS float32 as well).
        floor = [r for r in case_rows if r.get("method", "").startswith("matmul floor (float32")]
        for r in case_rows:
            if r.get("method", "").startswith("faiss") and "tflops" in r and floor:
                r["share_of_matmul"] = r["tflops"] / floor[0]["tflops"]
        results.extend(case_rows)
    if "pe" in args.methods:
        results.extend(child("pe", args.cases[0]))
    total = time.perf_counter() - start

    print(
        "\n| case | method | time (s) | TFLOP/s | share of matmul | agree f64 | re-checked rows |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r or "skipped" in r:
            why = f"error: {r['error'][:80]}" if "error" in r else r["skipped"][:80]
            print(f"| {r.get('case', '')} | {r['method']} | {why} | | | | |")
            continue
        if r.get("case") == "pe":
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items() if k != "total")
            print(
                f"| pe | {r['method']} | {r['time_s']:.2f} ({phases}; first iteration "
                f"{r['first_iteration_s']:.1f}) | | | | |"
            )
            continue
        share = f"{r['share_of_matmul']:.0%}" if "share_of_matmul" in r else ""
        agree = f"{r['agree_float64']:.4f}" if "agree_float64" in r else ""
        print(
            f"| {r['case']} | {r['method']} | {r['time_s']:.4f} | {r['tflops']:.1f} | {share} | {agree} "
            f"| {r.get('rows_rechecked_float32', '')} |"
        )
    print(f"\ntotal {total:.1f} s", flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"python": platform.python_version(), "argv": sys.argv, "total_s": total}
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
