"""A small Flax (nnx) UNet denoiser ``eps = model(x_t, t, y)`` for 16 x 16 or 32 x 32 images.

The architecture follows the DDPM UNet (Ho et al., 2020) at toy scale: a sinusoidal time embedding and an
optional class embedding are added into every residual block; residual blocks (GroupNorm, SiLU, 3 x 3
convolution) at ``len(channel_mults)`` resolutions, halved by strided convolutions on the way down and
restored by nearest-neighbour upsampling on the way up, with skip connections; one self-attention block at
the lowest resolution (optional); a zero-initialised output convolution, so an untrained model predicts
``eps = 0``.

Everything that fixes the parameter shapes lives in :class:`UNetConfig`, a frozen dataclass that round-trips
through JSON (:meth:`UNetConfig.to_dict`, :meth:`UNetConfig.from_dict`): a checkpoint written with
:func:`pejax.generators.diffusion.save_checkpoint` stores it beside the parameters, so
:meth:`pejax.generators.diffusion.FlaxDiffusionGenerator.from_checkpoint` can rebuild the model.

Shapes: ``x_t`` (N, H, W, C) float32 (values in [-1, 1] plus noise), ``t`` (N,) integer or float timesteps in
[0, num_timesteps), ``y`` (N,) int32 class ids or ``None`` for an unconditional model; output (N, H, W, C)
float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pejax import _validate


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Architecture of :class:`UNet` (everything that fixes its parameter shapes).

    Attributes:
      image_size: side S of the square input images; divisible by ``2 ** (len(channel_mults) - 1)``.
      channels: image channels C (1 grey, 3 RGB).
      base_channels: feature channels at full resolution.
      channel_mults: channel multiplier per resolution, from full resolution down (one entry per level).
      num_res_blocks: residual blocks per level on the way down (the way up has one more, as in DDPM).
      num_classes: number of classes of a class-conditional model; ``None`` for an unconditional one.
      groups: GroupNorm groups; must divide every level's channel count.
      attention: add a self-attention block at the lowest resolution.
      time_embedding_dim: width of the time (and class) embedding; ``None`` means ``4 * base_channels``.
    """

    image_size: int = 16
    channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    num_classes: int | None = None
    groups: int = 8
    attention: bool = True
    time_embedding_dim: int | None = None

    def __post_init__(self):
        _validate.positive_int("UNetConfig.image_size", self.image_size, minimum=4)
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(
                f"UNetConfig.channels must be 1 (grey) or 3 (RGB), got {self.channels!r}."
            )
        _validate.positive_int("UNetConfig.base_channels", self.base_channels)
        _validate.positive_int("UNetConfig.num_res_blocks", self.num_res_blocks)
        _validate.positive_int("UNetConfig.groups", self.groups)
        if self.num_classes is not None:
            _validate.positive_int("UNetConfig.num_classes", self.num_classes)
        if self.time_embedding_dim is not None:
            _validate.positive_int("UNetConfig.time_embedding_dim", self.time_embedding_dim)
        mults = tuple(self.channel_mults)
        if not mults:
            raise ValueError("UNetConfig.channel_mults must hold at least one level, got ().")
        for m in mults:
            _validate.positive_int("UNetConfig.channel_mults[i]", m)
        object.__setattr__(self, "channel_mults", mults)
        factor = 2 ** (len(mults) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"UNetConfig.image_size ({self.image_size}) must be divisible by 2 ** (levels - 1) = "
                f"{factor} for channel_mults={mults}; use fewer levels or another image size."
            )
        for m in mults:
            if (self.base_channels * m) % self.groups:
                raise ValueError(
                    f"UNetConfig.groups ({self.groups}) must divide every level's channels "
                    f"(base_channels * mult = {self.base_channels * m}); change groups or base_channels."
                )
        if not isinstance(self.attention, bool):
            raise TypeError(f"UNetConfig.attention must be a bool, got {self.attention!r}.")

    @property
    def embedding_dim(self) -> int:
        """Width of the time/class embedding."""
        return self.time_embedding_dim or 4 * self.base_channels

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); :meth:`from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["channel_mults"] = list(self.channel_mults)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UNetConfig:
        """Builds a config from :meth:`to_dict` output, refusing unknown keys.

        Raises:
          ValueError: unknown keys or invalid values.
        """
        if not isinstance(values, dict):
            raise TypeError(f"UNetConfig.from_dict needs a dict, got {type(values).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"unknown UNetConfig key(s) {unknown}; valid keys: {sorted(fields)}. Was the checkpoint "
                "written by another version of pejax?"
            )
        values = dict(values)
        if "channel_mults" in values:
            values["channel_mults"] = tuple(values["channel_mults"])
        return cls(**values)


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps (as in Transformers and DDPM).

    Args:
      t: (N,) timesteps, integer or float.
      dim: embedding width (even or odd; an odd width gets a zero last column).
      max_period: the longest wavelength.

    Returns:
      (N, dim) float32: ``[cos(t * f_k), sin(t * f_k)]`` with frequencies ``f_k = max_period ** (-k / half)``.

    Example:
      >>> timestep_embedding(jnp.array([0, 10]), 8).shape
      (2, 8)
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv, plus the projected embedding, GroupNorm-SiLU-conv, and a skip connection."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(in_ch, num_groups=groups, rngs=rngs)
        self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), rngs=rngs)
        self.emb = nnx.Linear(emb_dim, out_ch, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_ch, num_groups=groups, rngs=rngs)
        self.conv2 = nnx.Conv(
            out_ch, out_ch, (3, 3), kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )
        self.skip = nnx.Conv(in_ch, out_ch, (1, 1), rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.emb(jax.nn.silu(emb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, ch: int, groups: int, *, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(ch, num_groups=groups, rngs=rngs)
        self.qkv = nnx.Linear(ch, 3 * ch, rngs=rngs)
        self.out = nnx.Linear(ch, ch, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(n, h * w, 3 * c), 3, axis=-1)
        att = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / math.sqrt(c), axis=-1)
        out = jnp.einsum("nqk,nkc->nqc", att, v).reshape(n, h, w, c)
        return x + self.out(out)


class UNet(nnx.Module):
    """A small DDPM-style UNet noise predictor.

    Args:
      config: the architecture.
      rngs: parameter initialisation randomness, e.g. ``nnx.Rngs(0)``.

    Example:
      >>> from flax import nnx
      >>> cfg = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 1), num_classes=3)
      >>> model = UNet(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8, 8, 1)), jnp.array([0, 500]), jnp.array([0, 2])).shape
      (2, 8, 8, 1)
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}.")
        self.config = config
        c, g, e = config.base_channels, config.groups, config.embedding_dim
        self.time1 = nnx.Linear(c, e, rngs=rngs)
        self.time2 = nnx.Linear(e, e, rngs=rngs)
        self.class_embed = (
            nnx.Embed(config.num_classes, e, rngs=rngs) if config.num_classes is not None else None
        )
        self.conv_in = nnx.Conv(config.channels, c, (3, 3), rngs=rngs)
        chans = [c * m for m in config.channel_mults]
        down, skips, ch = [], [c], c
        for level, out_ch in enumerate(chans):
            for _ in range(config.num_res_blocks):
                down.append(ResBlock(ch, out_ch, e, g, rngs=rngs))
                ch = out_ch
                skips.append(ch)
            if level < len(chans) - 1:
                down.append(nnx.Conv(ch, ch, (3, 3), strides=(2, 2), rngs=rngs))
                skips.append(ch)
        self.down = nnx.List(down)
        self.mid1 = ResBlock(ch, ch, e, g, rngs=rngs)
        self.mid_attn = AttentionBlock(ch, g, rngs=rngs) if config.attention else None
        self.mid2 = ResBlock(ch, ch, e, g, rngs=rngs)
        up = []
        for level in reversed(range(len(chans))):
            out_ch = chans[level]
            for _ in range(config.num_res_blocks + 1):
                up.append(ResBlock(ch + skips.pop(), out_ch, e, g, rngs=rngs))
                ch = out_ch
            if level > 0:
                up.append(nnx.Conv(ch, ch, (3, 3), rngs=rngs))
        self.up = nnx.List(up)
        self.norm_out = nnx.GroupNorm(ch, num_groups=g, rngs=rngs)
        self.conv_out = nnx.Conv(
            ch, config.channels, (3, 3), kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """Predicts the noise in ``x``.

        Args:
          x: (N, S, S, C) float noisy images.
          t: (N,) timesteps in [0, num_timesteps) (integer or float).
          y: (N,) int class ids in [0, num_classes) for a class-conditional model, else ``None``.

        Returns:
          (N, S, S, C) float32 predicted noise.

        Raises:
          ValueError: wrong image shape, ``t`` not of shape (N,), or ``y`` given/missing against the config.
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (N, {expected[0]}, {expected[1]}, {expected[2]}) for this UNet, got "
                f"{tuple(x.shape)}."
            )
        if jnp.shape(t) != (x.shape[0],):
            raise ValueError(
                f"t must have shape ({x.shape[0]},) (one timestep per image), got {jnp.shape(t)}."
            )
        if (y is None) != (cfg.num_classes is None):
            raise ValueError(
                "this UNet is "
                + (
                    f"class-conditional ({cfg.num_classes} classes): pass y, (N,) int labels."
                    if cfg.num_classes is not None
                    else "unconditional: pass y=None."
                )
            )
        emb = self.time2(jax.nn.silu(self.time1(timestep_embedding(t, cfg.base_channels))))
        if self.class_embed is not None:
            if jnp.shape(y) != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {jnp.shape(y)}.")
            emb = emb + self.class_embed(jnp.asarray(y, jnp.int32))
        h = self.conv_in(x.astype(jnp.float32))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(jnp.concatenate([h, hs.pop()], axis=-1), emb)
            else:
                n, s1, s2, ch = h.shape
                h = jax.image.resize(h, (n, 2 * s1, 2 * s2, ch), method="nearest")
                h = layer(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) of ``model``."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "AttentionBlock",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "count_params",
    "timestep_embedding",
]
