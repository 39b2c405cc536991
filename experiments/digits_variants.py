"""Many PE variants on the digits, several seeds each, in one process (compilations are shared).

Each variant is a set of overrides on top of a base (both JSON, by config section: "pe", "generator",
"privacy", "embedding", applied over pejax.run_config.DEMO_CONFIG). Every run trains the evaluation logistic
regression (C = 0.01, the demo's cross-validated value) on the released synthetic images and tests it on the
450 held-out real digits. A run takes 10-60 s here once compiled, so 6 seeds per variant are affordable: the
seed-to-seed spread (about +-0.015) is as large as most effects, and 3 seeds cannot tell them apart.

  python experiments/digits_variants.py --tag eps4_variants \\
      --base '{"pe": {"samples_per_iteration": 2000, "variation_folds": 4, "iterations": 10,
               "final_samples_per_class": 300, "threshold_sigmas": 1.5},
               "generator": {"handwriting": true, "prior": {"warp": 0.06}}, "privacy": {"epsilon": 4.0}}' \\
      --variants '{"base": {}, "T6": {"pe": {"iterations": 6}}}' --seeds 0 1 2 3 4 5

Writes experiments/results/<tag>.{json,md}. This is tuning on the evaluation data, outside the DP guarantee.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from pejax import config as cfg
from pejax.metrics import downstream_accuracy
from pejax.run_config import DEMO_CONFIG
from pejax.run_config import build_embedding
from pejax.run_config import build_generator
from pejax.run_config import load_data
from pejax.runner import PrivateEvolution

RESULTS = pathlib.Path(__file__).parent / "results"
SECTIONS = ("pe", "generator", "privacy", "embedding")


def variant_config(base: dict, overrides: dict) -> dict:
    """DEMO_CONFIG with ``base`` then ``overrides`` merged into each section (one level deep)."""
    unknown = sorted((set(base) | set(overrides)) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; use any of {list(SECTIONS)}.")
    config = copy.deepcopy(DEMO_CONFIG)
    for section in SECTIONS:
        config[section].update(base.get(section, {}))
        config[section].update(overrides.get(section, {}))
    return config


def score_variant(config: dict, seeds, classifier_c: float) -> list[float]:
    train_x, train_y, test_x, test_y = load_data(config["data"])
    pe = cfg.pe_from_dict(config["pe"])
    privacy = cfg.privacy_from_dict(config["privacy"])
    generator = build_generator(config["generator"], pe.num_classes)
    embedding, label = build_embedding(config["embedding"], train_x.shape)
    accuracies = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as folder:
            runner = PrivateEvolution(
                generator=generator,
                embedding=embedding,
                embedding_name=label,
                pe=pe,
                privacy=privacy,
                checkpoint_dir=folder,
                progress=False,
            )
            result = runner.run(jax.random.key(seed), train_x, train_y)
        accuracies.append(
            downstream_accuracy(
                np.asarray(result.images), result.labels, test_x, test_y, C=classifier_c
            )
        )
    return accuracies


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="{}", help="JSON overrides shared by every variant")
    parser.add_argument("--variants", required=True, help='JSON {"name": {section: {...}}, ...}')
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--classifier-c", type=float, default=DEMO_CONFIG["run"]["classifier_c"])
    parser.add_argument("--tag", default="digits_variants")
    args = parser.parse_args()
    base, variants = json.loads(args.base), json.loads(args.variants)
    if not isinstance(variants, dict) or not variants:
        parser.error('--variants must be a non-empty JSON object {"name": {section: {...}}}.')

    rows = []
    for name, overrides in variants.items():
        t0 = time.perf_counter()
        accs = score_variant(variant_config(base, overrides), args.seeds, args.classifier_c)
        row = {
            "variant": name,
            "overrides": overrides,
            "accuracies": accs,
            "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"{name:28s} mean {row['mean']:.4f} +- {row['std']:.3f}  per seed "
            f"{[round(a, 3) for a in accs]}  {row['seconds']:.0f} s",
            flush=True,
        )

    RESULTS.mkdir(exist_ok=True)
    meta = {
        "base": base,
        "seeds": args.seeds,
        "classifier_c": args.classifier_c,
        "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# {args.tag}",
        "",
        f"Base: `{json.dumps(base)}`; seeds {args.seeds}; classifier C = {args.classifier_c}; {meta['date']}.",
        "",
        "| variant | overrides | mean +- std | per seed |",
        "|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{a:.3f}" for a in r["accuracies"])
        lines.append(
            f"| {r['variant']} | `{json.dumps(r['overrides'])}` | {r['mean']:.4f} +- {r['std']:.3f} | "
            f"{per_seed} |"
        )
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
