"""How well a glyph simulator's random API covers the digits: the nearest-of-N oracle.

For each class, draws N random samples from the simulator, replaces every private-train digit by its nearest
sample (L2 at the private data's 8x8 resolution, the demo's embedding), trains the evaluation logistic
regression (C = 0.01) on those replacements and tests it on the 450 held-out real digits. This is the accuracy
PE would reach if its selection were perfect and its candidates were these N random samples: an upper bound of
what selection can extract from the generator without variations, and a fast (seconds) way to compare
generators. It reads the private data without noise, so it is a developer's tool, outside any DP guarantee.

  python experiments/digits_coverage.py                      # fonts only vs fonts + handwritten forms
  python experiments/digits_coverage.py --pools 5 --num-random 40000

Writes experiments/results/digits_coverage.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from pejax.embeddings import resize_embedding
from pejax.metrics import nearest_random_samples
from pejax.run_config import DEMO_CONFIG
from pejax.run_config import build_generator
from pejax.run_config import load_data

RESULTS = pathlib.Path(__file__).parent / "results"
# Generators compared by default: the demo's simulator with and without the handwritten forms.
GENERATORS = {
    "fonts only": {"handwriting": False},
    "fonts + handwritten forms": {"handwriting": True},
}


def coverage(generator, key, train_x, train_y, test_x, test_y, num_random: int, c: float):
    """(test accuracy, per-class recall) of the oracle for one pool of random samples."""
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(train_y)
    xs = [
        nearest_random_samples(
            generator,
            jax.random.fold_in(key, int(y)),
            train_x[train_y == y].reshape(int((train_y == y).sum()), -1),
            label=int(y),
            num_random=num_random,
            embed=lambda images: resize_embedding(images, size=(8, 8)),
        ).reshape(train_x[train_y == y].shape)
        for y in classes
    ]
    ys = [np.full(len(x), y) for x, y in zip(xs, classes, strict=True)]
    x, y = np.concatenate(xs), np.concatenate(ys)
    # pejax.metrics.downstream_accuracy's classifier (both sets are 8x8 already), kept for the recalls.
    clf = LogisticRegression(C=c, max_iter=1000).fit(x.reshape(len(x), -1) * 16.0, y)
    pred = clf.predict(np.asarray(test_x).reshape(len(test_x), -1) * 16.0)
    recall = [float((pred[test_y == k] == k).mean()) for k in classes]
    return float((pred == test_y).mean()), recall


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-random", type=int, default=20000, help="random samples per class")
    parser.add_argument(
        "--pools", type=int, default=3, help="independent pools (seeds) per generator"
    )
    parser.add_argument(
        "--generators",
        default=json.dumps(GENERATORS),
        help="JSON {name: overrides of the demo's [generator] section}",
    )
    parser.add_argument("--tag", default="digits_coverage")
    args = parser.parse_args()
    if args.num_random < 1 or args.pools < 1:
        parser.error(
            f"--num-random and --pools must be >= 1, got {args.num_random} and {args.pools}."
        )
    try:
        generators = json.loads(args.generators)
    except json.JSONDecodeError as err:
        parser.error(
            f"--generators is not valid JSON ({err}); pass e.g. '{json.dumps(GENERATORS)}'."
        )
    if not isinstance(generators, dict) or not generators:
        parser.error("--generators must be a non-empty JSON object {name: {generator overrides}}.")
    c = DEMO_CONFIG["run"]["classifier_c"]
    train_x, train_y, test_x, test_y = load_data({"source": "digits"})
    rows = []
    for name, overrides in generators.items():
        section = {**DEMO_CONFIG["generator"], **overrides}
        generator = build_generator(section, DEMO_CONFIG["pe"]["num_classes"])
        t0 = time.perf_counter()
        results = [
            coverage(
                generator, jax.random.key(p), train_x, train_y, test_x, test_y, args.num_random, c
            )
            for p in range(args.pools)
        ]
        accs = [a for a, _ in results]
        recall = np.mean([r for _, r in results], axis=0).round(3).tolist()
        rows.append(
            {
                "generator": name,
                "overrides": overrides,
                "accuracies": accs,
                "mean": statistics.fmean(accs),
                "recall_per_class": recall,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"{name:28s} {statistics.fmean(accs):.4f}  pools {np.round(accs, 3).tolist()}  recall {recall}"
        )
    meta = {
        "num_random": args.num_random,
        "pools": args.pools,
        "classifier_c": c,
        "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# {args.tag}",
        "",
        f"Nearest-of-{args.num_random} random samples per private digit, {args.pools} pools, C = {c}; "
        f"{meta['date']}.",
        "",
        "| generator | overrides | mean accuracy | per pool | recall per class (0-9) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['generator']} | `{json.dumps(r['overrides'])}` | {r['mean']:.4f} | "
            f"{', '.join(f'{a:.3f}' for a in r['accuracies'])} | "
            f"{', '.join(f'{v:.2f}' for v in r['recall_per_class'])} |"
        )
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
