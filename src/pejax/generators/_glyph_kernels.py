"""The glyph simulator's parameters, prior and jitted kernels (sampling, variation, rendering).

Rendering is one jit-compiled, vmapped resampling of the atlas (:mod:`pejax.generators._glyph_atlas`): an elastic
warp, an inverse affine map, one bilinear lookup of the glyph's signed distance and a soft threshold of that
distance (the formula is in the docstring of :mod:`pejax.generators.glyphs`). The kernels live at module level:
one compilation per shape, shared across simulator instances.

Public names are re-exported by :mod:`pejax.generators.glyphs`; import them from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax._compile import quick_jit
from pejax.generators._glyph_atlas import ATLAS_FIT

# Anti-aliasing: standard deviation of the edge profile in output pixels (a 1-pixel box has 0.29).
_ANTIALIAS_PX = 0.4
# Elastic offsets are Gaussian, truncated at this many standard deviations.
_WARP_TRUNCATION = 3.0
# Scalar (one value per sample) continuous parameters, in GlyphParams order.
_SCALAR_FIELDS = (
    "scale",
    "aspect",
    "rotation",
    "shear",
    "shift_x",
    "shift_y",
    "stroke",
    "blur",
    "ink",
)


class GlyphParams(NamedTuple):
    """Parameters of ``N`` glyph samples: the *samples* of :class:`GlyphSimulator` (a pytree).

    Lengths are fractions of the output image side; the image centre is the origin, x to the right, y down.

    Attributes:
      glyph: (N,) int32, row of the simulator's glyph atlas: picks the font (and the class's text).
      scale: (N,) float32, the glyph's longer side as a fraction of the image side.
      aspect: (N,) float32, log of the width/height stretch (width * exp(aspect/2), height * exp(-aspect/2)).
      rotation: (N,) float32, rotation in radians.
      shear: (N,) float32, horizontal shear (x += shear * y) applied before the rotation: slant.
      shift_x: (N,) float32, horizontal translation.
      shift_y: (N,) float32, vertical translation.
      stroke: (N,) float32, dilation (> 0) or erosion (< 0) of the outline, in fractions of the image side.
      blur: (N,) float32, standard deviation of the Gaussian edge profile, in fractions of the image side.
      ink: (N,) float32 in (0, 1], the value of a fully inked pixel (stroke intensity/contrast).
      warp: (N, g, g, 2) float32, elastic offsets (x, y) on a g x g grid spanning the image (corners on its
        corners; rows go down); interpolated with Catmull-Rom splines to a smooth displacement field.
    """

    glyph: jax.Array
    scale: jax.Array
    aspect: jax.Array
    rotation: jax.Array
    shear: jax.Array
    shift_x: jax.Array
    shift_y: jax.Array
    stroke: jax.Array
    blur: jax.Array
    ink: jax.Array
    warp: jax.Array


def _range(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise TypeError(f"GlyphPrior.{name} must be a pair (low, high) of numbers, got {value!r}.")
    low = _validate.finite_float(f"GlyphPrior.{name}[0]", value[0])
    high = _validate.finite_float(f"GlyphPrior.{name}[1]", value[1])
    if low > high:
        raise ValueError(
            f"GlyphPrior.{name} must satisfy low <= high, got {value!r}. Swap the two values."
        )
    return (low, high)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlyphPrior:
    """The prior of :meth:`GlyphSimulator.random`: uniform ranges and the elastic-warp scale.

    Every scalar parameter of :class:`GlyphParams` is drawn uniformly from its ``(low, high)`` range; the font
    uniformly from the fonts that have the class's text; elastic offsets from a Gaussian of standard deviation
    ``warp`` truncated at 3 standard deviations. The defaults follow general conventions for handwritten
    characters, not any private data set: the character is size-normalised to fill most of the frame and
    roughly centred (as NIST-style preprocessing does), handwriting slants and leans by up to about 15-20
    degrees either way, varies in width by about 40 % and in pen width from hairline to bold.

    Attributes:
      scale: range of the glyph's longer side, as a fraction of the image side.
      aspect: range of the log width/height stretch.
      rotation: range of the rotation, radians (default about +-15 degrees).
      shear: range of the horizontal shear (slant, +-0.35 is about +-19 degrees).
      shift_x: range of the horizontal translation, fraction of the image side.
      shift_y: range of the vertical translation, fraction of the image side.
      stroke: range of the outline dilation (> 0) or erosion (< 0), fraction of the image side.
      blur: range of the edge blur standard deviation, fraction of the image side (>= 0).
      ink: range of the ink level, within (0, 1].
      warp: standard deviation of the elastic grid offsets, fraction of the image side (>= 0).
    """

    scale: tuple[float, float] = (0.65, 0.95)
    aspect: tuple[float, float] = (-0.35, 0.35)
    rotation: tuple[float, float] = (-0.26, 0.26)
    shear: tuple[float, float] = (-0.35, 0.35)
    shift_x: tuple[float, float] = (-0.06, 0.06)
    shift_y: tuple[float, float] = (-0.06, 0.06)
    stroke: tuple[float, float] = (-0.01, 0.05)
    blur: tuple[float, float] = (0.0, 0.03)
    ink: tuple[float, float] = (0.75, 1.0)
    warp: float = 0.03

    def __post_init__(self):
        for name in _SCALAR_FIELDS:
            object.__setattr__(self, name, _range(name, getattr(self, name)))
        if self.scale[0] <= 0:
            raise ValueError(
                f"GlyphPrior.scale must be > 0, got {self.scale!r}. Use e.g. (0.65, 0.95)."
            )
        if self.blur[0] < 0:
            raise ValueError(
                f"GlyphPrior.blur must be >= 0, got {self.blur!r}. Use e.g. (0.0, 0.03)."
            )
        if self.ink[0] <= 0 or self.ink[1] > 1:
            raise ValueError(
                f"GlyphPrior.ink must lie within (0, 1], got {self.ink!r}. Use e.g. (0.75, 1.0)."
            )
        object.__setattr__(
            self, "warp", _validate.finite_float("GlyphPrior.warp", self.warp, minimum=0.0)
        )

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low = np.array([getattr(self, name)[0] for name in _SCALAR_FIELDS], np.float32)
        high = np.array([getattr(self, name)[1] for name in _SCALAR_FIELDS], np.float32)
        return low, high


# ------------------------------------------------------------------------------------------------------------
# Jitted kernels (module level: one compilation per shape, shared across instances).


def _fold(x, low, high):
    """Reflects ``x`` into [low, high]; values already inside are returned bit-for-bit unchanged."""
    width = high - low
    period = jnp.maximum(2 * width, 1e-30)
    y = jnp.mod(x - low, period)
    y = jnp.where(y > width, period - y, y)
    folded = jnp.where(width > 0, low + y, low)
    return jnp.where((x >= low) & (x <= high), x, folded)


def _uniforms(key, shapes):
    """Independent uniform [0, 1) float32 arrays of the given shapes, from ONE threefry draw.

    Each ``jax.random`` call inlines its own threefry program, and XLA:CPU takes about 0.1 s to compile each;
    slicing one draw gives the same distribution for a fraction of the compile time.
    """
    sizes = [math.prod(shape) for shape in shapes]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def _integers(u, first, count):
    """``first + floor(u * count)`` for uniform ``u`` in [0, 1): uniform integers in [first, first + count)."""
    return first + jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)


def _normal(u):
    """Standard normal deviates from uniform ``u`` in [0, 1) by the inverse CDF (as ``jax.random.normal``)."""
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(jnp.maximum(2.0 * u - 1.0, lo))


def _truncated_normal(u, bound):
    """Standard normal deviates truncated to [-bound, bound] by the inverse CDF (as
    ``jax.random.truncated_normal``)."""
    b = math.erf(bound / math.sqrt(2.0))
    lo = np.nextafter(np.float32(-b), np.float32(0.0))
    z = np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(jnp.maximum(b * (2.0 * u - 1.0), lo))
    return jnp.clip(z, -bound, bound)


@quick_jit(static_argnames=("num_samples", "warp_grid"))
def _sample_prior(key, first, count, low, high, warp_std, *, num_samples, warp_grid):
    u_glyph, u_scalar, u_warp = _uniforms(
        key,
        [
            (num_samples,),
            (len(_SCALAR_FIELDS), num_samples),
            (num_samples, warp_grid, warp_grid, 2),
        ],
    )
    glyph = _integers(u_glyph, first, count)
    scalars = low[:, None] + (high - low)[:, None] * u_scalar
    z = _truncated_normal(u_warp, _WARP_TRUNCATION)
    return GlyphParams(glyph, *scalars, warp=warp_std * z)


@quick_jit
def _vary(key, params, first, count, low, high, warp_std, degree):
    num_samples = params.glyph.shape[0]
    scalars = jnp.stack([getattr(params, name).astype(jnp.float32) for name in _SCALAR_FIELDS])
    warp = params.warp.astype(jnp.float32)
    u_switch, u_glyph, u_scalar, u_warp = _uniforms(
        key, [(num_samples,), (num_samples,), scalars.shape, warp.shape]
    )
    switch = u_switch < -jnp.expm1(-degree)
    glyph = jnp.where(switch, _integers(u_glyph, first, count), params.glyph.astype(jnp.int32))
    std = (high - low) / math.sqrt(12.0)
    scalars = _fold(
        scalars + degree * std[:, None] * _normal(u_scalar), low[:, None], high[:, None]
    )
    limit = _WARP_TRUNCATION * warp_std
    warp = _fold(warp + degree * warp_std * _normal(u_warp), -limit, limit)
    return GlyphParams(glyph, *scalars, warp=warp)


def _render_one(sdf_flat, atlas_size, interp, p, image_size):
    """Renders one sample's parameters ``p`` (scalars, warp (g, g, 2)) to an (S, S) float32 image."""
    centres = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) / image_size - 0.5
    qx, qy = centres[None, :], centres[:, None]
    # Elastic warp: a smooth displacement field, interpolated from the coarse grid of offsets.
    dx = interp @ p.warp[..., 0] @ interp.T
    dy = interp @ p.warp[..., 1] @ interp.T
    px = qx + dx - p.shift_x
    py = qy + dy - p.shift_y
    # Inverse of (rotation @ shear @ diag(sx, sy)), mapping the output frame to atlas fractions.
    cos, sin = jnp.cos(p.rotation), jnp.sin(p.rotation)
    rx = cos * px + sin * py
    ry = -sin * px + cos * py
    zoom = p.scale / ATLAS_FIT
    half_aspect = 0.5 * p.aspect
    ax = (rx - p.shear * ry) / (zoom * jnp.exp(half_aspect))
    ay = ry / (zoom * jnp.exp(-half_aspect))
    # Bilinear lookup of the signed distance (edge-clamped: far outside stays outside).
    u = (ax + 0.5) * atlas_size - 0.5
    v = (ay + 0.5) * atlas_size - 0.5
    u0, v0 = jnp.floor(u), jnp.floor(v)
    fu, fv = u - u0, v - v0
    last = atlas_size - 1
    u0i, v0i = u0.astype(jnp.int32), v0.astype(jnp.int32)
    cu0, cu1 = jnp.clip(u0i, 0, last), jnp.clip(u0i + 1, 0, last)
    cv0, cv1 = jnp.clip(v0i, 0, last), jnp.clip(v0i + 1, 0, last)
    base = p.glyph * (atlas_size * atlas_size)
    row0, row1 = base + cv0 * atlas_size, base + cv1 * atlas_size
    top = (1 - fu) * sdf_flat[row0 + cu0] + fu * sdf_flat[row0 + cu1]
    bottom = (1 - fu) * sdf_flat[row1 + cu0] + fu * sdf_flat[row1 + cu1]
    distance = ((1 - fv) * top + fv * bottom) * zoom  # fractions of the output side
    sigma = jnp.sqrt(p.blur**2 + (_ANTIALIAS_PX / image_size) ** 2)
    coverage = 0.5 * jax.lax.erfc((distance - p.stroke) / (sigma * math.sqrt(2.0)))
    return p.ink * coverage


@quick_jit(static_argnames=("image_size",))
def _render(sdf, interp, params, *, image_size):
    atlas_size = sdf.shape[-1]
    sdf_flat = sdf.reshape(-1)
    params = GlyphParams(
        params.glyph.astype(jnp.int32),
        *(getattr(params, n).astype(jnp.float32) for n in GlyphParams._fields[1:]),
    )
    images = jax.vmap(lambda p: _render_one(sdf_flat, atlas_size, interp, p, image_size))(params)
    return images[..., None]
