"""Built-in embeddings of :mod:`pejax.registry` (imported by it; heavy imports stay inside each builder)."""

from __future__ import annotations

import json
from typing import Any

from pejax.registry import REQUIRED
from pejax.registry import Option
from pejax.registry import check_path
from pejax.registry import register
from pejax.registry import torch_placement


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
    path = check_path("embedding.path", opts.pop("path"))
    if isinstance(opts["image_size"], list):
        opts["image_size"] = tuple(opts["image_size"])
    fn = TransformersImageEmbedding.from_pretrained(path, **opts)
    return fn, fn.__name__


@register(
    "embedding",
    "inception",
    doc="Inception-v3 pool3 features (2048-d, the features of FID) from a local weights file",
    extra="inception",
    modality="image",
    options=(
        Option(
            "path",
            REQUIRED,
            "weights file: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID) or a torchvision "
            "inception_v3 state dict",
        ),
        Option("batch_size", 50, "images per forward pass (speed only)"),
        Option("device", "auto", "torch device, or 'auto' (CUDA when torch sees one)"),
    ),
)
def _inception(opts, ctx):
    from pejax.inception import InceptionEmbedding

    opts = torch_placement(opts, "inception")
    fn = InceptionEmbedding(check_path("embedding.path", opts.pop("path")), **opts)
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
        None if path is None else check_path("embedding.path", path), **opts
    )
    return fn, fn.__name__
