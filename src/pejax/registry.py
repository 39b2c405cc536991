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

Adding a component is one decorated function. For example, a new generator kind (a module of its own, or this
one)::

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

        return OpenAIChatGenerator(model=opts["model"], prompts=class_prompts(opts, ctx))

``opts`` holds every declared option (defaults filled in, unknown keys already refused); ``ctx`` tells the
builder the run's number of classes, class names and data shape. Nothing else changes: the config driver
(:mod:`pejax.experiment`), ``pejax components`` and the README's generated table pick the new kind up, and the
test that compares the README with :func:`markdown` says when the README needs regenerating
(``pejax components --markdown``).
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
    """

    num_classes: int
    class_names: tuple[str, ...]
    data_shape: tuple[int, ...]
    modality: str


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


def _path(name: str, value: Any) -> str:
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


# -------------------------------------------------------------------------------------------- generators

_TORCH_OPTIONS = (
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


@register(
    "generator",
    "glyphs",
    doc="JAX glyph simulator: fonts and handwritten forms rendered from parameters (the digits demo)",
    extra="demo",
    modality="image",
    options=(
        Option("image_size", 32, "side of the square images it renders"),
        Option("texts", None, "the text drawn for each class; default the class numbers"),
        Option("fonts", None, "font files; default matplotlib's bundled fonts"),
        Option("handwriting", False, "also draw digits in common handwritten forms"),
        Option("prior", None, "table of GlyphPrior fields, e.g. {warp = 0.06}"),
        Option("warp_grid", 4, "side of the elastic-warp grid"),
        Option("atlas_size", 64, "side of each glyph's distance field in the atlas"),
    ),
)
def _glyphs(opts, ctx):
    from pejax.generators.glyphs import GlyphPrior
    from pejax.generators.glyphs import GlyphSimulator

    texts = opts["texts"]
    texts = tuple(str(i) for i in range(ctx.num_classes)) if texts is None else tuple(texts)
    if len(texts) != ctx.num_classes:
        raise ValueError(
            f"generator.texts has {len(texts)} entries but pe.num_classes is {ctx.num_classes}."
        )
    kw = {k: opts[k] for k in ("image_size", "handwriting", "warp_grid", "atlas_size")}
    if opts["fonts"] is not None:
        kw["fonts"] = tuple(opts["fonts"])
    if opts["prior"] is not None:
        fields = tuple(f.name for f in dataclasses.fields(GlyphPrior))
        prior = _validate.known_keys("config section [generator.prior]", opts["prior"], fields)
        kw["prior"] = GlyphPrior(
            **{k: v if isinstance(v, int | float) else tuple(v) for k, v in prior.items()}
        )
    return GlyphSimulator(texts=texts, **kw)


@register(
    "generator",
    "flax-ddpm",
    doc="pejax's JAX diffusion sampler (DDIM/DDPM, SDEdit variation) on a Flax UNet checkpoint",
    extra="flax",
    modality="image",
    options=(
        Option(
            "path",
            REQUIRED,
            "checkpoint folder written by pejax's trainer (experiments/train_flax_ddpm.py)",
        ),
        Option("num_steps", 50, "sampler steps of a full trajectory"),
        Option("sampler", "ddim", "'ddim' (deterministic) or 'ddpm' (ancestral)"),
        Option("clip_denoised", True, "clip the predicted clean image to [-1, 1] at every step"),
        Option("batch_size", 128, "most rows per compiled call (speed only)"),
    ),
)
def _flax_ddpm(opts, ctx):
    try:
        from pejax.generators.diffusion import FlaxDiffusionGenerator
    except ImportError as e:
        raise ImportError(
            f"generator kind 'flax-ddpm' needs Flax, optax and orbax ({e}): pip install 'pejax[flax]'."
        ) from e
    path = _path("generator.path", opts["path"])
    gen = FlaxDiffusionGenerator.from_checkpoint(
        path,
        num_steps=opts["num_steps"],
        sampler=opts["sampler"],
        clip_denoised=opts["clip_denoised"],
        batch_size=opts["batch_size"],
        name=f"flax-ddpm:{pathlib.Path(path).name}",
    )
    if gen.class_conditional and gen.num_classes != ctx.num_classes:
        raise ValueError(
            f"the checkpoint {path!r} is conditioned on {gen.num_classes} classes but pe.num_classes is "
            f"{ctx.num_classes}."
        )
    return gen


@register(
    "generator",
    "diffusers",
    doc="a saved Diffusers DDPM/DDIM pipeline (pixel UNet2DModel, class-conditional or not); SDEdit variation",
    extra="diffusers",
    modality="image",
    options=(
        Option("path", REQUIRED, "folder written by pipeline.save_pretrained() (model_index.json)"),
        Option("num_inference_steps", None, "sampling steps; default 1000 (DDPM) or 50 (DDIM)"),
        Option("eta", 0.0, "DDIM's eta (0: deterministic steps)"),
        Option("batch_size", 16, "images per UNet call (speed only)"),
        *_TORCH_OPTIONS,
    ),
)
def _diffusers(opts, ctx):
    from pejax.generators.hf_diffusers import DiffusersGenerator

    opts = torch_placement(opts, "diffusers")
    gen = DiffusersGenerator.from_pretrained(_path("generator.path", opts.pop("path")), **opts)
    if gen.num_classes is not None and gen.num_classes != ctx.num_classes:
        raise ValueError(
            f"the pipeline's UNet has {gen.num_classes} class embeddings but pe.num_classes is "
            f"{ctx.num_classes}."
        )
    return gen


@register(
    "generator",
    "stable-diffusion",
    doc="a saved Stable Diffusion pipeline: text-to-image RANDOM, image-to-image VARIATION",
    extra="diffusers",
    modality="image",
    options=(
        Option("path", REQUIRED, "folder written by pipeline.save_pretrained() (model_index.json)"),
        Option("prompts", None, "one prompt per class; default prompt_template per class name"),
        Option(
            "prompt_template", "a photo of a {name}", "prompt of class {name} when prompts is unset"
        ),
        Option("negative_prompt", None, "negative prompt for every class"),
        Option("guidance_scale", 7.5, "classifier-free guidance scale"),
        Option("num_inference_steps", 50, "text-to-image steps; img2img runs degree times as many"),
        Option("height", None, "image height (multiple of 8); default the UNet's"),
        Option("width", None, "image width (multiple of 8); default the UNet's"),
        Option("batch_size", 4, "images per pipeline call (speed only)"),
        *_TORCH_OPTIONS,
    ),
)
def _stable_diffusion(opts, ctx):
    from pejax.generators.hf_diffusers import StableDiffusionGenerator

    prompts = class_prompts(opts, ctx, "generator")
    opts = {k: v for k, v in opts.items() if k not in ("prompts", "prompt_template")}
    opts = torch_placement(opts, "diffusers")
    return StableDiffusionGenerator.from_pretrained(
        _path("generator.path", opts.pop("path")), prompts=prompts, **opts
    )


@register(
    "generator",
    "causal-lm",
    doc="a saved transformers causal LM as an Aug-PE text generator (prompted RANDOM, fill-in VARIATION)",
    extra="text",
    modality="text",
    options=(
        Option(
            "path",
            REQUIRED,
            "folder written by model.save_pretrained() and tokenizer.save_pretrained()",
        ),
        Option("prompts", None, "one prompt per class; default prompt_template per class name"),
        Option(
            "prompt_template",
            "A text about {name}:",
            "prompt of class {name} when prompts is unset",
        ),
        Option("max_new_tokens", 64, "tokens written by RANDOM, and the cap of a rewrite"),
        Option("max_bytes", 512, "byte length of a text sample (longer texts are truncated)"),
        Option("temperature", 1.0, "softmax temperature"),
        Option("top_k", 0, "keep the k most likely tokens (0: all)"),
        Option("top_p", 1.0, "nucleus sampling mass (1: off)"),
        Option(
            "variation_mode", "fill", "'fill' (any LM) or 'rewrite' (instruction-following LMs)"
        ),
        Option(
            "rewrite_template",
            None,
            "prompt of 'rewrite' with {prompt}, {mask}, {words}, {masked}; default Aug-PE's",
        ),
        Option("mask_token", "_", "blank shown for a masked word ('rewrite')"),
        Option("word_tokens", 4, "tokens written to fill one blank ('fill')"),
        Option("length_factor", 1.2, "adaptive length of a rewrite, in tokens of the original"),
        Option("length_slack", 4, "extra tokens allowed to a rewrite"),
        Option("batch_size", 16, "texts per generate call (speed only)"),
        *_TORCH_OPTIONS,
    ),
)
def _causal_lm(opts, ctx):
    from pejax.generators.text import CausalLMTextGenerator

    prompts = class_prompts(opts, ctx, "generator")
    opts = {k: v for k, v in opts.items() if k not in ("prompts", "prompt_template")}
    if opts["rewrite_template"] is None:
        del opts["rewrite_template"]
    opts = torch_placement(opts, "text")
    return CausalLMTextGenerator.from_pretrained(
        _path("generator.path", opts.pop("path")), prompts=prompts, **opts
    )


# -------------------------------------------------------------------------------------------- embeddings


def _label(name: str, opts: dict[str, Any]) -> str:
    shown = {k: v for k, v in opts.items() if v is not None}
    return name + ("" if not shown else json.dumps(shown, sort_keys=True, default=list))


@register(
    "embedding",
    "pixels",
    doc="raw pixels, flattened (no options)",
    modality="image",
)
def _pixels(opts, ctx):
    from pejax.embeddings import pixel_embedding

    return pixel_embedding, "pixels"


@register(
    "embedding",
    "resize",
    doc="pixels resized (area average) to the private data's resolution, then flattened",
    modality="image",
    options=(
        Option("size", None, "[height, width]; default the private images' size"),
        Option("channels", None, "1 (grey) or 3 (RGB); default the private images' channels"),
    ),
)
def _resize(opts, ctx):
    from pejax.embeddings import get_embedding

    opts = dict(opts)
    opts["size"] = tuple(ctx.data_shape[1:3] if opts["size"] is None else opts["size"])
    if opts["channels"] is None:
        opts["channels"] = int(ctx.data_shape[3])
    return get_embedding("resize", **opts), _label("resize", opts)


@register(
    "embedding",
    "vision",
    doc="a saved transformers vision model (CLIP, DINOv2, ViT...): its image features",
    extra="diffusers",
    modality="image",
    options=(
        Option(
            "path",
            REQUIRED,
            "folder written by model.save_pretrained() and image_processor.save_pretrained()",
        ),
        Option("batch_size", 64, "images per forward pass (speed only)"),
        Option("device", "auto", "torch device, or 'auto' (CUDA when torch sees one)"),
        Option("dtype", "float32", "weights dtype, or 'auto' (float16 on CUDA)"),
        Option("image_size", None, "input size overriding the processor config"),
        Option("image_mean", None, "per-channel mean overriding the processor config"),
        Option("image_std", None, "per-channel std overriding the processor config"),
    ),
)
def _vision(opts, ctx):
    from pejax.hf_embeddings import TransformersImageEmbedding

    opts = torch_placement(opts, "diffusers")
    path = _path("embedding.path", opts.pop("path"))
    if isinstance(opts["image_size"], list):
        opts["image_size"] = tuple(opts["image_size"])
    fn = TransformersImageEmbedding.from_pretrained(path, **opts)
    return fn, fn.__name__


@register(
    "embedding",
    "sentence",
    doc="a sentence-transformers model (default the bundled all-MiniLM-L6-v2) on text samples",
    extra="text",
    modality="text",
    options=(
        Option(
            "path", None, "sentence-transformers model folder; default the bundled all-MiniLM-L6-v2"
        ),
        Option("batch_size", 64, "texts per forward pass (speed only)"),
        Option("device", "auto", "torch device, or 'auto' (CUDA when torch sees one)"),
        Option("normalize", True, "L2-normalise each embedding"),
    ),
)
def _sentence(opts, ctx):
    from pejax.hf_embeddings import SentenceTransformerEmbedding

    opts = torch_placement(opts, "text")
    path = opts.pop("path")
    fn = SentenceTransformerEmbedding(
        None if path is None else _path("embedding.path", path), **opts
    )
    return fn, fn.__name__


# ------------------------------------------------------------------------------------------------ data


def _group_ids(values: np.ndarray, n: int, where: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(
            f"{where} must hold one user id per private sample ({n},), got shape {values.shape}."
        )
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind in "USO":
        return np.unique(values.astype(str), return_inverse=True)[1].astype(np.int64)
    raise TypeError(f"{where} must hold integer or string user ids, got dtype {values.dtype}.")


@register(
    "data",
    "digits",
    doc="scikit-learn's bundled 8 x 8 digits (1347 private, 450 held out for evaluation)",
    extra="demo",
    modality="image",
)
def _digits(opts, ctx):
    from pejax.data import load_digits_split

    s = load_digits_split()
    names = tuple(str(i) for i in range(10))
    return Dataset(
        s.train_images, s.train_labels, s.test_images, s.test_labels, None, names, "image"
    )


@register(
    "data",
    "npz",
    doc="an .npz archive of images and labels (never unpickled); optional user ids",
    modality="image",
    options=(
        Option("path", REQUIRED, "the private .npz archive"),
        Option("test_path", None, "a held-out .npz for evaluation"),
        Option(
            "images_key",
            "images",
            "name of the images array (N, H, W[, C]), uint8 or float in [0, 1]",
        ),
        Option("labels_key", "labels", "name of the labels array (N,)"),
        Option("group_ids_key", None, "name of a (N,) user-id array: user-level privacy"),
    ),
)
def _npz(opts, ctx):
    from pejax.data import load_npz

    kw = {"images_key": opts["images_key"], "labels_key": opts["labels_key"]}
    path = _path("data.path", opts["path"])
    train = load_npz(path, **kw)
    groups = None
    if opts["group_ids_key"] is not None:
        key = opts["group_ids_key"]
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise KeyError(
                    f"{path!r} has no array {key!r} (data.group_ids_key); arrays present: {sorted(archive.files)}."
                )
            try:
                raw = archive[key]
            except ValueError as e:
                raise ValueError(
                    f"array {key!r} in {path!r} holds Python objects, never unpickled."
                ) from e
        groups = _group_ids(raw, len(train.labels), f"data.group_ids_key array {key!r}")
    test = (
        None
        if opts["test_path"] is None
        else load_npz(_path("data.test_path", opts["test_path"]), **kw)
    )
    return Dataset(
        train.images,
        train.labels,
        None if test is None else test.images,
        None if test is None else test.labels,
        groups,
        None,
        "image",
    )


@register(
    "data",
    "folder",
    doc="a folder with one subfolder of images per class (the class names are the folder names)",
    extra="demo",
    modality="image",
    options=(
        Option("path", REQUIRED, "root folder: path/<class name>/<image file>"),
        Option("test_path", None, "a held-out folder of the same layout for evaluation"),
    ),
)
def _folder(opts, ctx):
    from pejax.data import load_image_folder

    train = load_image_folder(_path("data.path", opts["path"]))
    test = None
    if opts["test_path"] is not None:
        test = load_image_folder(_path("data.test_path", opts["test_path"]))
        if test.class_names != train.class_names:
            raise ValueError(
                f"data.test_path has classes {list(test.class_names)} but data.path has "
                f"{list(train.class_names)}; both need the same class folders."
            )
    return Dataset(
        train.images,
        train.labels,
        None if test is None else test.images,
        None if test is None else test.labels,
        None,
        train.class_names,
        "image",
    )


@register(
    "data",
    "text",
    doc="texts with labels from a JSONL or CSV file; optional user ids",
    modality="text",
    options=(
        Option("path", REQUIRED, "the private .jsonl or .csv file"),
        Option("test_path", None, "a held-out file of the same layout for evaluation"),
        Option("text_column", "text", "the column (JSONL key) holding the text"),
        Option("label_column", "label", "the column holding the class (integers or names)"),
        Option("group_column", None, "a column of user ids: user-level privacy"),
        Option("max_bytes", 2048, "private texts are cut to this many UTF-8 bytes"),
    ),
)
def _text(opts, ctx):
    from pejax.data import load_texts
    from pejax.generators.text_codec import encode_texts

    max_bytes = _validate.positive_int("data.max_bytes", opts["max_bytes"])
    cols = {k: opts[k] for k in ("text_column", "label_column", "group_column")}
    train = load_texts(_path("data.path", opts["path"]), **cols)
    test = None
    if opts["test_path"] is not None:
        test = load_texts(
            _path("data.test_path", opts["test_path"]),
            **cols | {"group_column": None},
            class_names=train.class_names,
        )
    groups = None
    if train.group_ids is not None:
        groups = _group_ids(
            train.group_ids, len(train.labels), f"data.group_column {opts['group_column']!r}"
        )
    return Dataset(
        encode_texts(train.texts, max_bytes),
        train.labels,
        None if test is None else encode_texts(test.texts, max_bytes),
        None if test is None else test.labels,
        groups,
        train.class_names,
        "text",
    )


# --------------------------------------------------------------------------------------------- metrics


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


@register(
    "metric",
    "accuracy",
    doc="accuracy on the held-out split of a logistic regression (C = run.classifier_c) fit on the synthetic set",
    extra="demo",
)
def _accuracy(opts, ectx: EvalContext):
    from pejax.metrics import downstream_accuracy

    if ectx.modality == "image":
        size = tuple(ectx.test_samples.shape[1:3])

        def accuracy(samples, labels):
            return downstream_accuracy(
                samples, labels, ectx.test_samples, ectx.test_labels, size=size, C=ectx.classifier_c
            )

        return accuracy
    test_emb = np.asarray(ectx.embed(ectx.test_samples), np.float64)

    def text_accuracy(samples, labels):
        return embedding_accuracy(
            np.asarray(ectx.embed(samples), np.float64),
            labels,
            test_emb,
            ectx.test_labels,
            ectx.classifier_c,
        )

    return text_accuracy


def embedding_accuracy(train_emb, train_labels, test_emb, test_labels, C: float) -> float:
    """Test accuracy of ``LogisticRegression(C)`` fit on (train_emb, train_labels); one class: a constant guess."""
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    classes = np.unique(train_labels)
    if classes.size == 1:
        return float(np.mean(test_labels == classes[0]))
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise ImportError(
            "the 'accuracy' metric needs scikit-learn, which is not installed: pip install 'pejax[demo]'."
        ) from e

    clf = LogisticRegression(C=C, max_iter=1000).fit(train_emb, train_labels)
    return float(clf.score(test_emb, test_labels))


@register(
    "metric",
    "frechet",
    doc="Frechet distance between the synthetic and held-out sets in the evaluation embedding",
)
def _frechet(opts, ectx: EvalContext):
    from pejax.metrics import frechet_distance

    test_emb = np.asarray(ectx.embed(ectx.test_samples))

    def frechet(samples, labels):
        del labels
        return frechet_distance(np.asarray(ectx.embed(samples)), test_emb)

    return frechet


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
            "table like [embedding] for the Frechet distance; default [embedding] for text, resize for images",
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


if __name__ == "__main__":  # pragma: no cover - developer tool: python -m pejax.registry README.md
    import sys

    for arg in sys.argv[1:] or ["README.md"]:
        print(f"{arg}: {'updated' if update_readme(arg) else 'up to date'}")


__all__ = [
    "DEFAULTS",
    "KIND_KEYS",
    "REGISTRIES",
    "REQUIRED",
    "BuildContext",
    "Component",
    "Dataset",
    "EvalContext",
    "Option",
    "build",
    "class_prompts",
    "describe",
    "embedding_accuracy",
    "get",
    "markdown",
    "names",
    "options",
    "readme_block",
    "register",
    "split_kind",
    "text",
    "unregister",
    "update_readme",
]
