"""Inception-v3 pool3 features, the embedding of FID, from a local weights file (PyTorch).

:class:`InceptionEmbedding` maps images (N, H, W, C) float in [0, 1] to (N, 2048) float32: the global average
pool of Inception-v3's last block, the features FID is computed on. Give it the weights file; nothing is ever
downloaded. Two kinds of file load:

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (TensorFlow's FID Inception ported to PyTorch, 1008
  classes): the features of the standard FID, comparable with published numbers up to the image pipeline.
* a torchvision ``inception_v3`` state dict (1000 classes, auxiliary classifier optional): ImageNet Inception
  features, not the standard FID network; reports should say which (the embedding's ``__name__`` does).

Input handling follows pytorch-fid: grey images are repeated to three channels, every image is resized to
299 x 299 (bilinear, ``align_corners=False``, no antialiasing) and scaled from [0, 1] to [-1, 1]. The network is
pure torch (:mod:`pejax._inception_net`, module names as torchvision's, so published state dicts load as they
are); torchvision is not needed. Forward passes are batched, under ``torch.inference_mode``.

Example (not run here: needs the weights file)::

  embed = InceptionEmbedding("pt_inception-2015-12-05-6726825d.pth")
  fid = pejax.metrics.frechet_distance(embed(synthetic_images), embed(real_images))
"""

from __future__ import annotations

import numbers
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pejax import _torch_bridge as tb
from pejax.embeddings import check_images

FEATURE_DIM = 2048
"""Size of the pool3 features."""

INPUT_SIZE = 299
"""Images are resized to INPUT_SIZE x INPUT_SIZE before the network."""

VARIANTS = ("fid", "torchvision")
"""``"fid"``: pytorch-fid's FID Inception (1008 classes); ``"torchvision"``: torchvision's inception_v3."""

_EXTRA = "inception"
_EXPECTED = (
    "expected the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) or a torchvision "
    "inception_v3 state dict (torch.save(model.state_dict(), path))"
)
_SHOWN = 5  # how many missing / unexpected / mismatched keys an error lists


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def build_inception_v3(variant: str = "fid"):
    """The Inception-v3 feature network with fresh (untrained) weights, as a ``torch.nn.Module``.

    Its ``state_dict()`` has the keys and shapes of the published weights of ``variant``, so it is what tests
    and tools save to make a stand-in weights file; ``module(x)`` maps (N, 3, H, W) float32 in [-1, 1] (already
    resized) to (N, 2048) features.

    Args:
      variant: ``"fid"`` (pytorch-fid's FID Inception, 1008 classes) or ``"torchvision"`` (1000 classes).

    Returns:
      the module, in training mode as torch builds it (call ``.eval()`` before a forward pass).

    Raises:
      ValueError: an unknown variant.
      ImportError: torch is missing (``pip install 'pejax[inception]'``).
    """
    tb.require("torch", _EXTRA)
    from pejax._inception_net import InceptionV3

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    return InceptionV3(variant)


def load_inception_weights(path: str | os.PathLike) -> tuple[dict, str]:
    """Reads an Inception-v3 state dict from ``path`` (never unpickling code) and checks it.

    The file is read with ``torch.load(..., weights_only=True)``. The variant is told by the classifier's size
    (``fc.weight``: 1008 rows for the FID Inception, 1000 for torchvision's); the auxiliary classifier's
    weights (``AuxLogits.*``) are dropped; every other key and shape must be those of
    :func:`build_inception_v3` of that variant, and every value finite.

    Args:
      path: a ``.pth`` / ``.pt`` file holding the state dict.

    Returns:
      (state_dict, variant): the tensors to load (without ``AuxLogits.*``) and ``"fid"`` or ``"torchvision"``.

    Raises:
      FileNotFoundError: ``path`` is not a file.
      ValueError: the file is not a readable state dict, or its keys, shapes or values are not those of an
        Inception-v3 (the message names the file, the first offending keys and what was expected).
    """
    torch = tb.require("torch", _EXTRA)
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {path!r}.")
    p = pathlib.Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Inception weights file {str(p)!r} {what}; {_EXPECTED}. pejax downloads nothing."
        )
    file = str(p)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and tensor errors alike mean: not a state dict file
        raise ValueError(
            f"cannot read {str(p)!r} as a PyTorch state dict ({type(e).__name__}: {e}); {_EXPECTED}."
        ) from e
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{str(p)!r} does not hold a state dict (a mapping of names to tensors), got "
            f"{type(state).__name__}; {_EXPECTED}."
        )
    fc = state.get("fc.weight")
    rows = {1008: "fid", 1000: "torchvision"}
    if fc is None or tuple(fc.shape) not in ((1008, FEATURE_DIM), (1000, FEATURE_DIM)):
        got = "no fc.weight" if fc is None else f"fc.weight of shape {tuple(fc.shape)}"
        raise ValueError(
            f"{str(p)!r} is not an Inception-v3 state dict: it has {got}, where (1008, 2048) (FID Inception) "
            f"or (1000, 2048) (torchvision) was expected; {_EXPECTED}."
        )
    variant = rows[int(fc.shape[0])]
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith("AuxLogits.") and not k.endswith(".num_batches_tracked")
    }
    expected = {
        k: tuple(v.shape)
        for k, v in build_inception_v3(variant).state_dict().items()
        if not k.endswith(".num_batches_tracked")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in wrong]
        problems.append(f"wrong shapes {_listing(shapes)}")
    if problems:
        raise ValueError(
            f"{str(p)!r} does not match the {variant!r} Inception-v3 (told by its fc.weight): "
            f"{'; '.join(problems)}; {_EXPECTED}."
        )
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(
            f"{str(p)!r} holds NaN or Inf values in {_listing(bad)}: the file is corrupt; {_EXPECTED}."
        )
    return state, variant


class InceptionEmbedding:
    """Inception-v3 pool3 features (FID's): images (N, H, W, C) in [0, 1] -> (N, 2048) float32.

    Args:
      path: the weights file (see :func:`load_inception_weights`): pytorch-fid's
        ``pt_inception-2015-12-05-6726825d.pth`` for standard FID features, or a torchvision ``inception_v3``
        state dict.
      batch_size: images per forward pass. Does not change the features (beyond float rounding).
      device: torch device, e.g. ``"cpu"`` or ``"cuda"``.

    Attributes:
      path: the weights file.
      variant: ``"fid"`` or ``"torchvision"`` (told by the file).
      dim: 2048.
      model: the torch module (in eval mode).
      __name__: ``"inception-<variant>:<file name>"`` (the runner's and the report's embedding name).

    Raises:
      FileNotFoundError, ValueError: see :func:`load_inception_weights`; a bad batch size or device.
      ImportError: torch is missing (``pip install 'pejax[inception]'``).
    """

    batch_buckets = (
        False  # a torch model: no compilation per batch size, so the PE engine does not pad
    )

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 50, device: Any = "cpu"):
        torch = tb.require("torch", _EXTRA)
        self.batch_size = _positive("batch_size", batch_size)
        self.device = tb.check_device(torch, device)
        state, variant = load_inception_weights(path)
        model = build_inception_v3(variant)
        result = model.load_state_dict(state, strict=False)
        # Only BatchNorm's step counters may be absent (they are dropped above and unused in eval mode).
        leftover = [k for k in result.missing_keys if not k.endswith(".num_batches_tracked")]
        if (
            leftover or result.unexpected_keys
        ):  # pragma: no cover - load_inception_weights checked the keys
            raise ValueError(f"could not load {str(path)!r}: {result}.")
        self._torch = torch
        self.model = model.to(self.device).eval()
        self.path = pathlib.Path(path)
        self.variant = variant
        self.dim = FEATURE_DIM
        self.__name__ = f"inception-{variant}:{self.path.name}"

    def _preprocess(self, x):
        """(n, H, W, C) float32 tensor in [0, 1] -> (n, 3, 299, 299) in [-1, 1], as pytorch-fid."""
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = self._torch.nn.functional.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
        )
        return 2.0 * x - 1.0

    def __call__(self, images: Any) -> jax.Array:
        """Embeds images.

        Args:
          images: (N, H, W, C) float in [0, 1], C = 1 or 3, finite (the range itself is not checked).

        Returns:
          float32 (N, 2048) JAX array.

        Raises:
          ValueError, TypeError: see :func:`pejax.embeddings.check_images` (shape, dtype, NaN or Inf).
        """
        images = check_images("images", images)
        torch = self._torch
        parts = []
        with tb.deterministic(torch):
            for s, e in tb.batches(images.shape[0], self.batch_size):
                x = tb.to_torch(torch, images[s:e].astype(jnp.float32), self.device, torch.float32)
                parts.append(tb.to_jax(self.model(self._preprocess(x)).float()))
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "VARIANTS",
    "InceptionEmbedding",
    "build_inception_v3",
    "load_inception_weights",
]
