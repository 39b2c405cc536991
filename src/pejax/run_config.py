"""A whole PE run from a config dict: data, generator, embedding, run, evaluation and output files.

This is the driver behind ``pejax demo`` and ``pejax run CONFIG``. Components are built by name through
:mod:`pejax.registry` (``pejax components`` lists them). Evaluation metrics are computed on the held-out real
test set only (never on the private training set) and do not steer the run.
"""

from __future__ import annotations

import copy
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
from pejax import registry
from pejax import reporting
from pejax.errors import OutputFolderError as OutputFolderError
from pejax.runner import NOT_DP_NOTICE
from pejax.runner import IterationInfo
from pejax.runner import PrivateEvolution

# The embedded default: scikit-learn's digits, the JAX glyph simulator, epsilon 1, add/remove adjacency, delta
# 1/(N ln N) for the public bound N = 1797 (the size of the whole scikit-learn digits set, which the private
# training split is drawn from), so that delta does not reveal the private n.
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
    "privacy": {"epsilon": 1.0, "accountant": "pld", "max_private_samples": 1797},
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
EVALUATION_KEYS = ("metrics", "embedding")
# Names of the metrics in reports (the demo's reports have always used these).
REPORT_NAMES = {"accuracy": "test_accuracy", "frechet": "frechet_distance"}


def load_dataset(section: dict | None) -> registry.Dataset:
    """Builds the ``[data]`` table's source (default ``"digits"``) through the data registry."""
    return registry.build("data", section, None, "[data]")


def load_data(section: dict | None):
    """Returns (train_samples, train_labels, test_samples | None, test_labels | None) of ``[data]``."""
    d = load_dataset(section)
    return d.samples, d.labels, d.test_samples, d.test_labels


def _numbered(num_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(num_classes))


def build_generator(
    section: dict | None, num_classes: int, ctx: registry.BuildContext | None = None
):
    """Builds the ``[generator]`` table's kind (default ``"glyphs"``) through the generator registry."""
    if ctx is None:
        ctx = registry.BuildContext(num_classes, _numbered(num_classes), (), "image")
    return registry.build("generator", section, ctx, "[generator]")


def build_embedding(
    section: dict | None, private_shape, modality: str = "image", where: str = "[embedding]"
):
    """Builds an embedding table (default ``"resize"`` for images, ``"sentence"`` for text); returns (fn, label)."""
    section = dict(section or {})
    if "name" not in section and modality == "text":
        section["name"] = "sentence"
    comp, _ = registry.split_kind("embedding", section, where)
    if comp.modality is not None and comp.modality != modality:
        raise ValueError(
            f"embedding {comp.name!r} ({where}) embeds {comp.modality}s but the data are {modality}s; "
            f"choose one of {[c for c in registry.names('embedding') if registry.get('embedding', c).modality in (None, modality)]}."
        )
    ctx = registry.BuildContext(0, (), tuple(private_shape), modality)
    return registry.build("embedding", section, ctx, where)


def build_mesh(devices):
    """A ``jax.sharding.Mesh`` over the first devices for ``speed.devices`` (a count or a shape), or ``None``."""
    if devices is None:
        return None
    from jax.sharding import Mesh

    shape = (devices,) if isinstance(devices, int) else tuple(devices)
    total = math.prod(shape)
    available = jax.devices()
    if total > len(available):
        raise ValueError(
            f"speed.devices = {devices!r} needs {total} devices but JAX sees {len(available)} "
            f"({available[0].platform}); lower speed.devices or run where more devices are visible."
        )
    names = ("data",) if len(shape) == 1 else tuple(f"data{i}" for i in range(len(shape)))
    return Mesh(np.asarray(available[:total], dtype=object).reshape(shape), names)


def check_private_stream(path: str, num_samples: int) -> tuple[int, int]:
    """Checks that ``speed.private_stream`` is a .npy file of (num_samples, D) floats; returns its shape."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"speed.private_stream {path!r} does not exist; give a .npy file of private embeddings "
            "(pejax.streaming.embed_to_memmap writes one)."
        )
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"speed.private_stream {path!r} is not a readable .npy file: {e}") from e
    if (
        not isinstance(arr, np.ndarray)
        or arr.ndim != 2
        or not np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(
            f"speed.private_stream {path!r} must hold a 2-D float array (n, D) of private embeddings, got "
            f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}."
        )
    if arr.shape[0] != num_samples:
        raise ValueError(
            f"speed.private_stream {path!r} has {arr.shape[0]} rows but [data] has {num_samples} private "
            "samples: it needs one embedding per private sample, in the data's order."
        )
    return int(arr.shape[0]), int(arr.shape[1])


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


def _privacy_section(config: dict, data: registry.Dataset) -> dict:
    """The ``[privacy]`` table, with ``user_level`` set when the data carries user ids."""
    section = dict(config.get("privacy") or {})
    if data.group_ids is not None:
        if section.get("user_level", True) is not True:
            raise ValueError(
                "[data] gives user ids (data.group_ids_key / data.group_column) but privacy.user_level is "
                "false; set it to true (or drop the user ids for a sample-level run)."
            )
        section["user_level"] = True
    elif section.get("user_level", False):
        raise ValueError(
            "privacy.user_level = true needs one user id per private sample: set data.group_ids_key "
            "(source 'npz') or data.group_column (source 'text')."
        )
    return section


def _evaluator(ev_section, data, embedding, emb_label, classifier_c):
    """The evaluation callback and the evaluation embedding's label."""
    metrics = ev_section.get("metrics")
    metrics = list(registry.names("metric")) if metrics is None else metrics
    if isinstance(metrics, str) or not isinstance(metrics, list | tuple):
        raise ValueError(f"evaluation.metrics must be a list of metric names, got {metrics!r}.")
    if "embedding" in ev_section or data.modality == "image":
        embed, label = build_embedding(
            ev_section.get("embedding"),
            data.samples.shape,
            data.modality,
            where="[evaluation.embedding]",
        )
    else:
        embed, label = embedding, emb_label
    ectx = registry.EvalContext(
        data.test_samples, data.test_labels, embed, data.modality, classifier_c
    )
    fns = {
        REPORT_NAMES.get(name, name): registry.get("metric", name).builder({}, ectx)
        for name in metrics
    }

    def evaluate(info: IterationInfo) -> dict[str, float]:
        samples = np.asarray(info.images)
        return {name: fn(samples, info.labels) for name, fn in fns.items()}

    return evaluate, label


def _write_outputs(out: pathlib.Path, result, data, class_names, notice) -> list[str]:
    """Writes the released set: synthetic.npz and samples.png, or synthetic.jsonl for text.

    ``notice`` (a not-DP warning) is stored in every output: in the .npz and the PNG as the reporting module
    does, and as a ``notice`` field of every JSONL row.
    """
    if data.modality == "text":
        from pejax.generators.text_codec import decode_texts

        texts = decode_texts(np.asarray(result.images))
        extra = {} if notice is None else {"notice": notice}
        rows = [
            {"text": t, "label": int(y), "class_name": class_names[int(y)], **extra}
            for t, y in zip(texts, np.asarray(result.labels), strict=True)
        ]
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        tmp = out / ".synthetic.jsonl.tmp"
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(out / "synthetic.jsonl")
        return ["synthetic.jsonl"]
    reporting.write_synthetic(out / "synthetic.npz", result.images, result.labels, notice=notice)
    reporting.save_samples_png(out / "samples.png", result.images, result.labels, notice=notice)
    return ["synthetic.npz", "samples.png"]


def _config_parts(config: dict, data: registry.Dataset):
    """Checks every table of ``config`` and builds the configs (nothing heavy is loaded)."""
    cfg.check_sections(config)
    run_section = cfg.check_keys("run", config.get("run"), RUN_KEYS)
    ev_section = cfg.check_keys("evaluation", config.get("evaluation"), EVALUATION_KEYS)
    pe = cfg.pe_from_dict(config.get("pe"))
    privacy = cfg.privacy_from_dict(_privacy_section(config, data))
    speed = cfg.speed_from_dict(config.get("speed"))
    return run_section, ev_section, pe, privacy, speed


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
    cfg.check_sections(config)
    # Check the fixed tables before loading anything (typos fail fast).
    cfg.check_keys("run", config.get("run"), RUN_KEYS)
    cfg.check_keys("evaluation", config.get("evaluation"), EVALUATION_KEYS)
    cfg.pe_from_dict(config.get("pe"))
    cfg.speed_from_dict(config.get("speed"))
    run_section = dict(config.get("run") or {})
    # The evaluation classifier's C (scikit-learn's default 1.0 unless the config fixes it).
    classifier_c = _validate.finite_float(
        "run.classifier_c", run_section.get("classifier_c", 1.0), minimum=0.0, strict=True
    )
    seed = run_section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"run.seed must be an integer, got {seed!r}.")
    out = pathlib.Path(out)
    check_output_folder(out, resume)

    data = load_dataset(config.get("data"))
    run_section, ev_section, pe, privacy, speed = _config_parts(config, data)
    class_names = data.class_names or _numbered(pe.num_classes)
    if data.class_names is not None and len(data.class_names) != pe.num_classes:
        raise ValueError(
            f"[data] has {len(data.class_names)} classes ({list(data.class_names)}) but pe.num_classes is "
            f"{pe.num_classes}."
        )
    gen_comp, _ = registry.split_kind("generator", config.get("generator"), "[generator]")
    if gen_comp.modality is not None and gen_comp.modality != data.modality:
        raise ValueError(
            f"generator kind {gen_comp.name!r} makes {gen_comp.modality}s but data.source "
            f"{(config.get('data') or {}).get('source', 'digits')!r} holds {data.modality}s."
        )
    if speed.private_stream is not None:
        check_private_stream(speed.private_stream, int(data.labels.shape[0]))
    mesh = build_mesh(speed.devices)
    ctx = registry.BuildContext(
        pe.num_classes, class_names, tuple(data.samples.shape), data.modality, out=str(out)
    )
    generator = build_generator(config.get("generator"), pe.num_classes, ctx)
    embedding, emb_label = build_embedding(
        config.get("embedding"), data.samples.shape, data.modality
    )

    if (
        data.modality == "image"
        and data.test_samples is not None
        and tuple(data.test_samples.shape[1:3]) != tuple(data.samples.shape[1:3])
    ):
        test_hw, train_hw = data.test_samples.shape[1:3], data.samples.shape[1:3]
        echo(
            f"note: the test images are {test_hw[0]}x{test_hw[1]} and the training images "
            f"{train_hw[0]}x{train_hw[1]}: for the metrics the test images are resized to the training "
            "images' size."
        )
    callbacks, eval_label = [], None
    if hasattr(generator, "pop_usage"):  # API generators: requests, tokens and cost per iteration
        shown = (
            "requests",
            "retries",
            "failed_attempts",
            "prompt_tokens",
            "completion_tokens",
            "cost",
        )
        callbacks.append(
            lambda info: {f"api_{k}": v for k, v in generator.pop_usage().items() if k in shown}
        )
    if run_section.get("evaluate", True) and data.test_samples is not None:
        evaluate, eval_label = _evaluator(ev_section, data, embedding, emb_label, classifier_c)
        callbacks.append(evaluate)

    def run_and_write() -> dict[str, Any]:
        """The run and its output files (under the output folder's lock)."""
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
            mesh=mesh,
        )
        run_kw: dict[str, Any] = {"resume": resume}
        if data.group_ids is not None:
            run_kw["group_ids"] = data.group_ids
        if speed.private_stream is not None:
            run_kw["private_stream"] = speed.private_stream
        t0 = time.perf_counter()
        result = runner.run(jax.random.key(seed), data.samples, data.labels, **run_kw)
        wall = time.perf_counter() - t0

        notice = None if result.dp_release else NOT_DP_NOTICE
        written = _write_outputs(out, result, data, class_names, notice)
        eps = result.ledger.epsilons()
        unit = "user" if privacy.user_level else "sample"
        report = {
            "pejax_version": __import__("pejax").__version__,
            **({} if result.dp_release else {"WARNING": NOT_DP_NOTICE}),
            "modality": data.modality,
            "privacy": {
                "differentially_private": result.dp_release,
                "target_epsilon": privacy.epsilon,
                "delta": result.ledger.delta,
                "delta_rule": result.delta_rule,
                "neighboring_relation": result.neighboring_relation,
                "mechanism": "discrete Gaussian on integer vote lattices (exact sampler, secret noise key); "
                "see pejax.secure_noise",
                "noise_multiplier": result.noise_multiplier,
                "iterations": pe.iterations,
                "accountant": privacy.accountant,
                "unit_of_privacy": unit,
                "epsilon_spent": eps,
                "releases": [
                    {
                        "iteration": r.iteration,
                        "description": r.description,
                        "mechanism": r.mechanism,
                        "noise_multiplier": r.noise_multiplier,
                        "sensitivity": r.sensitivity,
                        "unit_changes": r.unit_changes,
                        "neighboring_relation": r.neighboring_relation,
                    }
                    for r in result.ledger.releases
                ],
                "not_covered": [
                    "timings (report 'timings' and wall_seconds) depend on the number of private samples",
                    "hyperparameter choices (the demo's defaults were checked by the developers with a few runs on "
                    "this same data set; see BUILD_NOTES.md)",
                    "the evaluation classifier's C (run.classifier_c; the demo's was chosen by cross-validation on "
                    "the digits training split): it changes the reported accuracy, not the synthetic data",
                    "evaluation metrics are computed on the held-out test split, not on the private data",
                ],
            },
            "config": {
                "run": run_section | {"seed": seed},
                "data": config.get("data", {}),
                "generator": config.get("generator", {}),
                "generator_name": generator.name if hasattr(generator, "name") else gen_comp.name,
                "embedding": emb_label,
                "evaluation": {"metrics": ev_section.get("metrics"), "embedding": eval_label},
                "pe": cfg.to_dict(pe),
                "privacy": cfg.to_dict(privacy),
                "speed": cfg.to_dict(speed),
            },
            "class_names": list(class_names),
            "class_sizes": list(result.class_sizes),
            "num_synthetic": int(result.labels.shape[0]),
            "resumed_from": result.resumed_from,
            "wall_seconds": wall,
            "iterations": result.history,
        }
        if hasattr(generator, "usage"):
            report["api_usage"] = generator.usage() | {"endpoints": generator.endpoints}
        final = result.history[-1].get("metrics", {}) if result.history else {}
        report["final_metrics"] = final
        reporting.write_json(out / "report.json", report)
        reporting.save_metrics_png(
            out / "metrics.png", result.history, accountant=privacy.accountant
        )
        eps_str = ", ".join(f"{k} {v:.4g}" for k, v in eps.items())
        what = "texts" if data.modality == "text" else "images"
        echo(
            f"pejax: {report['num_synthetic']} synthetic {what} in {wall:.1f} s; "
            f"noise multiplier {result.noise_multiplier:.4g}, delta {result.ledger.delta:.3g}; "
            f"epsilon spent: {eps_str}."
        )
        if final:
            echo("final metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        echo(f"wrote {out}/{', '.join([*written, 'report.json', 'metrics.png'])}")
        if not math.isfinite(eps[privacy.accountant]):
            echo("warning: noise multiplier 0: this run is NOT differentially private.")
        elif not result.dp_release:
            echo("warning: " + NOT_DP_NOTICE)
        return report

    # One run per output folder: the lock is held until every output file is written, and the folder is
    # checked again under it (another run may have written here since the first check).
    with ckpt.lock_folder(out, what="output folder"):
        check_output_folder(out, resume)
        return run_and_write()
