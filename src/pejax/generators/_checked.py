"""Calls into untrusted generators: output checks, bounded retries with backoff, clear errors."""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax.errors import GeneratorError as GeneratorError
from pejax.errors import GeneratorRetryWarning as GeneratorRetryWarning
from pejax.generators._protocol import MODALITIES


def _leading(samples) -> set[int]:
    leaves = jax.tree_util.tree_leaves(samples)
    return {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}


class CheckedGenerator:
    """Wraps a :class:`pejax.generators.Generator` so that every call is checked and retried.

    Checks after each call: the samples pytree is non-empty with one leading size equal to the number asked
    for. For an image generator (``modality = "image"``, the default when the generator has no ``modality``),
    ``to_images`` gives a float array (N, H, W, C) with C in {1, 3}, finite, in [0, 1] (values within 1e-3 of
    the range are clipped), with the same (H, W, C) on every call. For a text generator (``modality = "text"``)
    the samples themselves are a uint8 array (N, L) of UTF-8 bytes, what text embeddings read. Exceptions raised by the generator are
    retried ``retries`` times with exponential backoff (same key, so a deterministic generator gives the same
    result); ``ValueError``/``TypeError`` (the generator refusing its arguments) and malformed output are not
    retried.
    """

    def __init__(self, generator, *, retries: int = 2, backoff_s: float = 0.5):
        self.name = str(getattr(generator, "name", type(generator).__name__))
        self.modality = getattr(generator, "modality", "image")
        if self.modality not in MODALITIES:
            raise ValueError(
                f"generator {self.name!r} has modality {self.modality!r}; pejax knows {MODALITIES} "
                "(set the generator's modality attribute to one of them)."
            )
        render = "to_images" if self.modality == "image" else "to_texts"
        for method in ("random", "variation", render):
            if not callable(getattr(generator, method, None)):
                raise TypeError(
                    f"generator {type(generator).__name__} has no method {method}(); a pejax "
                    f"{self.modality} generator implements random(key, label, num_samples), "
                    f"variation(key, samples, label, degree) and {render}(samples)."
                )
        self.inner = generator
        self.retries = retries
        self.backoff_s = backoff_s
        self.image_shape: tuple[int, int, int] | None = None
        # JAX generators compile per batch size; the engine then calls them at shared padded sizes.
        self.batch_buckets = bool(getattr(generator, "batch_buckets", False))

    def _call(self, what: str, fn, *args):
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except (ValueError, TypeError) as e:
                # The generator refused its arguments: retrying the same call cannot help.
                raise GeneratorError(
                    f"generator {self.name!r} rejected {what}: {type(e).__name__}: {e}"
                ) from e
            except Exception as e:  # generators are untrusted; we report and re-raise
                if attempt == self.retries:
                    raise GeneratorError(
                        f"generator {self.name!r} failed in {what} after {attempt + 1} attempt(s): "
                        f"{type(e).__name__}: {e}"
                    ) from e
                warnings.warn(
                    f"generator {self.name!r} raised {type(e).__name__} in {what} (attempt {attempt + 1} of "
                    f"{self.retries + 1}); retrying in {wait:g} s.",
                    GeneratorRetryWarning,
                    stacklevel=3,
                )
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_samples(self, what: str, samples, expected: int):
        if not jax.tree_util.tree_leaves(samples):
            raise GeneratorError(f"generator {self.name!r} returned no arrays from {what}.")
        sizes = _leading(samples)
        if sizes != {expected}:
            raise GeneratorError(
                f"generator {self.name!r} returned {sorted(sizes)} samples from {what}, expected {expected} "
                "(every array of the samples must have that leading size)."
            )
        return samples

    def images(self, samples, what: str = "to_images") -> jax.Array:
        """Renders samples through the image generator's ``to_images`` and checks the images."""
        if self.modality != "image":
            raise TypeError(
                f"generator {self.name!r} makes {self.modality} (modality {self.modality!r}); it has no images."
            )
        expected = _leading(samples).pop()
        images = self._call(what, self.inner.to_images, samples)
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[0] != expected or shape[-1] not in (1, 3):
            raise GeneratorError(
                f"generator {self.name!r}: {what} must return images of shape ({expected}, H, W, C) with C "
                f"1 or 3, got shape {shape}."
            )
        host = _validate.on_host(images)
        images = np.asarray(images) if host else jnp.asarray(images)
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise GeneratorError(
                f"generator {self.name!r}: {what} must return float images in [0, 1], got dtype "
                f"{images.dtype}."
            )
        if self.image_shape is None:
            self.image_shape = shape[1:]
        elif shape[1:] != self.image_shape:
            raise GeneratorError(
                f"generator {self.name!r}: {what} returned images of shape {shape[1:]}, earlier calls gave "
                f"{self.image_shape}; a generator must keep one image shape."
            )
        xp = np if host else jnp  # CPU arrays are checked in NumPy: no program compiled per shape
        lo, hi, finite = jax.device_get((xp.min(images), xp.max(images), xp.isfinite(images).all()))
        if not finite:
            raise GeneratorError(f"generator {self.name!r}: {what} returned NaN or Inf pixels.")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise GeneratorError(
                f"generator {self.name!r}: {what} returned pixel values in [{lo:g}, {hi:g}], outside the "
                "documented range [0, 1]."
            )
        if host:
            return _validate.to_device(np.clip(images.astype(np.float32), 0.0, 1.0))
        return jnp.clip(images.astype(jnp.float32), 0.0, 1.0)

    def text_bytes(self, samples) -> jax.Array:
        """A text generator's samples, checked: the (N, L) uint8 UTF-8 bytes that text embeddings read."""
        if self.modality != "text":
            raise TypeError(
                f"generator {self.name!r} makes {self.modality}s (modality {self.modality!r}), not text."
            )
        shape = tuple(np.shape(samples))
        if len(shape) != 2 or np.asarray(samples).dtype != np.uint8:
            raise GeneratorError(
                f"text generator {self.name!r} must make samples as a uint8 array (N, L) of UTF-8 bytes "
                f"(see pejax.generators.text_codec), got {getattr(samples, 'dtype', type(samples))} {shape}."
            )
        return jnp.asarray(samples)

    def texts(self, samples) -> list[str]:
        """A text generator's samples decoded to strings through its ``to_texts`` (N strings)."""
        expected = int(np.shape(self.text_bytes(samples))[0])
        texts = self._call("to_texts", self.inner.to_texts, samples)
        if not isinstance(texts, list) or len(texts) != expected:
            raise GeneratorError(
                f"generator {self.name!r}: to_texts must return a list of {expected} strings, got "
                f"{type(texts).__name__} of length {len(texts) if hasattr(texts, '__len__') else '?'}."
            )
        if not all(isinstance(t, str) for t in texts):
            raise GeneratorError(f"generator {self.name!r}: to_texts returned a non-string.")
        return texts

    def render(self, samples, what: str = "to_images") -> jax.Array:
        """What the embedding sees: checked images (:meth:`images`, through the generator's ``to_images``) for
        an image generator; the checked samples themselves (:meth:`text_bytes`) for a text generator."""
        if self.modality == "image":
            return self.images(samples, what)
        return self.text_bytes(samples)

    def random(self, key, label: int, num_samples: int):
        what = f"random(label={label}, num_samples={num_samples})"
        samples = self._call(what, self.inner.random, key, label, num_samples)
        return self._check_samples(what, samples, num_samples)

    def variation(self, key, samples, label: int, degree: float):
        n = _leading(samples).pop()
        what = f"variation(label={label}, {n} samples, degree={degree:g})"
        out = self._call(what, self.inner.variation, key, samples, label, degree)
        return self._check_samples(what, out, n)
