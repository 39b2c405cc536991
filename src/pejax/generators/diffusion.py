"""A JAX DDPM/DDIM sampler around a Flax (nnx) denoiser, as a pejax generator (RANDOM and VARIATION APIs).

The model is any ``flax.nnx`` module ``eps = model(x_t, t, y)`` trained to predict the noise of the forward
process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al., 2020):

  x_t: (N, H, W, C) float32, the model's value range is [-1, 1] (pejax images in [0, 1] are mapped by 2x - 1)
  t:   (N,) int32 timesteps in [0, num_timesteps)
  y:   (N,) int32 class ids for a class-conditional model, ``None`` for an unconditional one
  eps: (N, H, W, C) float32

Sampling runs on a strided grid of ``num_steps`` timesteps with the generalised DDIM update (Song et al.,
2021)::

  x0  = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)      # predicted clean image
  eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)                   # noise consistent with the clipped x0
  sig = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)
  x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sig^2) eps + sig z          # s: the next (smaller) grid timestep

``sampler="ddim"`` is ``eta = 0`` (deterministic given the starting noise); ``sampler="ddpm"`` is ``eta = 1``,
DDPM ancestral sampling (posterior variance ``beta~``) on the strided grid, exactly DDPM when ``num_steps``
equals ``num_timesteps``. After the last step (``abar_s = 1``) the output is the predicted ``x0``.

VARIATION is SDEdit (Meng et al., 2022): a sample is noised to the timestep ``t0 = round(strength * (T - 1))``
and denoised from there with ``max(1, round(strength * num_steps))`` grid steps, where ``strength`` is the
variation ``degree`` (a fraction of the diffusion trajectory, in [0, 1]) or ``degree_to_strength(degree)``.
``degree = 0`` returns the input unchanged; larger degrees re-noise more and move samples further.

Randomness: sample ``i`` of a call uses only ``fold_in(key, i)`` (its starting noise from ``fold_in(., 0)``,
the noise of grid step ``j`` from ``fold_in(., j + 1)``), so the same key gives the same samples whatever the
batch size. Calls are jit-compiled once per padded batch size and ``num_steps`` (not per degree): a request
of N < ``batch_size`` rows is padded to the next power of two (at least 8), a larger one is cut into batches
of ``batch_size`` rows (the last padded), so varying class sizes do not recompile for every size.

Checkpoints (:func:`save_checkpoint`, :meth:`FlaxDiffusionGenerator.from_checkpoint`) are folders::

  config.json        format, schedule, image shape, class conditioning, the UNet architecture, metadata
  params/            the model state restored with orbax (``StandardCheckpointer``), or
  params.msgpack     the same state serialised with ``flax.serialization`` (msgpack)

This module imports flax and orbax; ``import pejax`` does not import it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pejax import _validate
from pejax.buckets import bucket_size
from pejax.errors import ModelCheckpointError as ModelCheckpointError
from pejax.generators._diffusion_checkpoint import CHECKPOINT_FORMAT as CHECKPOINT_FORMAT
from pejax.generators._diffusion_checkpoint import _image_shape
from pejax.generators._diffusion_checkpoint import load_model as load_model
from pejax.generators._diffusion_checkpoint import save_checkpoint as save_checkpoint
from pejax.generators._diffusion_schedule import _ETA
from pejax.generators._diffusion_schedule import SAMPLERS as SAMPLERS
from pejax.generators._diffusion_schedule import SCHEDULES as SCHEDULES
from pejax.generators._diffusion_schedule import NoiseSchedule as NoiseSchedule
from pejax.generators._diffusion_schedule import ScheduleConfig as ScheduleConfig
from pejax.generators._diffusion_schedule import _sample
from pejax.generators._diffusion_schedule import add_noise as add_noise
from pejax.generators._diffusion_schedule import cosine_schedule as cosine_schedule
from pejax.generators._diffusion_schedule import denoising_loss as denoising_loss
from pejax.generators._diffusion_schedule import linear_schedule as linear_schedule
from pejax.generators._diffusion_schedule import sampling_grid as sampling_grid


class FlaxDiffusionGenerator:
    """Private Evolution generator around a Flax (nnx) noise-prediction model.

    Samples are images: float32 arrays (N, H, W, C) with values in [0, 1] (the model works in [-1, 1]).
    ``random`` samples from pure noise; ``variation`` is SDEdit with ``degree`` in [0, 1] the fraction of the
    diffusion trajectory to re-noise (0 returns the input; see the module docstring).

    The generator keeps a snapshot of the model's state taken at construction (later changes to ``model`` are
    not seen). The model must be in inference mode (e.g. ``model.eval()`` for dropout or batch norm).

    Args:
      model: an ``nnx.Module`` with ``eps = model(x_t, t, y)`` (shapes in the module docstring).
      image_shape: (H, W, C) of the images, C 1 or 3.
      num_steps: sampler steps for a full trajectory (``random``); SDEdit at strength s uses about s times as
        many.
      sampler: ``"ddim"`` (deterministic, eta 0) or ``"ddpm"`` (ancestral, eta 1).
      class_conditional: pass the PE label as ``y``; ``None`` infers it from ``model.config.num_classes``
        (a pejax :class:`~pejax.generators.unet.UNet`), else False. An unconditional model ignores labels
        (PE then picks each class's samples by the private votes).
      num_classes: number of classes of a class-conditional model (labels must lie in [0, num_classes));
        ``None`` reads ``model.config.num_classes``.
      schedule: the noise schedule the model was trained with.
      degree_to_strength: maps a variation degree to the SDEdit strength in [0, 1]; ``None`` is the identity
        (degrees above 1 are refused).
      clip_denoised: clip the predicted clean image to [-1, 1] at every step.
      batch_size: most rows per compiled call (a speed setting: results do not depend on it beyond float
        rounding).
      name: a short name for messages and reports.

    Raises:
      TypeError, ValueError: bad arguments, or a model whose output shape is not the image shape (checked
        with ``jax.eval_shape``, no compilation).

    Example:
      >>> from flax import nnx
      >>> from pejax.generators.unet import UNet, UNetConfig
      >>> net = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1,)), rngs=nnx.Rngs(0))
      >>> gen = FlaxDiffusionGenerator(net, image_shape=(8, 8, 1), num_steps=4)
      >>> x = gen.random(jax.random.key(0), label=0, num_samples=3)
      >>> x.shape, bool(x.min() >= 0), bool(x.max() <= 1)
      ((3, 8, 8, 1), True, True)
      >>> bool((gen.variation(jax.random.key(1), x, label=0, degree=0.0) == x).all())
      True
    """

    modality = "image"
    batch_buckets = True  # compiles per batch size: the PE engine calls it at shared padded sizes

    def __init__(
        self,
        model: nnx.Module,
        *,
        image_shape: tuple[int, int, int],
        num_steps: int,
        sampler: str = "ddim",
        class_conditional: bool | None = None,
        num_classes: int | None = None,
        schedule: ScheduleConfig | None = None,
        degree_to_strength: Callable[[float], float] | None = None,
        clip_denoised: bool = True,
        batch_size: int = 128,
        name: str = "flax-diffusion",
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"model must be a flax.nnx.Module (eps = model(x_t, t, y)), got {type(model).__name__}."
            )
        self.image_shape = _image_shape(image_shape)
        self.num_steps = _validate.positive_int("num_steps", num_steps)
        self.sampler = _validate.one_of("sampler", sampler, SAMPLERS)
        schedule = ScheduleConfig() if schedule is None else schedule
        if not isinstance(schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(schedule).__name__}.")
        self.schedule = schedule
        if self.num_steps > schedule.num_timesteps:
            raise ValueError(
                f"num_steps ({self.num_steps}) must be <= the schedule's num_timesteps "
                f"({schedule.num_timesteps})."
            )
        model_classes = getattr(getattr(model, "config", None), "num_classes", None)
        if class_conditional is None:
            class_conditional = model_classes is not None
        if not isinstance(class_conditional, bool):
            raise TypeError(f"class_conditional must be a bool, got {class_conditional!r}.")
        self.class_conditional = class_conditional
        if num_classes is None:
            num_classes = model_classes
        if class_conditional:
            if num_classes is None:
                raise ValueError(
                    "class_conditional=True needs num_classes (the model's number of classes)."
                )
            num_classes = _validate.positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        if degree_to_strength is not None and not callable(degree_to_strength):
            raise TypeError(
                f"degree_to_strength must be a function degree -> strength in [0, 1], got "
                f"{degree_to_strength!r}."
            )
        self.degree_to_strength = degree_to_strength
        if not isinstance(clip_denoised, bool):
            raise TypeError(f"clip_denoised must be a bool, got {clip_denoised!r}.")
        self.clip_denoised = clip_denoised
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        self.name = str(name)
        self._graphdef, self._state = nnx.split(model)
        self._alphas_cumprod = schedule.build().alphas_cumprod
        self._check_model()

    @property
    def model(self) -> nnx.Module:
        """A module rebuilt from the generator's snapshot of the model state."""
        return nnx.merge(self._graphdef, self._state)

    def _check_model(self) -> None:
        n = 2
        x = jax.ShapeDtypeStruct((n, *self.image_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((n,), jnp.int32)
        y = jax.ShapeDtypeStruct((n,), jnp.int32) if self.class_conditional else None

        def call(state, x, t, y):
            return nnx.merge(self._graphdef, state)(x, t, y)

        try:
            out = jax.eval_shape(call, self._state, x, t, y)
        except Exception as e:
            raise ValueError(
                f"the model cannot be called as eps = model(x_t, t, y) with x_t {(n, *self.image_shape)} "
                f"float32, t ({n},) int32 and y {'(2,) int32' if y is not None else 'None'} "
                f"(class_conditional={self.class_conditional}): {type(e).__name__}: {e}"
            ) from e
        if getattr(out, "shape", None) != (n, *self.image_shape):
            raise ValueError(
                f"the model must return eps of the input's shape {(n, *self.image_shape)}, got "
                f"{getattr(out, 'shape', type(out).__name__)}."
            )

    # -- validation ------------------------------------------------------------------------------------------

    def _check_label(self, label: Any) -> int:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise TypeError(f"label must be an integer class index, got {label!r}.")
        if label < 0 or (self.class_conditional and label >= self.num_classes):
            hi = self.num_classes if self.class_conditional else "inf"
            raise ValueError(f"label must be in [0, {hi}), got {label}.")
        return int(label)

    def _check_images(self, samples: Any) -> jax.Array:
        if not hasattr(samples, "shape") or not hasattr(samples, "dtype"):
            samples = np.asarray(samples)
        shape = tuple(samples.shape)
        if len(shape) != 4 or shape[1:] != self.image_shape or shape[0] < 1:
            raise ValueError(
                f"samples must be images of shape (N, {', '.join(map(str, self.image_shape))}) with N >= 1 "
                f"(as returned by {self.name}.random), got shape {shape}."
            )
        if not jnp.issubdtype(samples.dtype, jnp.floating):
            raise TypeError(f"samples must be float images in [0, 1], got dtype {samples.dtype}.")
        samples = jnp.asarray(samples, jnp.float32)
        lo, hi, finite = jax.device_get(
            (jnp.min(samples), jnp.max(samples), jnp.isfinite(samples).all())
        )
        if not finite:
            raise ValueError("samples contain NaN or Inf; images must be finite floats in [0, 1].")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"samples must lie in [0, 1], got values in [{lo:g}, {hi:g}].")
        return jnp.clip(samples, 0.0, 1.0)

    def strength(self, degree: float) -> float:
        """The SDEdit strength in [0, 1] of a variation ``degree``.

        Raises:
          ValueError, TypeError: a negative or non-finite degree, a degree above 1 without
            ``degree_to_strength``, or a mapping that leaves [0, 1].
        """
        degree = _validate.finite_float("degree", degree, minimum=0.0)
        if self.degree_to_strength is None:
            if degree > 1.0:
                raise ValueError(
                    f"degree must lie in [0, 1] (the fraction of the diffusion trajectory to re-noise), got "
                    f"{degree}. Pass degree_to_strength to map another scale to [0, 1]."
                )
            return degree
        s = self.degree_to_strength(degree)
        s = _validate.finite_float("degree_to_strength(degree)", s, minimum=0.0)
        if s > 1.0:
            raise ValueError(f"degree_to_strength({degree}) must lie in [0, 1], got {s}.")
        return s

    # -- sampling --------------------------------------------------------------------------------------------

    def _run(self, key, x0: jax.Array, label: int, strength: float) -> jax.Array:
        """x0: (N, H, W, C) in [-1, 1] (zeros for random). Returns (N, H, W, C) float32 in [0, 1]."""
        T = self.schedule.num_timesteps
        grid_part = sampling_grid(T, self.num_steps, strength)
        grid = np.zeros(self.num_steps, np.int32)
        grid[self.num_steps - grid_part.shape[0] :] = grid_part
        start = jnp.int32(self.num_steps - grid_part.shape[0])
        abar_start = (
            jnp.float32(0.0) if strength >= 1.0 else self._alphas_cumprod[int(grid_part[0])]
        )
        eta = jnp.float32(_ETA[self.sampler])
        n = x0.shape[0]
        rows = bucket_size(n, minimum=8, maximum=self.batch_size)
        outs = []
        for begin in range(0, n, rows):
            idx = jnp.arange(begin, begin + rows)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
            chunk = x0[begin : begin + rows]
            valid = chunk.shape[0]
            if valid < rows:
                chunk = jnp.pad(chunk, ((0, rows - valid), (0, 0), (0, 0), (0, 0)))
            y = jnp.full((rows,), label, jnp.int32) if self.class_conditional else None
            out = _sample(
                self._graphdef,
                self._state,
                chunk,
                keys,
                y,
                jnp.asarray(grid),
                start,
                abar_start,
                self._alphas_cumprod,
                eta,
                clip=self.clip_denoised,
            )
            outs.append(out[:valid])
        x = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
        return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)

    def random(self, key: jax.Array, label: int, num_samples: int) -> jax.Array:
        """Samples ``num_samples`` images from noise (RANDOM_API), ``num_steps`` sampler steps each.

        Args:
          key: ``jax.random`` key; the same key gives the same images.
          label: class index (passed to a class-conditional model as ``y``; ignored otherwise).
          num_samples: N >= 1.

        Returns:
          (N, H, W, C) float32 images in [0, 1].

        Raises:
          TypeError, ValueError: a missing key, a bad label or num_samples.
        """
        key = _validate.check_key(key)
        label = self._check_label(label)
        num_samples = _validate.positive_int("num_samples", num_samples)
        x0 = jnp.zeros((num_samples, *self.image_shape), jnp.float32)
        return self._run(key, x0, label, 1.0)

    def variation(self, key: jax.Array, samples: jax.Array, label: int, degree: float) -> jax.Array:
        """SDEdit variations (VARIATION_API): re-noise a fraction ``degree`` of the trajectory and denoise.

        Args:
          key: ``jax.random`` key; the same key gives the same variations.
          samples: (N, H, W, C) float images in [0, 1].
          label: class index (the conditioning of a class-conditional model).
          degree: fraction of the diffusion trajectory to re-noise, in [0, 1] (or any scale mapped by
            ``degree_to_strength``). 0 returns ``samples`` unchanged; 1 is a fresh sample.

        Returns:
          (N, H, W, C) float32 images in [0, 1].

        Raises:
          TypeError, ValueError: a missing key, a bad label, degree or samples.
        """
        key = _validate.check_key(key)
        label = self._check_label(label)
        strength = self.strength(degree)
        images = self._check_images(samples)
        if strength == 0.0:
            return images
        return self._run(key, images * 2.0 - 1.0, label, strength)

    def to_images(self, samples: jax.Array) -> jax.Array:
        """Samples are already images: checks them and returns (N, H, W, C) float32 in [0, 1]."""
        return self._check_images(samples)

    # -- checkpoints -----------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        num_steps: int,
        model: nnx.Module | None = None,
        **kwargs: Any,
    ) -> FlaxDiffusionGenerator:
        """Loads a checkpoint written by :func:`save_checkpoint` (orbax or msgpack parameters).

        Args:
          path: the checkpoint folder.
          num_steps: sampler steps (see the class).
          model: a module of the checkpoint's architecture whose state is replaced by the checkpoint's
            (needed for models other than the pejax UNet, whose architecture the checkpoint records).
          **kwargs: other :class:`FlaxDiffusionGenerator` arguments (``sampler``, ``degree_to_strength``,
            ...); ``image_shape``, ``schedule``, ``class_conditional`` and ``num_classes`` default to the
            checkpoint's.

        Returns:
          the generator.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ModelCheckpointError: not a pejax diffusion checkpoint, unreadable or incomplete parameters, or
            parameters whose names, shapes or dtypes do not fit the architecture.
        """
        model, config = load_model(path, model=model)
        kwargs.setdefault("image_shape", tuple(config["image_shape"]))
        kwargs.setdefault("schedule", ScheduleConfig.from_dict(config["schedule"]))
        kwargs.setdefault("class_conditional", bool(config["class_conditional"]))
        if config.get("num_classes") is not None:
            kwargs.setdefault("num_classes", int(config["num_classes"]))
        return cls(model, num_steps=num_steps, **kwargs)


__all__ = [
    "CHECKPOINT_FORMAT",
    "SAMPLERS",
    "SCHEDULES",
    "FlaxDiffusionGenerator",
    "ModelCheckpointError",
    "NoiseSchedule",
    "ScheduleConfig",
    "add_noise",
    "cosine_schedule",
    "denoising_loss",
    "linear_schedule",
    "load_model",
    "sampling_grid",
    "save_checkpoint",
]
