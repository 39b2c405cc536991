"""Noise schedules and the jitted DDPM/DDIM sampler kernel of :mod:`pejax.generators.diffusion`.

The forward process is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al., 2020); the sampler runs the
generalised DDIM update (Song et al., 2021) on a strided grid of timesteps (formulas in the docstring of
:mod:`pejax.generators.diffusion`). Public names are re-exported there; import them from there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pejax import _validate

SCHEDULES = ("linear", "cosine")
"""Noise schedule kinds of :class:`ScheduleConfig`."""

SAMPLERS = ("ddim", "ddpm")
"""``"ddim"``: deterministic (eta 0); ``"ddpm"``: ancestral (eta 1)."""

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
