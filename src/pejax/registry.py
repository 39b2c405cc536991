"""Registries: the names a config file uses, mapped to the builders of generators, embeddings, data and metrics.

Four registries, one per config table that picks a component by name:

* ``generator``: ``[generator] kind = ...`` builds a :class:`pejax.generators.Generator`;
* ``embedding``: ``[embedding] name = ...`` (and ``[evaluation.embedding]``) builds an embedding function;
* ``data``: ``[data] source = ...`` builds a :class:`Dataset` (private data, optional held-out split, user ids);
* ``metric``: ``[evaluation] metrics = [...]`` builds evaluation metrics on the held-out split.

Every other key of the table is an option of the chosen component. Options are declared with their defaults and
a one-line doc, so unknown keys are refused with a did-you-mean hint, missing required ones are named, and
``pejax components`` (and the README's configuration section, generated from :func:`markdown`) lists them all.
Builders import their heavy dependencies (torch, diffusers, transformers, Flax) inside the function body, so
``import pejax`` stays light, and a missing package names the pejax extra to install.

Adding a component is one decorated function in the module of its registry under ``pejax/_components/``
(``generators.py``, ``embeddings.py``, ``data.py``, ``metrics.py``), or in a new module imported at the end of
this one. For example, a new generator kind::

    @register(
        "generator",
        "openai-chat",
        doc="a chat-completions API as an Aug-PE text generator",
        extra="openai",
        modality="text",
        options=(
            Option("model", REQUIRED, "model name the API serves"),
            Option("prompts", None, "one prompt per class; default prompt_template per class name"),
            Option("prompt_template", "A text about {name}:", "prompt of class {name} when prompts is unset"),
        ),
    )
    def _openai_chat(opts: dict, ctx: BuildContext):
        from pejax.generators.openai_chat import OpenAIChatGenerator   # heavy import inside the builder

        return OpenAIChatGenerator(model=opts["model"], prompts=class_prompts(opts, ctx, "generator"))

``opts`` holds every declared option (defaults filled in, unknown keys already refused); ``ctx`` tells the
builder the run's number of classes, class names and data shape. Nothing else changes: the config driver
(:mod:`pejax.run_config`), ``pejax components`` and the README's generated table pick the new kind up, and the
test that compares the README with :func:`markdown` says when the README needs regenerating
(``python -m pejax.registry README.md``; ``pejax components --markdown`` prints the same block).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import numpy as np

from pejax import _validate


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of an option the config must give."""

REGISTRIES = ("generator", "embedding", "data", "metric")
"""Names of the registries, in display order."""

KIND_KEYS = {"generator": "kind", "embedding": "name", "data": "source"}
"""The key of each config table that picks its component."""

DEFAULTS = {"generator": "glyphs", "embedding": "resize", "data": "digits"}
"""The component a table picks when it does not name one."""

MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class Option:
    """One config key of a component: its name, default (:data:`REQUIRED` when it has none) and a one-line doc."""

    name: str
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclasses.dataclass(frozen=True)
class Component:
    """A registered component.

    Attributes:
      registry: ``"generator"``, ``"embedding"``, ``"data"`` or ``"metric"``.
      name: the name configs use.
      doc: one line.
      options: its config keys.
      builder: ``builder(opts, ctx)``; see the module docstring.
      extra: the pejax extra that installs its dependencies (``None``: core).
      modality: ``"image"``, ``"text"`` or ``None`` (both).
    """

    registry: str
    name: str
    doc: str
    options: tuple[Option, ...]
    builder: Callable[..., Any]
    extra: str | None = None
    modality: str | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (what ``pejax components --json`` prints)."""
        return {
            "name": self.name,
            "doc": self.doc,
            "extra": self.extra,
            "modality": self.modality,
            "options": [
                {
                    "name": o.name,
                    "required": o.required,
                    "default": None if o.required else _json_default(o.default),
                    "doc": o.doc,
                }
                for o in self.options
            ],
        }


_REGISTRY: dict[str, dict[str, Component]] = {r: {} for r in REGISTRIES}


def register(
    registry: str,
    name: str,
    *,
    doc: str,
    options: tuple[Option, ...] = (),
    extra: str | None = None,
    modality: str | None = None,
):
    """Decorator: registers ``builder(opts, ctx)`` as component ``name`` of ``registry``.

    Raises:
      ValueError: an unknown registry or modality, a name already taken, or a duplicated option.
    """
    _validate.one_of("registry", registry, REGISTRIES)
    if modality is not None:
        _validate.one_of("modality", modality, MODALITIES)
    if not isinstance(name, str) or not name:
        raise ValueError(f"component name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY[registry]:
        raise ValueError(f"{registry} {name!r} is already registered.")
    names = [o.name for o in options]
    if len(set(names)) != len(names) or KIND_KEYS.get(registry) in names:
        raise ValueError(f"{registry} {name!r}: option names must be distinct, got {names}.")

    def wrap(builder):
        _REGISTRY[registry][name] = Component(
            registry, name, doc, tuple(options), builder, extra, modality
        )
        return builder

    return wrap


def unregister(registry: str, name: str) -> None:
    """Removes component ``name`` from ``registry`` (for plugins and tests); unknown names are refused."""
    get(registry, name)
    del _REGISTRY[registry][name]


def names(registry: str) -> tuple[str, ...]:
    """The registered names of ``registry``, in registration order."""
    _validate.one_of("registry", registry, REGISTRIES)
    return tuple(_REGISTRY[registry])


def get(registry: str, name: Any) -> Component:
    """The component ``name`` of ``registry``; an unknown name is refused with a did-you-mean hint."""
    _validate.one_of("registry", registry, REGISTRIES)
    table = _REGISTRY[registry]
    if not isinstance(name, str) or name not in table:
        key = KIND_KEYS.get(registry, "metrics")
        raise ValueError(
            f"unknown {registry} {name!r}{_validate.did_you_mean(name, table)} ({registry}.{key}); "
            f"registered: {', '.join(table)}. `pejax components` lists them with their keys."
        )
    return table[name]


def options(component: Component, values: dict | None, where: str) -> dict[str, Any]:
    """Checks a table's keys against the component's options and fills in defaults.

    Args:
      component: the chosen component.
      values: the table without its kind key.
      where: how messages name the table, e.g. ``"[generator]"``.

    Raises:
      ValueError: an unknown key (did-you-mean hint) or a missing required one.
    """
    valid = [o.name for o in component.options]
    label = f"config section {where} ({component.registry} {component.name!r})"
    values = _validate.known_keys(label, values, valid)
    missing = [o.name for o in component.options if o.required and o.name not in values]
    if missing:
        docs = "; ".join(f"{o.name}: {o.doc}" for o in component.options if o.name in missing)
        raise ValueError(f"{label} needs {', '.join(missing)} ({docs}).")
    return {o.name: values.get(o.name, o.default) for o in component.options}


def split_kind(registry: str, section: dict | None, where: str) -> tuple[Component, dict[str, Any]]:
    """Picks the component a config table names and returns it with the table's other keys (unchecked)."""
    key = KIND_KEYS[registry]
    if section is not None and not isinstance(section, dict):
        raise ValueError(
            f"config section {where} must be a table of keys, e.g. {key} = {DEFAULTS[registry]!r}, got "
            f"{section!r}."
        )
    section = dict(section or {})
    name = section.pop(key, DEFAULTS[registry])
    return get(registry, name), section


def build(registry: str, section: dict | None, ctx: Any, where: str) -> Any:
    """Builds the component a config table names: kind, checked options (defaults filled), then its builder.

    Errors the builder raises (``ValueError``, ``TypeError``, ``FileNotFoundError``, ``KeyError``) are re-raised
    with the table and the component named in front of the message.
    """
    comp, rest = split_kind(registry, section, where)
    opts = options(comp, rest, where)
    try:
        return comp.builder(opts, ctx)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        prefix = f"{where} ({registry} {comp.name!r}): "
        msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
        if msg.startswith(prefix):
            raise
        try:
            new = type(e)(prefix + msg)
        except Exception:  # an exception class with another constructor: keep it as it is
            raise e from None
        raise new from e


# ------------------------------------------------------------------------------------------------- context


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What builders may know about the run.

    Attributes:
      num_classes: ``pe.num_classes``.
      class_names: one name per class (folder names, text labels, or ``"0"``, ``"1"``, ...).
      data_shape: shape of the private samples: (n, H, W, C) images or (n, L) text bytes.
      modality: ``"image"`` or ``"text"`` (the data's).
      out: the run's output folder (``None`` outside a run), for components that keep files there (the
        ``openai-chat`` response cache).
    """

    num_classes: int
    class_names: tuple[str, ...]
    data_shape: tuple[int, ...]
    modality: str
    out: str | None = None


class Dataset(NamedTuple):
    """What a data source gives the run.

    Attributes:
      samples: private samples: (n, H, W, C) float32 images in [0, 1], or (n, L) uint8 UTF-8 text bytes.
      labels: (n,) int32.
      test_samples: held-out real samples (same form) for evaluation, or ``None``.
      test_labels: their labels, or ``None``.
      group_ids: (n,) int64 user ids for user-level privacy, or ``None``.
      class_names: names of the classes the data knows (``None``: numbered).
      modality: ``"image"`` or ``"text"``.
    """

    samples: np.ndarray
    labels: np.ndarray
    test_samples: np.ndarray | None
    test_labels: np.ndarray | None
    group_ids: np.ndarray | None
    class_names: tuple[str, ...] | None
    modality: str


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def check_path(name: str, value: Any) -> str:
    """``value`` as a path string; anything else is refused naming the config key ``name``."""
    if not isinstance(value, str | pathlib.PurePath) or not str(value):
        raise ValueError(f"{name} must be a path (a string), got {value!r}.")
    return str(value)


def class_prompts(opts: dict[str, Any], ctx: BuildContext, where: str) -> tuple[str, ...]:
    """``opts["prompts"]`` (one per class), or ``opts["prompt_template"]`` filled with each class name."""
    prompts = opts.get("prompts")
    if prompts is None:
        template = opts.get("prompt_template")
        if not isinstance(template, str) or "{name}" not in template:
            raise ValueError(
                f"{where}.prompt_template must be a string with a {{name}} field (the class name), got "
                f"{template!r}; or give {where}.prompts, one per class."
            )
        return tuple(template.format(name=n) for n in ctx.class_names)
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
        raise ValueError(
            f"{where}.prompts must be a list of strings (one per class), got {prompts!r}."
        )
    if len(prompts) != ctx.num_classes:
        raise ValueError(
            f"{where}.prompts has {len(prompts)} entries but pe.num_classes is {ctx.num_classes}: give one "
            "prompt per class."
        )
    return tuple(prompts)


# ------------------------------------------------------------------------------------------- torch

TORCH_OPTIONS = (
    Option(
        "device",
        "auto",
        "torch device: 'cpu', 'cuda', 'cuda:1', or 'auto' (CUDA when torch sees one)",
    ),
    Option(
        "dtype",
        "float32",
        "weights dtype: 'float32', 'float16', 'bfloat16', or 'auto' (float16 on CUDA)",
    ),
    Option("progress", False, "show a progress bar inside each generator call"),
)


def torch_placement(opts: dict[str, Any], extra: str) -> dict[str, Any]:
    """Resolves ``device = "auto"`` (CUDA when torch sees one, else CPU) and ``dtype = "auto"`` (float16 on
    CUDA, else float32) in a copy of ``opts``; other values are left to the adapter's own checks."""
    opts = dict(opts)
    if opts.get("device") == "auto" or opts.get("dtype") == "auto":
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"this component needs torch, which is not installed: pip install 'pejax[{extra}]'."
            ) from e
        cuda = torch.cuda.is_available()
        if opts.get("device") == "auto":
            opts["device"] = "cuda" if cuda else "cpu"
        if opts.get("dtype") == "auto":
            opts["dtype"] = (
                "float16" if str(opts.get("device", "cpu")).startswith("cuda") else "float32"
            )
    return opts


# ------------------------------------------------------------------------------------------ metrics


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What metric builders get: the held-out split, the evaluation embedding and run settings.

    Attributes:
      test_samples: held-out real samples (images, or text bytes).
      test_labels: their labels.
      embed: the evaluation embedding (``[evaluation.embedding]``).
      modality: ``"image"`` or ``"text"``.
      classifier_c: ``run.classifier_c``.
    """

    test_samples: np.ndarray
    test_labels: np.ndarray
    embed: Callable[[Any], Any]
    modality: str
    classifier_c: float


# ----------------------------------------------------------------------------------------------- listing


def _dataclass_keys(cls) -> list[dict[str, Any]]:
    """Keys, defaults and first doc lines of a config dataclass (from its ``Attributes:`` docstring block)."""
    import re

    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    name = None
    if "    Attributes:" in lines:
        for line in lines[lines.index("    Attributes:") + 1 :]:
            stripped = line.strip()
            if line.startswith("      ") and not line.startswith("        ") and ":" in stripped:
                name, _, text = stripped.partition(":")
                docs[name] = text.strip()
            elif line.startswith("        ") and name is not None:
                docs[name] += " " + stripped
            elif stripped:
                name = None
    for key, text in docs.items():
        text = re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "`")
        docs[key] = re.split(r"\. (?=[A-Z`])", text, maxsplit=1)[0].strip().rstrip(".")
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(
            {
                "name": f.name,
                "required": f.default is dataclasses.MISSING,
                "default": None if f.default is dataclasses.MISSING else _json_default(default),
                "doc": docs.get(f.name, ""),
            }
        )
    return out


SECTION_KEYS: dict[str, tuple[tuple[str, Any, str], ...]] = {
    "run": (
        ("seed", 0, "the run's jax.random key seed"),
        ("evaluate", True, "compute [evaluation] metrics when the data has a held-out split"),
        ("out", None, "output folder (or pejax run --out)"),
        ("classifier_c", 1.0, "C of the evaluation logistic regression (the 'accuracy' metric)"),
    ),
    "evaluation": (
        ("metrics", None, "metric names; default every metric"),
        (
            "embedding",
            None,
            "table like [embedding] for the Frechet distance (e.g. name = 'inception' with path: FID); "
            "default [embedding] for text, resize for images",
        ),
    ),
}
"""Keys of the fixed tables that are not config dataclasses."""


def describe() -> dict[str, Any]:
    """Every registered component and every fixed config table, JSON-ready (``pejax components --json``)."""
    from pejax import config as cfg

    doc: dict[str, Any] = {r: [c.describe() for c in _REGISTRY[r].values()] for r in REGISTRIES}
    doc["sections"] = {
        "privacy": _dataclass_keys(cfg.PrivacyConfig),
        "pe": _dataclass_keys(cfg.PEConfig),
        "speed": _dataclass_keys(cfg.SpeedConfig),
        **{
            name: [{"name": k, "required": False, "default": d, "doc": t} for k, d, t in keys]
            for name, keys in SECTION_KEYS.items()
        },
    }
    return doc


def _fmt(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def markdown() -> str:
    """The README's configuration reference, generated from the registries (``pejax components --markdown``)."""
    doc = describe()
    out = []
    titles = {
        "generator": ("[generator]", "kind"),
        "embedding": ("[embedding]", "name"),
        "data": ("[data]", "source"),
        "metric": ("[evaluation] metrics", None),
    }
    for reg in REGISTRIES:
        table, key = titles[reg]
        out.append(f"#### {table}" + (f" `{key} = ...`" if key else ""))
        out.append("")
        for comp in doc[reg]:
            extra = f" (extra `{comp['extra']}`)" if comp["extra"] else ""
            out.append(f"- `{comp['name']}`{extra}: {comp['doc'].rstrip('.')}.")
            for o in comp["options"]:
                default = "required" if o["required"] else f"default `{_fmt(o['default'])}`"
                out.append(f"  - `{o['name']}` ({default}): {o['doc'].rstrip('.')}.")
        out.append("")
    for name, keys in doc["sections"].items():
        out.append(f"#### [{name}]")
        out.append("")
        for o in keys:
            default = "required" if o["required"] else f"default `{_fmt(o['default'])}`"
            out.append(f"- `{o['name']}` ({default}): {o['doc'].rstrip('.')}.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def text() -> str:
    """A plain-text listing for ``pejax components``."""
    doc = describe()
    out = []
    for reg in REGISTRIES:
        key = KIND_KEYS.get(reg, "metrics")
        plural = {"data": "data sources"}.get(reg, reg + "s")
        out.append(f"{plural} ([{'evaluation' if reg == 'metric' else reg}] {key} = ...):")
        for comp in doc[reg]:
            extra = f"  [pip install 'pejax[{comp['extra']}]']" if comp["extra"] else ""
            out.append(f"  {comp['name']}: {comp['doc']}{extra}")
            for o in comp["options"]:
                default = "required" if o["required"] else f"default {_fmt(o['default'])}"
                out.append(f"      {o['name']} ({default}): {o['doc']}")
    for name, keys in doc["sections"].items():
        out.append(f"[{name}]:")
        for o in keys:
            default = "required" if o["required"] else f"default {_fmt(o['default'])}"
            out.append(f"      {o['name']} ({default}): {o['doc']}")
    return "\n".join(out) + "\n"


README_START = "<!-- components:start -->\n"
README_END = "<!-- components:end -->"


def readme_block(readme: str) -> str:
    """The generated configuration reference inside a README's text (between the components markers)."""
    if README_START not in readme or README_END not in readme:
        raise ValueError(f"the README has no {README_START.strip()} ... {README_END} block.")
    return readme[readme.index(README_START) + len(README_START) : readme.index(README_END)]


def update_readme(path: str | pathlib.Path) -> bool:
    """Rewrites the README's generated block from :func:`markdown`; returns whether it changed."""
    path = pathlib.Path(path)
    readme = path.read_text()
    old = readme_block(readme)
    new = markdown()
    if old == new:
        return False
    start = readme.index(README_START) + len(README_START)
    path.write_text(readme[:start] + new + readme[readme.index(README_END) :])
    return True


# The built-in components register themselves on import (after every name above exists).
from pejax._components import data as _data  # noqa: E402, F401
from pejax._components import embeddings as _embeddings  # noqa: E402, F401
from pejax._components import generators as _generators  # noqa: E402, F401
from pejax._components import metrics as _metrics  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover - developer tool: python -m pejax.registry README.md
    import sys

    # Run as a script this file is __main__, a second copy; the components registered in pejax.registry.
    from pejax import registry as _registry

    for arg in sys.argv[1:] or ["README.md"]:
        print(f"{arg}: {'updated' if _registry.update_readme(arg) else 'up to date'}")


__all__ = [
    "DEFAULTS",
    "KIND_KEYS",
    "REGISTRIES",
    "REQUIRED",
    "TORCH_OPTIONS",
    "BuildContext",
    "Component",
    "Dataset",
    "EvalContext",
    "Option",
    "build",
    "check_path",
    "class_prompts",
    "describe",
    "get",
    "markdown",
    "names",
    "options",
    "readme_block",
    "register",
    "split_kind",
    "text",
    "torch_placement",
    "unregister",
    "update_readme",
]
