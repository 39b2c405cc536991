"""Accuracy of a classifier trained on pejax's synthetic digits, against epsilon.

For epsilon in {0.5, 1, 2, 4, 8, inf} and 3 seeds, runs the digits demo configuration (glyph simulator,
scikit-learn digits, delta = 1/(N ln N) for the public bound N = 1797), trains a logistic regression on the synthetic images (8x8) and tests it
on the 450 held-out real images. Also reports the random-API floor (the initial population of the same runs)
and the real-data ceiling (trained on the 1347 real private-train images). Writes a JSON, a markdown table and
a plot to experiments/results/.

  python experiments/digits_sweep.py                 # full sweep (about 10 minutes on 2 cores)
  python experiments/digits_sweep.py --epsilons 1 4 --seeds 0
  python experiments/digits_sweep.py --tag digits_sweep_large --epsilons 4 8 inf \\
      --pe '{"samples_per_iteration": 2000, "variation_folds": 4, "iterations": 10, "final_samples_per_class": 300}'
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np

from pejax.data import load_digits_split
from pejax.metrics import choose_classifier_c
from pejax.metrics import downstream_accuracy
from pejax.run_config import DEMO_CONFIG
from pejax.run_config import run_experiment

RESULTS = pathlib.Path(__file__).parent / "results"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 4, 8, math.inf])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tag", default="digits_sweep")
    parser.add_argument(
        "--pe",
        default="{}",
        help="JSON overrides of the demo's [pe] section, e.g. '{\"iterations\": 10}'",
    )
    parser.add_argument(
        "--generator",
        default="{}",
        help='JSON overrides of the demo\'s [generator] section, e.g. \'{"prior": {"warp": 0.06}}\'',
    )
    args = parser.parse_args()

    overrides = json.loads(args.pe)
    base = copy.deepcopy(DEMO_CONFIG)
    base["pe"].update(overrides)
    base["generator"].update(json.loads(args.generator))
    split = load_digits_split()
    # The evaluation classifier's C: chosen by 5-fold cross-validation on the real training split (never
    # on the test images), then fixed for every run. Accuracy with scikit-learn's default C = 1 is
    # reported beside it.
    classifier_c, cv_scores = choose_classifier_c(split.train_images, split.train_labels)
    if classifier_c != base["run"]["classifier_c"]:
        print(
            f"note: cross-validation chose C = {classifier_c}, the demo config has "
            f"{base['run']['classifier_c']}; using {classifier_c}"
        )
    base["run"]["classifier_c"] = classifier_c
    ceiling = downstream_accuracy(
        split.train_images, split.train_labels, split.test_images, split.test_labels, C=classifier_c
    )
    ceiling_c1 = downstream_accuracy(
        split.train_images, split.train_labels, split.test_images, split.test_labels, C=1.0
    )
    rows, floors = [], []
    for eps in args.epsilons:
        for seed in args.seeds:
            config = copy.deepcopy(base)
            config["run"]["seed"] = seed
            if math.isinf(eps):
                config["privacy"].update({"epsilon": None, "noise_multiplier": 0.0})
            else:
                config["privacy"]["epsilon"] = eps
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                report = run_experiment(
                    config, pathlib.Path(tmp) / "out", progress=False, echo=lambda *_: None
                )
                wall = time.perf_counter() - t0
                with np.load(pathlib.Path(tmp) / "out" / "synthetic.npz") as synthetic:
                    images = synthetic["images"].astype(np.float32) / 255.0
                    labels = synthetic["labels"]
                if images.ndim == 3:
                    images = images[..., None]
                acc_c1 = downstream_accuracy(
                    images, labels, split.test_images, split.test_labels, C=1.0
                )
            its = report["iterations"]
            acc = its[-1]["metrics"]["test_accuracy"]
            floors.append(its[0]["metrics"]["test_accuracy"])
            per_it = [it["timings"]["total"] for it in its[2:-1]]  # steady state: after compilation
            rows.append(
                {
                    "epsilon": eps,
                    "seed": seed,
                    "test_accuracy": acc,
                    "test_accuracy_c1": acc_c1,
                    "frechet_distance": its[-1]["metrics"]["frechet_distance"],
                    "epsilon_spent": report["privacy"]["epsilon_spent"],
                    "noise_multiplier": report["privacy"]["noise_multiplier"],
                    "wall_seconds": wall,
                    "steady_iteration_seconds": statistics.median(per_it) if per_it else None,
                }
            )
            print(
                f"epsilon {eps:g} seed {seed}: accuracy {acc:.4f} (C = 1: {acc_c1:.4f}; {wall:.1f} s)",
                flush=True,
            )

    summary = []
    for eps in args.epsilons:
        accs = [r["test_accuracy"] for r in rows if r["epsilon"] == eps]
        accs_c1 = [r["test_accuracy_c1"] for r in rows if r["epsilon"] == eps]
        summary.append(
            {
                "epsilon": eps,
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "accuracies": accs,
                "mean_c1": float(np.mean(accs_c1)),
                "accuracies_c1": accs_c1,
            }
        )
    doc = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({__import__('os').cpu_count()} cores)",
        "config": base,
        "random_api_floor": {"mean": float(np.mean(floors)), "std": float(np.std(floors))},
        "classifier_c": classifier_c,
        "classifier_c_cv_scores": cv_scores,
        "real_data_ceiling": ceiling,
        "real_data_ceiling_c1": ceiling_c1,
        "summary": summary,
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")

    lines = [
        f"Logistic regression C = {classifier_c:g} (5-fold cross-validation on the real training split); "
        "the last two columns use scikit-learn's default C = 1.",
        "",
        "| epsilon | accuracy (mean +- std over seeds) | per seed | C = 1: mean | C = 1: per seed |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['epsilon']:g} | {s['mean']:.3f} +- {s['std']:.3f} | "
            + ", ".join(f"{a:.3f}" for a in s["accuracies"])
            + f" | {s['mean_c1']:.3f} | "
            + ", ".join(f"{a:.3f}" for a in s["accuracies_c1"])
            + " |"
        )
    lines.append(f"| random API only (iteration 0) | {doc['random_api_floor']['mean']:.3f} | | | |")
    lines.append(f"| real private-train data | {ceiling:.3f} | | {ceiling_c1:.3f} | |")
    table = "\n".join(lines)
    (RESULTS / f"{args.tag}.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [s for s in summary if math.isfinite(s["epsilon"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        [s["epsilon"] for s in finite],
        [s["mean"] for s in finite],
        [s["std"] for s in finite],
        fmt="o-",
        label="pejax (glyph simulator)",
    )
    for s in summary:
        if math.isinf(s["epsilon"]):
            ax.axhline(s["mean"], color="C2", ls=":", label="no noise (epsilon = inf)")
    ax.axhline(doc["random_api_floor"]["mean"], color="C3", ls="--", label="random API only")
    ax.axhline(ceiling, color="k", ls="--", label="trained on real data")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1/(n ln n))")
    ax.set_ylabel("test accuracy (logistic regression)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.tag}.png", dpi=110)


if __name__ == "__main__":
    main()
