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

import dataclasses
import functools
import json
import math
import numbers
import os
import pathlib
import shutil
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pejax import _validate
from pejax.buckets import bucket_size
from pejax.errors import ModelCheckpointError as ModelCheckpointError

SCHEDULES = ("linear", "cosine")
"""Noise schedule kinds of :class:`ScheduleConfig`."""

SAMPLERS = ("ddim", "ddpm")
"""``"ddim"``: deterministic (eta 0); ``"ddpm"``: ancestral (eta 1)."""

CHECKPOINT_FORMAT = "pejax-flax-diffusion"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
ORBAX_DIR = "params"
MSGPACK_FILE = "params.msgpack"
_ETA = {"ddim": 0.0, "ddpm": 1.0}


# ------------------------------------------------------------------------------------------------------------
# Noise schedules.


class NoiseSchedule(NamedTuple):
    """A discrete forward-noise schedule over ``T`` timesteps (a pytree).

    Attributes:
      betas: (T,) float32, the per-step noise variances ``beta_t`` in (0, 1).
      alphas_cumprod: (T,) float32, ``abar_t = prod_{s <= t} (1 - beta_s)``, strictly decreasing.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array


def _from_betas(betas: np.ndarray) -> NoiseSchedule:
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32),
    )


def linear_schedule(
    num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> NoiseSchedule:
    """The DDPM linear schedule: ``beta_t`` evenly spaced from ``beta_start`` to ``beta_end``.

    The endpoints are used as given (no rescaling by ``1000 / T``); computed in float64, stored as float32.

    Args:
      num_timesteps: T >= 2.
      beta_start: beta_0, in (0, 1).
      beta_end: beta_{T-1}, in [beta_start, 1).

    Returns:
      a :class:`NoiseSchedule`.

    Raises:
      ValueError, TypeError: bad arguments.

    Example:
      >>> s = linear_schedule(1000)
      >>> round(float(s.betas[0]), 6), round(float(s.alphas_cumprod[-1]), 7)
      (0.0001, 4.04e-05)
    """
    num_timesteps = _validate.positive_int("num_timesteps", num_timesteps, minimum=2)
    b0 = _validate.finite_float("beta_start", beta_start, minimum=0.0, strict=True)
    b1 = _validate.finite_float("beta_end", beta_end, minimum=b0)
    if b1 >= 1.0:
        raise ValueError(f"beta_end must be < 1, got {b1}; the DDPM value is 0.02.")
    return _from_betas(np.linspace(b0, b1, num_timesteps, dtype=np.float64))


def cosine_schedule(
    num_timesteps: int, *, offset: float = 0.008, max_beta: float = 0.999
) -> NoiseSchedule:
    """The cosine schedule of Nichol & Dhariwal (2021).

    ``abar(t) = f(t) / f(0)`` with ``f(t) = cos^2(pi/2 (t/T + offset) / (1 + offset))``, as betas
    ``beta_t = min(1 - abar(t + 1) / abar(t), max_beta)`` for ``t = 0..T-1``; computed in float64.

    Args:
      num_timesteps: T >= 2.
      offset: the small offset ``s`` that keeps beta_0 away from 0.
      max_beta: upper clip of the betas, in (0, 1).

    Returns:
      a :class:`NoiseSchedule`.

    Raises:
      ValueError, TypeError: bad arguments.

    Example:
      >>> s = cosine_schedule(1000)
      >>> round(float(s.betas[-1]), 3)
      0.999
    """
    num_timesteps = _validate.positive_int("num_timesteps", num_timesteps, minimum=2)
    offset = _validate.finite_float("offset", offset, minimum=0.0, strict=True)
    max_beta = _validate.finite_float("max_beta", max_beta, minimum=0.0, strict=True)
    if max_beta >= 1.0:
        raise ValueError(f"max_beta must be < 1, got {max_beta}; the usual value is 0.999.")
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return _from_betas(betas)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """A noise schedule by name (what a checkpoint records so sampling uses the training schedule).

    Attributes:
      kind: ``"cosine"`` (:func:`cosine_schedule`) or ``"linear"`` (:func:`linear_schedule`).
      num_timesteps: T, the number of training timesteps.
      beta_start: linear schedule's first beta.
      beta_end: linear schedule's last beta.
      cosine_offset: cosine schedule's offset ``s``.
    """

    kind: str = "cosine"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_offset: float = 0.008

    def __post_init__(self):
        _validate.one_of("schedule.kind", self.kind, SCHEDULES)
        _validate.positive_int("schedule.num_timesteps", self.num_timesteps, minimum=2)
        self.build()  # validates the numbers

    def build(self) -> NoiseSchedule:
        """Returns the :class:`NoiseSchedule`."""
        if self.kind == "linear":
            return linear_schedule(
                self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end
            )
        return cosine_schedule(self.num_timesteps, offset=self.cosine_offset)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScheduleConfig:
        """Reads :meth:`to_dict` output back, refusing unknown keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - fields:
            raise ValueError(
                f"a schedule must be a dict with keys among {sorted(fields)}, got {values!r}."
            )
        return cls(**values)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
      schedule: the noise schedule.
      x0: (N, ...) clean data (in [-1, 1] for images).
      t: (N,) integer timesteps in [0, T).
      noise: standard normal noise of the shape of ``x0``.

    Returns:
      (N, ...) float32 noisy data.
    """
    ab = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    ab = ab.reshape((-1,) + (1,) * (jnp.ndim(x0) - 1))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def denoising_loss(
    model: Callable[..., jax.Array],
    schedule: NoiseSchedule,
    key: jax.Array,
    x0: jax.Array,
    y: jax.Array | None = None,
) -> jax.Array:
    """The DDPM training loss: mean squared error of the predicted noise, t uniform in [0, T).

    Args:
      model: ``eps = model(x_t, t, y)`` (an nnx module or any function).
      schedule: the noise schedule.
      key: ``jax.random`` key for the timesteps and the noise.
      x0: (N, H, W, C) float32 clean images in [-1, 1].
      y: (N,) int32 labels, or ``None`` for an unconditional model.

    Returns:
      scalar float32 loss.
    """
    k_t, k_eps = jax.random.split(key)
    n = x0.shape[0]
    t = jax.random.randint(k_t, (n,), 0, schedule.betas.shape[0], dtype=jnp.int32)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    pred = model(add_noise(schedule, x0, t, eps), t, y)
    return jnp.mean((pred - eps) ** 2)


def sampling_grid(num_timesteps: int, num_steps: int, strength: float = 1.0) -> np.ndarray:
    """The descending timesteps a sampler visits: ``t0 = round(strength * (T - 1))`` down to 0.

    ``max(1, round(strength * num_steps))`` evenly spaced (rounded) timesteps from ``t0`` to 0, at most
    ``t0 + 1`` of them so they stay distinct (a one-step grid is ``[t0]``: one step from ``t0`` straight to
    the predicted clean image). The sampler's step after the grid's last timestep goes to ``abar = 1``.

    Args:
      num_timesteps: T.
      num_steps: grid length for ``strength = 1``.
      strength: fraction of the trajectory, in [0, 1].

    Returns:
      (n,) int32, strictly decreasing, starting at ``t0``, ending at 0 when ``n > 1``.

    Example:
      >>> sampling_grid(1000, 5).tolist()
      [999, 749, 500, 250, 0]
      >>> sampling_grid(1000, 10, 0.3).tolist()
      [300, 150, 0]
    """
    num_timesteps = _validate.positive_int("num_timesteps", num_timesteps, minimum=2)
    num_steps = _validate.positive_int("num_steps", num_steps)
    strength = _validate.finite_float("strength", strength, minimum=0.0)
    if strength > 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}.")
    t0 = round(strength * (num_timesteps - 1))
    n = min(max(1, round(strength * num_steps)), t0 + 1)
    return np.round(np.linspace(t0, 0, n)).astype(np.int32)


# ------------------------------------------------------------------------------------------------------------
# The jitted sampler kernel.


def _per_sample_normal(keys: jax.Array, stream: jax.Array | int, shape) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, jnp.float32))(
        keys
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "clip"))
def _sample(
    graphdef,
    state,
    x0: jax.Array,
    keys: jax.Array,
    y: jax.Array | None,
    grid: jax.Array,
    start: jax.Array,
    abar_start: jax.Array,
    alphas_cumprod: jax.Array,
    eta: jax.Array,
    *,
    clip: bool,
) -> jax.Array:
    """Noises ``x0`` to ``abar_start`` and runs grid steps ``start..S-1`` (a dynamic trip count).

    ``grid`` (S,) int32 holds the timesteps (entries before ``start`` are unused); the step after the last
    one goes to ``abar = 1``. Returns (N, H, W, C) float32 in [-1, 1].
    """
    n = x0.shape[0]
    num_steps = grid.shape[0]
    shape = x0.shape[1:]
    z0 = _per_sample_normal(keys, 0, shape)
    x = jnp.sqrt(abar_start) * x0 + jnp.sqrt(1.0 - abar_start) * z0
    prev = jnp.concatenate([grid[1:], jnp.array([-1], jnp.int32)])

    def step(i, x):
        t, s = grid[i], prev[i]
        ab_t = alphas_cumprod[t]
        ab_s = jnp.where(s >= 0, alphas_cumprod[jnp.maximum(s, 0)], 1.0)
        model = nnx.merge(
            graphdef, state
        )  # per step: a module that mutates state stays in this trace
        eps = model(x, jnp.full((n,), t, jnp.int32), y).astype(jnp.float32)
        x0_hat = (x - jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(ab_t)
        if clip:
            x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
            eps = (x - jnp.sqrt(ab_t) * x0_hat) / jnp.sqrt(1.0 - ab_t)
        sigma = eta * jnp.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        direction = jnp.sqrt(jnp.maximum(1.0 - ab_s - sigma**2, 0.0)) * eps
        z = _per_sample_normal(keys, i - start + 1, shape)  # grid step j = i - start
        return jnp.sqrt(ab_s) * x0_hat + direction + sigma * z

    x = jax.lax.fori_loop(start, num_steps, step, x)
    return jnp.clip(x, -1.0, 1.0)


# ------------------------------------------------------------------------------------------------------------
# The generator.


def _image_shape(value: Any) -> tuple[int, int, int]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
        or min(value) < 1
        or value[2] not in (1, 3)
    ):
        raise ValueError(
            f"image_shape must be (H, W, C) positive integers with C 1 (grey) or 3 (RGB), got {value!r}; "
            "e.g. image_shape=(16, 16, 1)."
        )
    return tuple(int(v) for v in value)


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


# ------------------------------------------------------------------------------------------------------------
# Checkpoints.

_SAVED = nnx.Not(nnx.RngState)  # everything but RNG streams (parameters, batch statistics, ...)


def _flat(tree) -> dict[str, Any]:
    """{'a/b/0': leaf} with every key as a string (orbax and msgpack turn int keys into strings)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for p in path:
            k = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
            parts.append(str(k))
        out["/".join(parts)] = leaf
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    image_shape: tuple[int, int, int],
    schedule: ScheduleConfig,
    class_conditional: bool | None = None,
    num_classes: int | None = None,
    params_format: str = "orbax",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a model checkpoint folder (config JSON beside orbax or msgpack parameters).

    The folder is assembled under a temporary name and renamed into place, so ``path`` never holds a
    half-written checkpoint. The architecture is recorded when ``model`` is a pejax
    :class:`~pejax.generators.unet.UNet`; other models must be passed to ``from_checkpoint(model=...)``.

    Args:
      path: the folder to create.
      model: the nnx module (its state except RNG streams is saved).
      image_shape: (H, W, C) of the images.
      schedule: the training noise schedule.
      class_conditional: whether the model takes labels; ``None`` infers it as the generator does.
      num_classes: number of classes of a class-conditional model (``None``: ``model.config.num_classes``).
      params_format: ``"orbax"`` (``params/``, orbax ``StandardCheckpointer``) or ``"msgpack"``
        (``params.msgpack``, ``flax.serialization``).
      metadata: JSON-serialisable facts to record (training steps, data source, ...).
      overwrite: replace an existing folder at ``path``.

    Returns:
      the checkpoint path.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError, TypeError: bad arguments.
    """
    from pejax.generators.unet import UNet

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}.")
    _validate.one_of("params_format", params_format, ("orbax", "msgpack"))
    if not isinstance(schedule, ScheduleConfig):
        raise TypeError(f"schedule must be a ScheduleConfig, got {type(schedule).__name__}.")
    image_shape = _image_shape(image_shape)
    model_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if class_conditional is None:
        class_conditional = model_classes is not None
    if num_classes is None:
        num_classes = model_classes
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint folder {str(path)!r} already exists; choose a new path or pass overwrite=True."
        )
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "params": params_format,
        "image_shape": list(image_shape),
        "schedule": schedule.to_dict(),
        "class_conditional": bool(class_conditional),
        "num_classes": None if num_classes is None else int(num_classes),
        "model": "unet" if isinstance(model, UNet) else type(model).__name__,
        "unet": model.config.to_dict() if isinstance(model, UNet) else None,
        "metadata": metadata or {},
    }
    text = json.dumps(doc, indent=2, sort_keys=True)  # fails early on non-JSON metadata
    state = nnx.to_pure_dict(nnx.state(model, _SAVED))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if params_format == "orbax":
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / ORBAX_DIR, state)
                ckptr.wait_until_finished()
        else:
            from flax import serialization

            (tmp / MSGPACK_FILE).write_bytes(serialization.msgpack_serialize(_host(state)))
        (tmp / CONFIG_FILE).write_text(text)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _host(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"model checkpoint {str(path)!r} does not exist; pass the folder written by "
            "pejax.generators.diffusion.save_checkpoint (it holds config.json and params/)."
        )
    if not path.is_dir():
        raise ModelCheckpointError(
            f"model checkpoint {str(path)!r} is a file; a checkpoint is a folder with {CONFIG_FILE}."
        )
    cfg_path = path / CONFIG_FILE
    try:
        doc = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ModelCheckpointError(
            f"{str(path)!r} is not a pejax diffusion checkpoint: it has no {CONFIG_FILE}."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelCheckpointError(f"{str(cfg_path)!r} is not valid JSON ({e}).") from e
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ModelCheckpointError(
            f"{str(cfg_path)!r} does not describe a {CHECKPOINT_FORMAT!r} checkpoint."
        )
    if doc.get("version") != CHECKPOINT_VERSION:
        raise ModelCheckpointError(
            f"{str(cfg_path)!r} has version {doc.get('version')!r}; this pejax reads version "
            f"{CHECKPOINT_VERSION}."
        )
    missing = [
        k for k in ("params", "image_shape", "schedule", "class_conditional") if k not in doc
    ]
    if missing:
        raise ModelCheckpointError(f"{str(cfg_path)!r} lacks the entries {missing}.")
    return doc


def _read_params(path: pathlib.Path, doc: dict[str, Any]):
    fmt = doc["params"]
    try:
        if fmt == "orbax":
            target = path / ORBAX_DIR
            if not target.is_dir():
                raise ModelCheckpointError(
                    f"model checkpoint {str(path)!r} is incomplete: {ORBAX_DIR}/ is missing."
                )
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(target)
        if fmt == "msgpack":
            from flax import serialization

            target = path / MSGPACK_FILE
            if not target.is_file():
                raise ModelCheckpointError(
                    f"model checkpoint {str(path)!r} is incomplete: {MSGPACK_FILE} is missing."
                )
            return serialization.msgpack_restore(target.read_bytes())
    except ModelCheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore/msgpack raise many types for damaged files
        raise ModelCheckpointError(
            f"the parameters of model checkpoint {str(path)!r} are unreadable or damaged "
            f"({type(e).__name__}: {str(e)[:300]})."
        ) from e
    raise ModelCheckpointError(
        f"{str(path / CONFIG_FILE)!r} names an unknown parameter format {fmt!r}."
    )


def load_model(
    path: str | os.PathLike, *, model: nnx.Module | None = None
) -> tuple[nnx.Module, dict[str, Any]]:
    """Restores the model of a checkpoint folder; returns ``(model, config dict)``.

    Args:
      path: the checkpoint folder.
      model: a module of the checkpoint's architecture (its state is not modified: a new module is returned);
        ``None`` rebuilds the recorded pejax UNet.

    Returns:
      the restored module and the checkpoint's ``config.json`` contents.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ModelCheckpointError: see :meth:`FlaxDiffusionGenerator.from_checkpoint`.
    """
    from pejax.generators.unet import UNet
    from pejax.generators.unet import UNetConfig

    path = pathlib.Path(path).absolute()
    doc = _read_config(path)
    if model is None:
        if doc.get("unet") is None:
            raise ValueError(
                f"checkpoint {str(path)!r} holds a {doc.get('model')!r} model, not a pejax UNet: pass "
                "model=<a module of that architecture> to restore its parameters into."
            )
        try:
            unet_config = UNetConfig.from_dict(doc["unet"])
        except (TypeError, ValueError) as e:
            raise ModelCheckpointError(
                f"{str(path / CONFIG_FILE)!r} has an invalid UNet architecture: {e}"
            ) from e
        model = nnx.eval_shape(lambda: UNet(unet_config, rngs=nnx.Rngs(0)))
    elif not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module or None, got {type(model).__name__}.")
    graphdef, saved, rest = nnx.split(model, _SAVED, ...)
    target = nnx.to_pure_dict(saved)
    loaded = _flat(_read_params(path, doc))
    expected = _flat(target)
    problems = []
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in sorted(set(expected) & set(loaded)):
        want, got = expected[k], loaded[k]
        if tuple(np.shape(got)) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{k}: checkpoint {np.dtype(got.dtype)}{list(np.shape(got))}, model "
                f"{np.dtype(want.dtype)}{list(want.shape)}"
            )
    if problems:
        raise ModelCheckpointError(
            f"the parameters in {str(path)!r} do not fit the model's architecture: "
            + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else "")
            + ". Was it written for another architecture, or is it damaged?"
        )
    keys = list(expected)  # in the flattening order of ``target``
    restored = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(target),
        [jnp.asarray(np.asarray(loaded[k])) for k in keys],  # uncommitted, as freshly built
    )
    nnx.replace_by_pure_dict(saved, restored)
    return nnx.merge(graphdef, saved, rest), doc


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
