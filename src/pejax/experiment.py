"""A whole run from a configuration dict: data, generator, embedding, PE, evaluation and output files.

This is the driver behind ``pejax demo`` and ``pejax run CONFIG``. Evaluation metrics are computed on the
held-out real test set only (never on the private training set) and do not steer the run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np

from pejax import _validate
from pejax import checkpoint as ckpt
from pejax import config as cfg
from pejax import reporting
from pejax.runner import IterationInfo
from pejax.runner import PrivateEvolution

# The embedded default: scikit-learn's digits, the JAX glyph simulator, epsilon 1, delta 1/(n ln n).
# Hyperparameters follow the principles in PE.md (few candidates per class so winning bins beat the noise, a
# threshold of one sigma, decreasing variation degree); the developers checked them with a handful of runs on
# these same digits, which the privacy guarantee does not cover (see BUILD_NOTES.md).
DEMO_CONFIG: dict[str, Any] = {
    # classifier_c: the evaluation logistic regression's C, chosen once by 5-fold cross-validation on the
    # real digits training split (pejax.metrics.choose_classifier_c; experiments/digits_sweep.py re-checks it).
    "run": {"seed": 0, "evaluate": True, "classifier_c": 0.01},
    "data": {"source": "digits"},
    # handwriting: common handwritten digit forms beside the fonts (better at every epsilon in
    # experiments/results/digits_sweep_fonts_only.md against digits_sweep.md).
    "generator": {"kind": "glyphs", "image_size": 16, "handwriting": True},
    "embedding": {"name": "resize"},
    "privacy": {"epsilon": 1.0, "accountant": "pld"},
    "pe": {
        "num_classes": 10,
        "samples_per_iteration": 400,
        "iterations": 5,
        "k": 1,
        "lookahead_degree": 4,
        "threshold_sigmas": 1.0,
        "selection_mode": "sample",
        "variation_folds": 2,
        "degrees": [0.6, 0.15],
        "output": "parents",
        "final_samples_per_class": 100,
        "final_degree": 0.1,
    },
}

RUN_KEYS = ("seed", "evaluate", "out", "classifier_c")
DATA_KEYS = ("source", "path", "test_path", "images_key", "labels_key")
GENERATOR_KEYS = ("kind", "image_size", "texts", "fonts", "prior", "handwriting")
EMBEDDING_KEYS = ("name", "size", "channels")


class OutputFolderError(ValueError):
    """The output folder holds files of another run."""


def load_data(section: dict):
    """Returns (train_images, train_labels, test_images | None, test_labels | None)."""
    from pejax import data as data_mod

    section = cfg.check_keys("data", section, DATA_KEYS)
    source = section.get("source", "digits")
    if source == "digits":
        split = data_mod.load_digits_split()
        return split.train_images, split.train_labels, split.test_images, split.test_labels
    if source == "npz":
        if "path" not in section:
            raise ValueError(
                "data.source = 'npz' needs data.path (an .npz with images and labels)."
            )
        kw = {k: section[k] for k in ("images_key", "labels_key") if k in section}
        train = data_mod.load_npz(section["path"], **kw)
        test = data_mod.load_npz(section["test_path"], **kw) if "test_path" in section else None
    elif source == "folder":
        if "path" not in section:
            raise ValueError(
                "data.source = 'folder' needs data.path (a folder with one subfolder a class)."
            )
        train = data_mod.load_image_folder(section["path"])
        test = data_mod.load_image_folder(section["test_path"]) if "test_path" in section else None
    else:
        raise ValueError(f"data.source must be 'digits', 'npz' or 'folder', got {source!r}.")
    if test is None:
        return train.images, train.labels, None, None
    return train.images, train.labels, test.images, test.labels


def build_generator(section: dict, num_classes: int):
    section = cfg.check_keys("generator", section, GENERATOR_KEYS)
    kind = section.pop("kind", "glyphs")
    if kind != "glyphs":
        raise ValueError(f"generator.kind must be 'glyphs', got {kind!r}.")
    from pejax.generators.glyphs import GlyphSimulator

    if "texts" in section:
        section["texts"] = tuple(section["texts"])
    else:
        section["texts"] = tuple(str(i) for i in range(num_classes))
    if len(section["texts"]) != num_classes:
        raise ValueError(
            f"generator.texts has {len(section['texts'])} entries but pe.num_classes is {num_classes}."
        )
    if "fonts" in section:
        section["fonts"] = tuple(section["fonts"])
    if "prior" in section:
        from pejax.generators.glyphs import GlyphPrior

        fields = tuple(f.name for f in dataclasses.fields(GlyphPrior))
        prior = cfg.check_keys("generator.prior", section["prior"], fields)
        section["prior"] = GlyphPrior(
            **{k: v if isinstance(v, int | float) else tuple(v) for k, v in prior.items()}
        )
    return GlyphSimulator(**section)


def build_embedding(section: dict, private_shape):
    from pejax.embeddings import get_embedding

    section = cfg.check_keys("embedding", section, EMBEDDING_KEYS)
    name = section.pop("name", "resize")
    if name == "resize":
        section["size"] = tuple(section.get("size", private_shape[1:3]))
        section.setdefault("channels", int(private_shape[3]))
    fn = get_embedding(name, **section)
    label = name + ("" if not section else json.dumps(section, sort_keys=True, default=list))
    return fn, label


def check_output_folder(out: pathlib.Path, resume: bool) -> None:
    """Refuses to mix two runs' files in one folder (nothing is deleted or overwritten)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"output path {str(out)!r} exists and is not a folder.")
    has_ckpt = bool(ckpt.list_checkpoints(out / "checkpoints"))
    finished = (out / "report.json").exists()
    if resume:
        return
    if has_ckpt or finished:
        raise OutputFolderError(
            f"output folder {str(out)!r} already holds another run's files "
            f"({'checkpoints' if has_ckpt else 'report.json'}). Pass --resume to continue that run, or "
            "choose a new --out folder; nothing was changed."
        )


def _evaluator(test_images, test_labels, emb_size, classifier_c):
    from pejax.embeddings import resize_embedding
    from pejax.metrics import downstream_accuracy
    from pejax.metrics import frechet_distance

    test_emb = np.asarray(resize_embedding(test_images, size=emb_size))

    def evaluate(info: IterationInfo) -> dict[str, float]:
        images = np.asarray(info.images)
        acc = downstream_accuracy(images, info.labels, test_images, test_labels, C=classifier_c)
        syn_emb = np.asarray(
            resize_embedding(images, size=emb_size, channels=test_images.shape[-1])
        )
        fd = frechet_distance(syn_emb, test_emb)
        return {"test_accuracy": acc, "frechet_distance": fd}

    return evaluate


def run_experiment(
    config: dict[str, Any],
    out: str | pathlib.Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo=print,
) -> dict[str, Any]:
    """Runs a configured experiment and writes its outputs to ``out``; returns the report dict."""
    config = copy.deepcopy(config)
    unknown = sorted(set(config) - set(cfg.SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {list(cfg.SECTIONS)}.")
    run_section = cfg.check_keys("run", config.get("run"), RUN_KEYS)
    pe = cfg.pe_from_dict(config.get("pe"))
    privacy = cfg.privacy_from_dict(config.get("privacy"))
    speed = cfg.speed_from_dict(config.get("speed"))
    # The evaluation classifier's C (scikit-learn's default 1.0 unless the config fixes it).
    classifier_c = _validate.finite_float(
        "run.classifier_c", run_section.get("classifier_c", 1.0), minimum=0.0, strict=True
    )
    seed = run_section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"run.seed must be an integer, got {seed!r}.")
    out = pathlib.Path(out)
    check_output_folder(out, resume)

    train_x, train_y, test_x, test_y = load_data(config.get("data"))
    generator = build_generator(config.get("generator"), pe.num_classes)
    embedding, emb_label = build_embedding(config.get("embedding"), train_x.shape)

    callbacks = []
    if run_section.get("evaluate", True) and test_x is not None:
        if test_x.shape[1:3] != train_x.shape[1:3]:
            echo(
                f"note: the test images are {test_x.shape[1]}x{test_x.shape[2]} and the training images "
                f"{train_x.shape[1]}x{train_x.shape[2]}: for the metrics the test images are resized (to "
                f"{train_x.shape[1]}x{train_x.shape[2]} for the Frechet distance, and with the synthetic "
                "images to 8x8 for the test accuracy)."
            )
        callbacks.append(_evaluator(test_x, test_y, tuple(train_x.shape[1:3]), classifier_c))

    # One run per output folder: the lock is held until every output file is written, and the folder is
    # checked again under it (another run may have written here since the first check).
    with ckpt.lock_folder(out, what="output folder"):
        check_output_folder(out, resume)
        return _run_and_write(
            out,
            resume=resume,
            progress=progress,
            echo=echo,
            config=config,
            run_section=run_section,
            seed=seed,
            pe=pe,
            privacy=privacy,
            speed=speed,
            generator=generator,
            embedding=embedding,
            emb_label=emb_label,
            callbacks=callbacks,
            train=(train_x, train_y),
        )


def _run_and_write(
    out,
    *,
    resume,
    progress,
    echo,
    config,
    run_section,
    seed,
    pe,
    privacy,
    speed,
    generator,
    embedding,
    emb_label,
    callbacks,
    train,
):
    train_x, train_y = train
    runner = PrivateEvolution(
        generator=generator,
        embedding=embedding,
        embedding_name=emb_label,
        pe=pe,
        privacy=privacy,
        speed=speed,
        checkpoint_dir=out / "checkpoints",
        callbacks=callbacks,
        progress=progress,
    )
    t0 = time.perf_counter()
    result = runner.run(jax.random.key(seed), train_x, train_y, resume=resume)
    wall = time.perf_counter() - t0

    reporting.write_synthetic(out / "synthetic.npz", result.images, result.labels)
    reporting.save_samples_png(out / "samples.png", result.images, result.labels)
    eps = result.ledger.epsilons()
    report = {
        "pejax_version": __import__("pejax").__version__,
        "privacy": {
            "target_epsilon": privacy.epsilon,
            "delta": result.ledger.delta,
            "delta_rule": "given"
            if privacy.delta is not None
            else "1/(n ln n), n treated as public",
            "noise_multiplier": result.noise_multiplier,
            "iterations": pe.iterations,
            "accountant": privacy.accountant,
            "epsilon_spent": eps,
            "releases": [
                {
                    "iteration": r.iteration,
                    "description": r.description,
                    "noise_multiplier": r.noise_multiplier,
                    "sensitivity": r.sensitivity,
                    "neighboring_relation": r.neighboring_relation,
                }
                for r in result.ledger.releases
            ],
            "not_covered": [
                "the number of private samples n (used for the default delta and stated here)",
                "hyperparameter choices (the demo's defaults were checked by the developers with a few runs on "
                "this same data set; see BUILD_NOTES.md)",
                "the evaluation classifier's C (run.classifier_c; the demo's was chosen by cross-validation on "
                "the digits training split): it changes the reported accuracy, not the synthetic data",
            ],
        },
        "config": {
            "run": run_section | {"seed": seed},
            "data": config.get("data", {}),
            "generator": config.get("generator", {}),
            "embedding": emb_label,
            "pe": cfg.to_dict(pe),
            "privacy": cfg.to_dict(privacy),
            "speed": cfg.to_dict(speed),
        },
        "class_sizes": list(result.class_sizes),
        "num_synthetic": int(result.labels.shape[0]),
        "resumed_from": result.resumed_from,
        "wall_seconds": wall,
        "iterations": result.history,
    }
    final = result.history[-1].get("metrics", {}) if result.history else {}
    report["final_metrics"] = final
    reporting.write_json(out / "report.json", report)
    reporting.save_metrics_png(out / "metrics.png", result.history, accountant=privacy.accountant)
    eps_str = ", ".join(f"{k} {v:.4g}" for k, v in eps.items())
    echo(
        f"pejax: {report['num_synthetic']} synthetic images in {wall:.1f} s; "
        f"noise multiplier {result.noise_multiplier:.4g}, delta {result.ledger.delta:.3g}; "
        f"epsilon spent: {eps_str}."
    )
    if final:
        echo("final metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
    echo(f"wrote {out}/synthetic.npz, report.json, samples.png, metrics.png")
    if not math.isfinite(eps[privacy.accountant]):
        echo("warning: noise multiplier 0: this run is NOT differentially private.")
    return report
