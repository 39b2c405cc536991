"""Train a small nnx UNet DDPM on PUBLIC data, then use it as the PE generator on the digits (PE1 in miniature).

1. Training data is public only: fresh renders of the JAX glyph simulator (``GlyphSimulator(texts="0".."9",
   image_size=16)``, class-conditional labels) at every step, or the images of an ``.npz`` (``--npz``).
   Loss: DDPM noise prediction (cosine schedule, T = 1000), optax Adam with warm-up and cosine decay,
   gradient clipping, an exponential moving average (EMA) of the weights. Training stops after ``--steps``
   steps or ``--max-train-seconds``, whichever comes first.
2. The EMA weights are checkpointed with orbax (``save_checkpoint``) and loaded back through
   ``FlaxDiffusionGenerator.from_checkpoint`` (the path a user takes).
3. Per-sample generation cost of ``random`` and ``variation`` is measured after compilation.
4. Quality: downstream test accuracy (``pejax.metrics.downstream_accuracy``, logistic regression on 8 x 8)
   of (a) the model's RANDOM samples alone (no private data), (b) PE runs on scikit-learn digits at each
   ``--epsilons`` (delta 1/(n ln n)), (c) a PE run without noise (generator ceiling, not private), and
   (d) with ``--compare-glyphs``, the glyph-simulator demo (``pejax.run_config.DEMO_CONFIG``) at the same
   epsilons. The PE hyperparameters are the demo's (chosen on public data), unchanged.
5. Writes a Markdown report (``--report``) and sample grids (PNG) into ``--out``.

Training stops at ``--max-train-seconds`` (600 s) before ``--steps`` on a slow machine, so the number of steps
(and the numbers below it) depends on the machine's load: pass ``--max-train-seconds inf`` for a run that is
reproducible across machines. Usage (27 minutes on 2 shared CPU cores: 10 training, then 9 DDPM PE runs
of about 90 s and 6 glyph runs)::

  python experiments/train_flax_ddpm.py --out /tmp/flax_ddpm --compare-glyphs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.embeddings import get_embedding
from pejax.generators.diffusion import FlaxDiffusionGenerator
from pejax.generators.diffusion import ScheduleConfig
from pejax.generators.diffusion import denoising_loss
from pejax.generators.diffusion import save_checkpoint
from pejax.generators.unet import UNet
from pejax.generators.unet import UNetConfig
from pejax.generators.unet import count_params

IMAGE_SIZE = 16
NUM_CLASSES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "pejax_flax_ddpm"))
    p.add_argument("--report", default="experiments/results/flax_ddpm.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-train-seconds", type=float, default=600.0)
    p.add_argument("--per-class", type=int, default=8, help="images per class per batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument(
        "--npz", default=None, help="train on this .npz (images, labels) instead of glyphs"
    )
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of a full trajectory")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0])
    p.add_argument(
        "--pe-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the PE runs"
    )
    p.add_argument("--skip-train", action="store_true", help="reuse the checkpoint in --out")
    p.add_argument("--no-noise-run", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compare-glyphs", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# Public training data.


def glyph_batches(seed: int, per_class: int):
    """Yields (images (B, 16, 16, 1) float32 in [0, 1], labels (B,) int32): fresh glyph renders."""
    from pejax.generators.glyphs import GlyphSimulator

    sim = GlyphSimulator(texts=tuple("0123456789"), image_size=IMAGE_SIZE)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class).astype(np.int32)
    key = jax.random.key(seed)
    step = 0
    while True:
        k = jax.random.fold_in(key, step)
        parts = [sim.random(jax.random.fold_in(k, c), c, per_class) for c in range(NUM_CLASSES)]
        params = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
        yield sim.to_images(params), labels
        step += 1


def npz_batches(path: str, seed: int, batch: int):
    """Yields random batches of an .npz of labelled images, resized to 16 x 16 grey."""
    from pejax.data import load_npz

    data = load_npz(path)
    images = jnp.asarray(data.images)
    if images.shape[-1] == 3:
        images = images @ jnp.asarray([0.299, 0.587, 0.114])[:, None]
    images = jax.image.resize(images, (images.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), "linear")
    images = jnp.clip(images, 0, 1)
    if int(data.labels.max()) >= NUM_CLASSES:
        raise ValueError(f"--npz labels must lie in [0, {NUM_CLASSES}).")
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, images.shape[0], batch)
        yield images[idx], data.labels[idx]


# ------------------------------------------------------------------------------------------------------------
# Training.


def train(args, out: pathlib.Path, schedule_cfg: ScheduleConfig):
    unet_cfg = UNetConfig(
        image_size=IMAGE_SIZE,
        channels=1,
        base_channels=args.base_channels,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        num_classes=NUM_CLASSES,
        groups=8,
        attention=True,
    )
    model = UNet(unet_cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    schedule = schedule_cfg.build()
    lr = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(200, args.steps // 10 + 1), args.steps, end_value=args.lr * 0.1
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    opt_state = opt.init(params)
    ema = params

    @jax.jit
    def train_step(params, opt_state, ema, key, step, images, labels):
        x0 = images * 2.0 - 1.0

        def loss_fn(p):
            return denoising_loss(nnx.merge(graphdef, p), schedule, key, x0, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(args.ema, (1.0 + step) / (10.0 + step))
        ema = optax.incremental_update(params, ema, 1.0 - decay)
        return params, opt_state, ema, loss

    batches = (
        npz_batches(args.npz, args.seed, args.per_class * NUM_CLASSES)
        if args.npz
        else glyph_batches(args.seed + 1, args.per_class)
    )
    key = jax.random.key(args.seed + 2)
    losses, data_s = [], 0.0
    t_start = time.perf_counter()
    step = 0
    for step in range(args.steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_s += time.perf_counter() - t0
        params, opt_state, ema, loss = train_step(
            params, opt_state, ema, jax.random.fold_in(key, step), step, images, labels
        )
        loss.block_until_ready()  # so the next step's data time does not absorb this step's compute
        if step % 100 == 0 or step == args.steps - 1:
            losses.append((step, float(loss)))
            print(
                f"step {step:5d} loss {float(loss):.4f} ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
        if time.perf_counter() - t_start > args.max_train_seconds:
            print(f"time budget reached after {step + 1} steps", flush=True)
            break
    jax.block_until_ready(ema)
    train_s = time.perf_counter() - t_start
    info = {
        "steps": step + 1,
        "batch_size": args.per_class * NUM_CLASSES,
        "train_seconds": train_s,
        "data_seconds": data_s,
        "final_loss_mean_last_5_logged": float(np.mean([v for _, v in losses[-5:]])),
        "losses": losses,
        "lr": args.lr,
        "ema": args.ema,
        "data": args.npz
        or "GlyphSimulator(texts='0'..'9', image_size=16), fresh renders every step",
        "num_params": count_params(model),
        "unet": unet_cfg.to_dict(),
    }
    model = nnx.merge(graphdef, ema)
    save_checkpoint(
        out / "model",
        model,
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
        schedule=schedule_cfg,
        params_format="orbax",
        metadata={k: v for k, v in info.items() if k != "losses"},
        overwrite=True,
    )
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------------------
# Measurements.


def time_call(fn, repeats: int = 2) -> float:
    jax.block_until_ready(fn())  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def generation_cost(gen: FlaxDiffusionGenerator, n: int = 128) -> dict[str, float]:
    key = jax.random.key(123)
    x = gen.random(key, 3, n)
    costs = {f"random ({gen.num_steps} steps)": time_call(lambda: gen.random(key, 3, n)) / n}
    for degree in (0.15, 0.6):
        steps = max(1, round(degree * gen.num_steps))
        costs[f"variation degree {degree} ({steps} steps)"] = (
            time_call(lambda d=degree: gen.variation(key, x, 3, d)) / n
        )
    return costs


def glyph_cost(n: int = 128) -> dict[str, float]:
    from pejax.generators.glyphs import GlyphSimulator

    sim = GlyphSimulator(texts=tuple("0123456789"), image_size=IMAGE_SIZE)
    key = jax.random.key(0)
    p = sim.random(key, 3, n)
    return {
        "glyphs random + render": time_call(lambda: sim.to_images(sim.random(key, 3, n))) / n,
        "glyphs variation + render": time_call(lambda: sim.to_images(sim.variation(key, p, 3, 0.6)))
        / n,
    }


def pe_config() -> PEConfig:
    from pejax.run_config import DEMO_CONFIG

    return PEConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in DEMO_CONFIG["pe"].items()}
    )


def run_pe(gen, split, privacy: PrivacyConfig, seed: int):
    from pejax.metrics import downstream_accuracy
    from pejax.runner import PrivateEvolution

    runner = PrivateEvolution(
        generator=gen,
        embedding=get_embedding("resize", size=(8, 8), channels=1),
        embedding_name="resize8x8",
        pe=pe_config(),
        privacy=privacy,
    )
    t0 = time.perf_counter()
    result = runner.run(jax.random.key(seed), split.train_images, split.train_labels)
    wall = time.perf_counter() - t0
    acc = downstream_accuracy(
        np.asarray(result.images), result.labels, split.test_images, split.test_labels
    )
    return {
        "test_accuracy": acc,
        "wall_seconds": wall,
        "epsilon_spent": result.ledger.epsilons(),
        "noise_multiplier": result.noise_multiplier,
        "releases": len(result.ledger.releases),
        "delta": result.ledger.delta,
    }, result


def run_glyph_demo(epsilon: float, out: pathlib.Path, seed: int) -> dict:
    from pejax.run_config import DEMO_CONFIG
    from pejax.run_config import run_experiment

    config = copy.deepcopy(DEMO_CONFIG)
    config["privacy"]["epsilon"] = epsilon
    config["run"]["seed"] = seed
    target = out / f"glyph_demo_eps{epsilon:g}_seed{seed}"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    t0 = time.perf_counter()
    report = run_experiment(config, target, progress=False, echo=lambda *a: None)
    return {
        "test_accuracy": report["final_metrics"]["test_accuracy"],
        "wall_seconds": time.perf_counter() - t0,
    }


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule_cfg = ScheduleConfig(kind="cosine", num_timesteps=1000)
    if args.skip_train:
        info = json.loads((out / "train_info.json").read_text())
    else:
        info = train(args, out, schedule_cfg)
    gen = FlaxDiffusionGenerator.from_checkpoint(
        out / "model", num_steps=args.sample_steps, sampler=args.sampler
    )

    from pejax import reporting
    from pejax.data import load_digits_split
    from pejax.metrics import downstream_accuracy

    cost = generation_cost(gen)
    cost.update(glyph_cost())
    print("per-sample cost (ms):", {k: round(v * 1e3, 3) for k, v in cost.items()}, flush=True)

    split = load_digits_split()
    # (a) RANDOM only: 100 class-conditional samples per class, no private data touched.
    key = jax.random.key(args.seed + 10)
    rand = jnp.concatenate([gen.random(jax.random.fold_in(key, c), c, 100) for c in range(10)])
    rand_labels = np.repeat(np.arange(10), 100).astype(np.int32)
    reporting.save_samples_png(out / "random_samples.png", rand, rand_labels)
    random_only = {
        "Flax DDPM": downstream_accuracy(
            np.asarray(rand), rand_labels, split.test_images, split.test_labels
        )
    }
    from pejax.generators.glyphs import GlyphSimulator

    sim = GlyphSimulator(texts=tuple("0123456789"), image_size=IMAGE_SIZE)
    glyph_rand = jnp.concatenate(
        [sim.to_images(sim.random(jax.random.fold_in(key, c), c, 100)) for c in range(10)]
    )
    random_only["glyph simulator"] = downstream_accuracy(
        np.asarray(glyph_rand), rand_labels, split.test_images, split.test_labels
    )
    print("random-only accuracy", random_only, flush=True)

    # (b), (c), (d): PE runs, one per seed.
    settings = [
        (f"{eps:g}", PrivacyConfig(epsilon=eps, max_private_samples=1797)) for eps in args.epsilons
    ]
    if args.no_noise_run:
        settings.append(
            (
                "inf (no noise)",
                PrivacyConfig(epsilon=None, noise_multiplier=0.0, max_private_samples=1797),
            )
        )
    pe_runs = {name: [] for name, _ in settings}
    for name, privacy in settings:
        for seed in args.pe_seeds:
            summary, res = run_pe(gen, split, privacy, seed)
            pe_runs[name].append(summary)
            if seed == args.pe_seeds[0]:
                tag = name.split()[0]
                reporting.save_samples_png(out / f"pe_eps{tag}.png", res.images, res.labels)
            print(f"PE eps {name} seed {seed}:", summary, flush=True)
    glyph_runs = {}
    if args.compare_glyphs:
        for eps in args.epsilons:
            glyph_runs[f"{eps:g}"] = []
            for seed in args.pe_seeds:
                glyph_runs[f"{eps:g}"].append(run_glyph_demo(eps, out, seed))
                print(
                    f"glyph demo eps {eps:g} seed {seed}:", glyph_runs[f"{eps:g}"][-1], flush=True
                )
    doc = {
        "train": {k: v for k, v in info.items() if k != "losses"},
        "cost_ms_per_sample": {k: v * 1e3 for k, v in cost.items()},
        "random_only_accuracy": random_only,
        "pe": pe_runs,
        "glyph_demo": glyph_runs,
        "pe_seeds": args.pe_seeds,
        "sample_steps": args.sample_steps,
        "sampler": args.sampler,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float))
    write_report(pathlib.Path(args.report), doc, argv)


def _acc(runs: list[dict]) -> str:
    accs = [r["test_accuracy"] for r in runs]
    each = ", ".join(f"{a:.3f}" for a in accs)
    if len(accs) == 1:
        return each
    return f"{np.mean(accs):.3f} ± {np.std(accs, ddof=1):.3f} ({each})"


def write_report(path: pathlib.Path, doc: dict, argv) -> None:
    train_info = doc["train"]
    cmd = "python experiments/train_flax_ddpm.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "# Flax DDPM generator: a public-pretrained diffusion model in PE (PE1 in miniature)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared), "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}; Python {platform.python_version()}.",
        "",
        "## Training (public data only)",
        "",
        f"- Data: {train_info['data']}.",
        f"- Model: nnx UNet, {train_info['num_params']:,} parameters, "
        f"architecture `{json.dumps(train_info['unet'])}`.",
        f"- {train_info['steps']} Adam steps, batch {train_info['batch_size']}, lr {train_info['lr']} "
        f"(warm-up, cosine decay), EMA {train_info['ema']}; cosine schedule T = 1000.",
        f"- Training time: {train_info['train_seconds']:.0f} s "
        f"({train_info['train_seconds'] / train_info['steps'] * 1e3:.0f} ms/step, of which data "
        f"rendering {train_info['data_seconds'] / train_info['steps'] * 1e3:.0f} ms/step); "
        f"final loss {train_info['final_loss_mean_last_5_logged']:.4f}.",
        "",
        f"## Per-sample generation cost ({doc['sampler']}, batch 128, after compilation)",
        "",
        "| call | ms / sample |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in doc["cost_ms_per_sample"].items()]
    lines += [
        "",
        "## Quality on scikit-learn digits (test accuracy of logistic regression on 8 x 8)",
        "",
        "PE hyperparameters: `pejax.run_config.DEMO_CONFIG['pe']` unchanged (400 candidates, 5 iterations, "
        "lookahead 4, degrees 0.6 -> 0.15, 100 released samples per class); embedding resize to 8 x 8; "
        f"delta 1/(n ln n); PE seeds {doc['pe_seeds']} (the model is trained once).",
        "",
        "| generator | setting | test accuracy: mean ± sd (each seed) | wall s per run |",
        "|---|---|---|---|",
    ]
    for gen_name, acc in doc["random_only_accuracy"].items():
        lines.append(f"| {gen_name} | RANDOM only, 100 per class (no private data) | {acc:.3f} | |")
    for eps, runs in doc["pe"].items():
        wall = np.mean([r["wall_seconds"] for r in runs])
        lines.append(f"| Flax DDPM | PE, epsilon {eps} | {_acc(runs)} | {wall:.0f} |")
    for eps, runs in doc["glyph_demo"].items():
        wall = np.mean([r["wall_seconds"] for r in runs])
        lines.append(f"| glyph simulator (demo) | PE, epsilon {eps} | {_acc(runs)} | {wall:.0f} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
