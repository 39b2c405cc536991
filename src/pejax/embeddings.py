"""Image embeddings: pure functions from images to vectors.

Every embedding maps a batch of images to one row per image::

  images: float, shape (N, H, W, C), values in [0, 1] (0 = black), C = 1 (grey) or 3 (RGB)
  ->  embeddings: float32, shape (N, D)

Normalisation: none beyond the image convention. Embedded values stay in [0, 1] (every output
value is a convex combination of input pixels, so the range cannot grow); there is no
mean-centering, no per-image standardisation and no scaling by the dimension. Squared L2 distances
between embeddings are therefore sums of squared pixel differences at the embedding's resolution.
The [0, 1] range is the caller's contract and is not checked (that would cost a pass over the
data); shape, dtype, channels and finiteness are.

Configs name an embedding with :func:`get_embedding`, which returns a ready-to-call function.

Compare candidates with private samples at the private data's own resolution: a generator that
renders 32 x 32 images for 8 x 8 private digits should be embedded with
``resize_embedding(images, size=(8, 8))`` so that both sides are vectors of 64 pixel averages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from pejax import _validate

Embedding = Callable[[ArrayLike], jax.Array]
"""An embedding function: images (N, H, W, C) float in [0, 1] -> (N, D) float32."""

EMBEDDINGS = ("pixels", "resize")
"""Names accepted by :func:`get_embedding`."""

# ITU-R BT.601 luma weights (the ones Pillow's ``convert("L")`` uses).
_LUMA = (0.299, 0.587, 0.114)


def check_images(name: str, images: Any) -> jax.Array:
    """Validates a batch of images; returns it as a JAX array (dtype unchanged).

    Checks: 4-D (N, H, W, C) with N, H, W >= 1, C in {1, 3}, a floating dtype, and (outside
    ``jit``) only finite values. The [0, 1] value range is not checked.

    Args:
      name: the argument's name, used in error messages.
      images: the array to check.

    Returns:
      ``images`` as a JAX array (a tracer is returned as it is).

    Raises:
      ValueError: wrong number of dimensions, empty axes, channels not 1 or 3, NaN or Inf values.
      TypeError: a non-floating dtype.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        images = np.asarray(images)
    shape = tuple(images.shape)
    if len(shape) != 4:
        hint = " Add a channel axis, e.g. images[..., None]." if len(shape) == 3 else ""
        raise ValueError(f"{name} must be a 4-D array (N, H, W, C), got shape {shape}.{hint}")
    if min(shape[:3]) < 1:
        raise ValueError(f"{name} must hold at least one image of at least 1 x 1, got {shape}.")
    if shape[3] not in (1, 3):
        raise ValueError(
            f"{name} must have 1 (grey) or 3 (RGB) channels in the last axis, got shape {shape}. "
            "Drop an alpha channel with images[..., :3]; if the channels are in axis 1, "
            "transpose with images.transpose(0, 2, 3, 1)."
        )
    dtype = np.dtype(images.dtype)
    if not (np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
        raise TypeError(
            f"{name} must have a floating dtype with values in [0, 1], got {dtype}. For uint8 "
            f"images in 0..255 use {name}.astype(np.float32) / 255."
        )
    if _validate.is_traced(images):
        return images
    on_host = _validate.on_host(images)
    images = _validate.to_device(images)
    # CPU arrays are checked in NumPy (no program compiled per shape), others on their device.
    finite = np.isfinite(np.asarray(images)).all() if on_host else jnp.isfinite(images).all()
    if not bool(finite):
        bad = np.argwhere(~np.isfinite(np.asarray(images, dtype=np.float32)))
        raise ValueError(
            f"{name} contains NaN or Inf ({len(bad)} values, first in image {int(bad[0][0])}). "
            "Images must be finite floats in [0, 1]: check the generator's to_images, or drop "
            "those images."
        )
    return images


def _check_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in size)
    ):
        raise TypeError(
            f"size must be a pair of integers (height, width), got {size!r}; e.g. size=(8, 8)."
        )
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}; e.g. size=(8, 8).")
    return h, w


def _check_channels(channels: Any) -> int | None:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(
            f"channels must be None (keep the input's), 1 (grey) or 3 (RGB), got {channels!r}."
        )
    return None if channels is None else int(channels)


@jax.jit
def _flatten(images: jax.Array) -> jax.Array:
    return images.reshape(images.shape[0], -1).astype(jnp.float32)


def pixel_embedding(images: ArrayLike) -> jax.Array:
    """Flattens raw pixels: the identity embedding.

    Args:
      images: (N, H, W, C) floating array with values in [0, 1], C = 1 or 3.

    Returns:
      (N, H * W * C) float32 array, pixels in row-major (H, W, C) order, values unchanged.

    Raises:
      ValueError: not 4-D, channels not 1 or 3, NaN or Inf values.
      TypeError: a non-floating dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> pixel_embedding(jnp.zeros((5, 8, 8, 1))).shape
      (5, 64)
    """
    images = check_images("images", images)
    return _flatten(images)


def _convert_channels(images: jax.Array, channels: int | None) -> jax.Array:
    c = images.shape[-1]
    if channels is None or channels == c:
        return images
    if channels == 1:  # RGB -> grey (luma)
        luma = jnp.asarray(_LUMA, images.dtype)
        return jnp.tensordot(images, luma, axes=([-1], [0]))[..., None]
    return jnp.repeat(images, 3, axis=-1)  # grey -> RGB


@functools.partial(jax.jit, static_argnames=("size", "channels"))
def _resize(images: jax.Array, size: tuple[int, int], channels: int | None) -> jax.Array:
    images = _convert_channels(images.astype(jnp.float32), channels)
    n, in_h, in_w, c = images.shape
    h, w = size
    if (in_h, in_w) == (h, w):
        out = images
    elif in_h % h == 0 and in_w % w == 0:
        # Integer downscale: exact area (box) average over fh x fw blocks.
        fh, fw = in_h // h, in_w // w
        out = images.reshape(n, h, fh, w, fw, c).mean(axis=(2, 4))
    else:
        # Linear weights are non-negative and sum to 1, so values stay in [0, 1]; antialias widens
        # the kernel when downscaling so that every input pixel contributes.
        out = jax.image.resize(images, (n, h, w, c), method="linear", antialias=True)
    return out.reshape(n, -1)


def resize_embedding(
    images: ArrayLike, *, size: tuple[int, int], channels: int | None = None
) -> jax.Array:
    """Resizes images to ``size`` and flattens them.

    Use this to compare candidates with private data at the private data's native resolution
    (and, with ``channels``, in its colour mode).

    Resampling: when both input sides are integer multiples of the target sides, each output pixel
    is the exact mean of its ``(H // h) x (W // w)`` block (area averaging); an equal size is left
    unchanged; otherwise ``jax.image.resize`` with ``method="linear"`` and ``antialias=True`` (also
    for upscaling). Every output value is a convex combination of input values, so values stay in
    [0, 1]; nothing is centred or rescaled. Jitted; one compilation per input shape, size and
    channels.

    Args:
      images: (N, H, W, C) floating array with values in [0, 1], C = 1 or 3.
      size: target ``(height, width)`` in pixels, both >= 1.
      channels: ``None`` keeps C; ``1`` converts RGB to grey with the ITU-R BT.601 luma weights
        (0.299, 0.587, 0.114) as Pillow's ``convert("L")`` does; ``3`` repeats a grey channel.
        Channels are converted before resizing.

    Returns:
      (N, height * width * C') float32 array in row-major (height, width, C') order, where C' is
      the output channel count.

    Raises:
      ValueError: bad images (see :func:`check_images`), a non-positive size, or channels other
        than None, 1 or 3.
      TypeError: a non-floating dtype, or a size that is not a pair of integers.

    Example:
      >>> import jax.numpy as jnp
      >>> images = jnp.ones((2, 32, 32, 3)) * 0.5
      >>> emb = resize_embedding(images, size=(8, 8), channels=1)
      >>> emb.shape, round(float(emb.max()), 4)
      ((2, 64), 0.5)
    """
    size = _check_size(size)
    channels = _check_channels(channels)
    images = check_images("images", images)
    return _resize(images, size, channels)


def get_embedding(name: str, **kwargs: Any) -> Embedding:
    """Returns the embedding function called ``name``, with its keyword arguments bound.

    Args:
      name: one of :data:`EMBEDDINGS` (exact match): ``"pixels"`` (:func:`pixel_embedding`, no
        keyword arguments) or ``"resize"`` (:func:`resize_embedding`; needs ``size=(h, w)``,
        optional ``channels``).
      **kwargs: keyword arguments of that embedding, checked now rather than at the first call.

    Returns:
      A function ``images (N, H, W, C) -> (N, D) float32``.

    Raises:
      ValueError: an unknown name, or a bad ``size``/``channels`` value.
      TypeError: keyword arguments the embedding does not take, or no ``size`` for ``"resize"``.

    Example:
      >>> import jax.numpy as jnp
      >>> embed = get_embedding("resize", size=(4, 4))
      >>> embed(jnp.zeros((3, 16, 16, 1))).shape
      (3, 16)
    """
    if not isinstance(name, str) or name not in EMBEDDINGS:
        raise ValueError(f"Unknown embedding name {name!r}; choose one of {EMBEDDINGS}.")
    if name == "pixels":
        if kwargs:
            raise TypeError(
                f"embedding 'pixels' takes no keyword arguments, got {sorted(kwargs)}. "
                "Use get_embedding('resize', size=(h, w)) to change the resolution."
            )
        return pixel_embedding
    unknown = sorted(set(kwargs) - {"size", "channels"})
    if unknown:
        raise TypeError(
            f"embedding 'resize' takes keyword arguments size and channels, got {unknown}."
        )
    if "size" not in kwargs:
        raise TypeError(
            "embedding 'resize' needs size=(height, width), "
            "e.g. get_embedding('resize', size=(8, 8))."
        )
    size = _check_size(kwargs["size"])
    channels = _check_channels(kwargs.get("channels"))
    return functools.partial(resize_embedding, size=size, channels=channels)


__all__ = [
    "EMBEDDINGS",
    "Embedding",
    "check_images",
    "get_embedding",
    "pixel_embedding",
    "resize_embedding",
]
