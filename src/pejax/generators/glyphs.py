"""A glyph simulator: characters from TrueType fonts, moved by random pen-like transforms (Sim-PE).

Each (font, text) glyph is rendered ONCE with Pillow into an atlas of signed distance fields; samples are the
simulator's *parameters* (:class:`GlyphParams`), so a variation moves parameters rather than pixels. Rendering
(:meth:`GlyphSimulator.to_images`) is one jit-compiled, vmapped resampling of the atlas: an elastic warp (a
smooth displacement field interpolated from a coarse grid of offsets), then an inverse affine map (translation,
rotation, shear, scale and aspect), one bilinear lookup of the glyph's signed distance, and a soft threshold of
that distance that sets stroke width, edge blur, anti-aliasing and ink level at once::

    ink(q) = ink * Phi(-(d(q) - stroke) / sqrt(blur**2 + (0.4 / image_size)**2))

where ``d(q)`` is the distance (in fractions of the image side) from output point ``q`` to the glyph outline,
negative inside, and ``Phi`` is the standard normal CDF: the edge profile of a straight edge blurred by a Gaussian
of standard deviation ``blur``. ``stroke > 0`` dilates the glyph, ``stroke < 0`` erodes it, continuously.

Images are white glyphs (up to 1.0) on a black background (0.0), like scikit-learn's digits (ink is high).

Glyph selection. A (font, text) pair is used only when, for every character of the text, the font's cmap has
the character and the mapped glyph's PostScript name decodes (Adobe Glyph List, ``fontTools.agl``) to the same
character up to NFKC normalisation, and the render is not empty. The name check drops TeX- and symbol-encoded
fonts that map ASCII code points to other symbols (matplotlib's ``cmsy10``, ``cmex10``; ``cmmi10``'s old-style
digits) and last-resort fonts whose glyphs are placeholder boxes; fonts without glyph names (post table format 3)
are trusted by their cmap. Identical renders within a class (a font that shares another's outlines) are kept once.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import numbers
import os
import unicodedata
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from pejax import _validate
from pejax.buckets import bucket_size

# Fraction of the atlas side taken by a glyph's longer side; the rest is margin for dilation.
_FIT = 0.75
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
# The atlas: rendered once with Pillow, as signed distance fields.


def default_fonts() -> tuple[str, ...]:
    """Returns the paths of the TrueType fonts that ship with matplotlib, sorted by name.

    Raises:
      ImportError: if matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "GlyphSimulator's default fonts come with matplotlib, which is not installed. Install the demo "
            "extra (pip install 'pejax[demo]') or pass fonts=[paths to .ttf files]."
        ) from err
    return tuple(
        sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
    )


def _font_supports(path: str, texts: tuple[str, ...]) -> list[bool]:
    """For each text, whether the font at ``path`` has a genuine glyph for all its characters."""
    from fontTools import agl
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, lazy=True, fontNumber=0)
        cmap = font.getBestCmap() or {}
        trust_cmap = "post" in font and font["post"].formatType == 3.0 and "CFF " not in font
    except Exception as err:
        raise ValueError(
            f"fonts contains {path!r}, which fontTools cannot read as a TrueType/OpenType font ({err}). "
            "Pass paths of .ttf or .otf files."
        ) from err

    def genuine(char: str) -> bool:
        name = cmap.get(ord(char))
        if name is None:
            return False
        if trust_cmap:
            return True
        decoded = agl.toUnicode(name)
        return unicodedata.normalize("NFKC", decoded) == unicodedata.normalize("NFKC", char)

    return [all(genuine(char) for char in text) for text in texts]


def _render_glyph(font, text: str, high_res: int) -> np.ndarray | None:
    """Renders ``text`` centred by its ink box, longer side ``_FIT * high_res``; bool (high_res, high_res)."""
    from PIL import Image
    from PIL import ImageDraw

    left, top, right, bottom = font.getbbox(text)
    pad = 8
    width, height = max(right - left, 1) + 2 * pad, max(bottom - top, 1) + 2 * pad
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    return _fit(canvas, high_res)


def _fit(canvas, high_res: int) -> np.ndarray | None:
    """Crops a Pillow "L" image to its ink, centres it with longer side ``_FIT * high_res``; bool mask."""
    from PIL import Image

    box = canvas.getbbox()
    if box is None:
        return None
    crop = canvas.crop(box)
    zoom = _FIT * high_res / max(crop.size)
    size = (max(1, round(crop.size[0] * zoom)), max(1, round(crop.size[1] * zoom)))
    crop = crop.resize(size, Image.Resampling.LANCZOS)
    fitted = Image.new("L", (high_res, high_res), 0)
    fitted.paste(crop, ((high_res - size[0]) // 2, (high_res - size[1]) // 2))
    inside = np.asarray(fitted) >= 128
    return inside if inside.any() else None


def _signed_distance(inside: np.ndarray, atlas_size: int) -> np.ndarray:
    """Signed distance to the outline (< 0 inside) in fractions of the side, pooled to (atlas_size,) * 2."""
    outside_dist = ndimage.distance_transform_edt(~inside)
    inside_dist = ndimage.distance_transform_edt(inside)
    sdf = np.where(inside, 0.5 - inside_dist, outside_dist - 0.5)
    factor = inside.shape[0] // atlas_size
    sdf = sdf.reshape(atlas_size, factor, atlas_size, factor).mean(axis=(1, 3))
    return (sdf / inside.shape[0]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _build_atlas(
    texts: tuple[str, ...], fonts: tuple[str, ...], atlas_size: int, handwriting: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Returns (sdf (G, R, R) float32, labels (G,) int32, font path per glyph), glyphs grouped by class.

    With ``handwriting``, single-digit texts also get the pen-drawn forms of
    :mod:`pejax.generators.handwriting` (their "font" is ``"handwriting:<digit>:<form>"``).
    """
    try:
        from PIL import ImageFont
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "GlyphSimulator renders its glyph atlas with Pillow, which is not installed. Install the demo "
            "extra: pip install 'pejax[demo]'."
        ) from err

    high_res = 4 * atlas_size
    supports = {path: _font_supports(path, texts) for path in fonts}
    sdfs, labels, glyph_fonts = [], [], []
    for label, text in enumerate(texts):
        seen = set()
        for path in fonts:
            if not supports[path][label]:
                continue
            font = ImageFont.truetype(path, size=round(1.4 * high_res), index=0)
            inside = _render_glyph(font, text, high_res)
            if inside is None:
                continue
            digest = inside.tobytes()
            if digest in seen:
                continue
            seen.add(digest)
            sdfs.append(_signed_distance(inside, atlas_size))
            labels.append(label)
            glyph_fonts.append(path)
        if handwriting:
            from PIL import Image

            from pejax.generators.handwriting import draw_forms

            for form, mask in enumerate(draw_forms(text, high_res)):
                inside = _fit(Image.fromarray(mask.astype(np.uint8) * 255), high_res)
                if inside is None:
                    continue
                seen.add(inside.tobytes())
                sdfs.append(_signed_distance(inside, atlas_size))
                labels.append(label)
                glyph_fonts.append(f"handwriting:{text}:{form}")
        if not seen:
            code_points = " ".join(f"U+{ord(c):04X}" for c in text)
            raise ValueError(
                f"texts[{label}] = {text!r} ({code_points}) has no glyph in any of the {len(fonts)} fonts "
                "searched (missing from the cmap, mapped to another symbol, or rendering empty). Pass "
                "fonts=[paths to .ttf/.otf files that contain it], or change texts."
            )
    sdf = np.stack(sdfs)
    sdf.flags.writeable = False
    return sdf, np.asarray(labels, np.int32), tuple(glyph_fonts)


def _catmull_rom_matrix(num_out: int, num_grid: int) -> np.ndarray:
    """(num_out, num_grid) weights interpolating grid values at pixel centres (grid ends on image edges)."""
    t = (np.arange(num_out) + 0.5) / num_out * (num_grid - 1)
    base = np.floor(t).astype(int)
    frac = t - base
    weights = np.zeros((num_out, num_grid), np.float64)
    for offset in (-1, 0, 1, 2):
        x = np.abs(frac - offset)
        kernel = np.where(
            x <= 1,
            1.5 * x**3 - 2.5 * x**2 + 1,
            np.where(x < 2, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2, 0.0),
        )
        index = np.clip(base + offset, 0, num_grid - 1)
        np.add.at(weights, (np.arange(num_out), index), kernel)
    return weights.astype(np.float32)


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


@functools.partial(jax.jit, static_argnames=("num_samples", "warp_grid"))
def _sample_prior(key, first, count, low, high, warp_std, *, num_samples, warp_grid):
    k_glyph, k_scalar, k_warp = jax.random.split(key, 3)
    glyph = first + jax.random.randint(k_glyph, (num_samples,), 0, count, dtype=jnp.int32)
    u = jax.random.uniform(k_scalar, (len(_SCALAR_FIELDS), num_samples), jnp.float32)
    scalars = low[:, None] + (high - low)[:, None] * u
    z = jax.random.truncated_normal(
        k_warp,
        -_WARP_TRUNCATION,
        _WARP_TRUNCATION,
        (num_samples, warp_grid, warp_grid, 2),
        jnp.float32,
    )
    return GlyphParams(glyph, *scalars, warp=warp_std * z)


@jax.jit
def _vary(key, params, first, count, low, high, warp_std, degree):
    num_samples = params.glyph.shape[0]
    k_switch, k_glyph, k_scalar, k_warp = jax.random.split(key, 4)
    switch = jax.random.uniform(k_switch, (num_samples,)) < -jnp.expm1(-degree)
    new_glyph = first + jax.random.randint(k_glyph, (num_samples,), 0, count, dtype=jnp.int32)
    glyph = jnp.where(switch, new_glyph, params.glyph.astype(jnp.int32))
    scalars = jnp.stack([getattr(params, name).astype(jnp.float32) for name in _SCALAR_FIELDS])
    std = (high - low) / math.sqrt(12.0)
    noise = jax.random.normal(k_scalar, scalars.shape, jnp.float32)
    scalars = _fold(scalars + degree * std[:, None] * noise, low[:, None], high[:, None])
    warp = params.warp.astype(jnp.float32)
    warp_noise = jax.random.normal(k_warp, warp.shape, jnp.float32)
    limit = _WARP_TRUNCATION * warp_std
    warp = _fold(warp + degree * warp_std * warp_noise, -limit, limit)
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
    zoom = p.scale / _FIT
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


@functools.partial(jax.jit, static_argnames=("image_size",))
def _render(sdf, interp, params, *, image_size):
    atlas_size = sdf.shape[-1]
    sdf_flat = sdf.reshape(-1)
    params = GlyphParams(
        params.glyph.astype(jnp.int32),
        *(getattr(params, n).astype(jnp.float32) for n in GlyphParams._fields[1:]),
    )
    images = jax.vmap(lambda p: _render_one(sdf_flat, atlas_size, interp, p, image_size))(params)
    return images[..., None]


# ------------------------------------------------------------------------------------------------------------
# The generator.


# Batch sizes the compiled kernels run at: n rounded up to one of 4 sizes per octave (< 25% extra rows). PE asks
# for a different number of samples per class (and per lookahead), so without buckets every class would compile
# its own programs; with them, sizes within a bucket share one compilation.
_BUCKET = {"per_octave": 4, "exact_up_to": 16}


def _pad_rows(tree, size: int):
    """Pads every leaf's leading axis to ``size`` by repeating its last row (padded rows are discarded)."""
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    if size == n:
        return tree
    idx = np.minimum(np.arange(size), n - 1)
    if _traced(tree):
        return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)
    # On the host: a jnp.take here would compile one program per (n, size) pair.
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], tree)


def _first_rows(tree, n: int):
    if jax.tree_util.tree_leaves(tree)[0].shape[0] == n:
        return tree
    if _traced(tree):
        return jax.tree_util.tree_map(lambda a: a[:n], tree)
    return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a)[:n]), tree)


def _traced(tree) -> bool:
    return any(_validate.is_traced(leaf) for leaf in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GlyphSimulator:
    """Glyph simulator generator: RANDOM_API and VARIATION_API over font-rendering parameters.

    Class ``label`` draws ``texts[label]``. Samples are :class:`GlyphParams` pytrees; images come from
    :meth:`to_images`. The only state is the glyph atlas, built once on construction (and cached per process).

    Args:
      texts: the text drawn for each class; ``texts[label]`` is one or more characters.
      image_size: side S of the square output images, >= 4.
      fonts: paths of TrueType/OpenType fonts; None uses the fonts bundled with matplotlib.
      prior: the parameter prior of :meth:`random` (and the noise scale of :meth:`variation`).
      warp_grid: side g >= 2 of the elastic-offset grid (``GlyphParams.warp`` has shape (N, g, g, 2)).
      atlas_size: side of each glyph's signed-distance field in the atlas (rendered at 4x and pooled), >= 16.
      handwriting: also draw single-digit texts in common handwritten forms with a round pen
        (:mod:`pejax.generators.handwriting`: straight-stemmed 9, open 4, crossed 7, flagged 1, ...), each
        treated as one more font.
      name: a short name for messages and reports.

    Raises:
      ValueError: if an argument is out of range, or no font has a genuine glyph for some class's text.
      TypeError: if an argument has the wrong type.

    Example:
      >>> import jax
      >>> sim = GlyphSimulator(texts=("0", "1"), image_size=16)
      >>> samples = sim.random(jax.random.key(0), label=1, num_samples=3)
      >>> children = sim.variation(jax.random.key(1), samples, label=1, degree=0.3)
      >>> sim.to_images(children).shape
      (3, 16, 16, 1)
    """

    texts: tuple[str, ...] = tuple("0123456789")
    image_size: int = 32
    fonts: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)
    prior: GlyphPrior = GlyphPrior()
    warp_grid: int = 4
    atlas_size: int = 64
    handwriting: bool = False
    name: str = "glyphs"

    def __post_init__(self):
        texts = self.texts
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise TypeError(
                f"texts must be a non-empty sequence of strings, one per class, got {texts!r}. "
                'Pass e.g. texts=("0", "1", "2").'
            )
        for label, text in enumerate(texts):
            if not isinstance(text, str) or not text or text.isspace():
                raise ValueError(
                    f"texts[{label}] must be a non-empty string with a visible character, got {text!r}."
                )
        object.__setattr__(self, "texts", tuple(texts))
        for field, minimum in (("image_size", 4), ("warp_grid", 2), ("atlas_size", 16)):
            value = _validate.positive_int(field, getattr(self, field), minimum=minimum)
            object.__setattr__(self, field, value)
        if not isinstance(self.prior, GlyphPrior):
            raise TypeError(f"prior must be a GlyphPrior, got {type(self.prior).__name__}.")
        if self.fonts is None:
            fonts = default_fonts()
        else:
            if (
                isinstance(self.fonts, str)
                or not isinstance(self.fonts, Sequence)
                or not self.fonts
            ):
                raise TypeError(
                    f"fonts must be None or a non-empty sequence of font file paths, got {self.fonts!r}."
                )
            fonts = tuple(os.fspath(path) for path in self.fonts)
            for path in fonts:
                if not os.path.isfile(path):
                    raise ValueError(
                        f"fonts contains {path!r}, which is not a file. Pass existing .ttf paths."
                    )
        object.__setattr__(self, "fonts", fonts)

        if not isinstance(self.handwriting, bool):
            raise TypeError(f"handwriting must be True or False, got {self.handwriting!r}.")
        sdf, labels, glyph_fonts = _build_atlas(
            self.texts, fonts, self.atlas_size, self.handwriting
        )
        counts = np.bincount(labels, minlength=len(self.texts)).astype(np.int32)
        first = (np.cumsum(counts) - counts).astype(np.int32)
        low, high = self.prior._bounds()
        object.__setattr__(self, "_sdf", jnp.asarray(sdf))
        object.__setattr__(self, "_first", first)
        object.__setattr__(self, "_count", counts)
        object.__setattr__(self, "_low", jnp.asarray(low))
        object.__setattr__(self, "_high", jnp.asarray(high))
        object.__setattr__(self, "_warp_std", jnp.float32(self.prior.warp))
        object.__setattr__(
            self, "_interp", jnp.asarray(_catmull_rom_matrix(self.image_size, self.warp_grid))
        )
        object.__setattr__(self, "glyph_labels", labels)
        object.__setattr__(self, "glyph_fonts", glyph_fonts)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(texts)``."""
        return len(self.texts)

    @property
    def num_glyphs(self) -> int:
        """Number of rows of the glyph atlas (distinct (font, text) renders over all classes)."""
        return int(self._sdf.shape[0])

    def fonts_for(self, label: int) -> tuple[str, ...]:
        """Returns the font paths used for class ``label``, in atlas order."""
        label = self._check_label(label)
        start, stop = int(self._first[label]), int(self._first[label] + self._count[label])
        return self.glyph_fonts[start:stop]

    # -- validation ------------------------------------------------------------------------------------------

    def _check_label(self, label: Any) -> int:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise TypeError(
                f"label must be an integer class index, got {label!r} of type {type(label).__name__}."
            )
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"label must be in [0, {self.num_classes}) (one per entry of texts), got {label}. "
                f"This simulator's texts are {self.texts!r}."
            )
        return int(label)

    def _check_samples(self, samples: Any, *, label: int | None = None) -> GlyphParams:
        if isinstance(samples, Mapping) and set(samples) == set(GlyphParams._fields):
            samples = GlyphParams(**samples)
        if not isinstance(samples, GlyphParams):
            raise TypeError(
                f"samples must be a GlyphParams (as returned by {self.name}.random or .variation), got "
                f"{type(samples).__name__}."
            )
        arrays = {}
        for field in GlyphParams._fields:
            value = getattr(samples, field)
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                value = np.asarray(value)
            arrays[field] = value
        glyph = arrays["glyph"]
        if glyph.ndim != 1 or glyph.shape[0] < 1:
            raise ValueError(
                f"samples.glyph must have shape (N,) with N >= 1, got shape {tuple(glyph.shape)}."
            )
        if not jnp.issubdtype(glyph.dtype, jnp.integer):
            raise TypeError(f"samples.glyph must have an integer dtype, got {glyph.dtype}.")
        num = glyph.shape[0]
        g = self.warp_grid
        for field in GlyphParams._fields[1:]:
            value = arrays[field]
            expected = (num, g, g, 2) if field == "warp" else (num,)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"samples.{field} must have shape {expected} (N = {num} from samples.glyph, warp grid "
                    f"{g} from this simulator), got shape {tuple(value.shape)}."
                )
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(
                    f"samples.{field} must have a floating dtype, got {value.dtype}. Convert it with "
                    ".astype(np.float32)."
                )
        if not any(_validate.is_traced(v) for v in arrays.values()):
            glyph_np = np.asarray(glyph)
            if label is None:
                start, stop = 0, self.num_glyphs
                where = f"the atlas, [0, {self.num_glyphs})"
            else:
                start, stop = int(self._first[label]), int(self._first[label] + self._count[label])
                where = f"label {label}'s glyphs, [{start}, {stop}); were the samples made for another label?"
            bad = (glyph_np < start) | (glyph_np >= stop)
            if bad.any():
                raise ValueError(
                    f"samples.glyph must index {where} Got {int(glyph_np[bad][0])} at row "
                    f"{int(np.argmax(bad))}."
                )
            for field in GlyphParams._fields[1:]:
                if not np.isfinite(np.asarray(arrays[field])).all():
                    raise ValueError(
                        f"samples.{field} contains NaN or Inf; parameters must be finite."
                    )
        return GlyphParams(**arrays)

    # -- the generator protocol ------------------------------------------------------------------------------

    def random(self, key: jax.Array, label: int, num_samples: int) -> GlyphParams:
        """Draws ``num_samples`` parameter sets of class ``label`` from the prior (RANDOM_API).

        Args:
          key: a ``jax.random`` key; the same key gives the same samples.
          label: class index in ``[0, len(texts))``.
          num_samples: number of samples N >= 1.

        Returns:
          A :class:`GlyphParams` with leading axis N (see :class:`GlyphPrior` for the distribution).

        Raises:
          TypeError, ValueError: on a missing key, a bad label or num_samples.
        """
        _validate.check_key(key)
        label = self._check_label(label)
        num_samples = _validate.positive_int("num_samples", num_samples)
        drawn = _sample_prior(
            key,
            jnp.int32(self._first[label]),
            jnp.int32(self._count[label]),
            self._low,
            self._high,
            self._warp_std,
            num_samples=bucket_size(num_samples, **_BUCKET),
            warp_grid=self.warp_grid,
        )
        return _first_rows(drawn, num_samples)

    def variation(
        self, key: jax.Array, samples: GlyphParams, label: int, degree: float
    ) -> GlyphParams:
        """Perturbs every sample's parameters (VARIATION_API).

        Each continuous parameter gets Gaussian noise of standard deviation ``degree`` times its prior's
        standard deviation ((high - low) / sqrt(12) for a uniform range, ``prior.warp`` for the elastic
        offsets), and is reflected back into its prior range. The font changes (to one drawn uniformly from
        the class's fonts, possibly the same) with probability ``1 - exp(-degree)``. So ``degree = 0`` returns
        the samples unchanged, and ``degree = 1`` moves them by about the prior's spread.

        Args:
          key: a ``jax.random`` key; the same key gives the same variations.
          samples: a :class:`GlyphParams` of class ``label`` with leading axis N.
          label: class index in ``[0, len(texts))``.
          degree: variation strength, a finite number >= 0.

        Returns:
          A :class:`GlyphParams` with the same shapes (one variation per sample).

        Raises:
          TypeError, ValueError: on a missing key, a bad label or degree, or samples of the wrong structure,
            shapes, dtypes or class.
        """
        _validate.check_key(key)
        label = self._check_label(label)
        degree = _validate.finite_float("degree", degree, minimum=0.0)
        samples = self._check_samples(samples, label=label)
        n = samples.glyph.shape[0]
        varied = _vary(
            key,
            _pad_rows(samples, bucket_size(n, **_BUCKET)),
            jnp.int32(self._first[label]),
            jnp.int32(self._count[label]),
            self._low,
            self._high,
            self._warp_std,
            jnp.float32(degree),
        )
        return _first_rows(varied, n)

    def to_images(self, samples: GlyphParams) -> jax.Array:
        """Renders samples to images (jit-compiled once per batch-size bucket and image size).

        Args:
          samples: a :class:`GlyphParams` with leading axis N.

        Returns:
          float32 array of shape (N, S, S, 1), values in [0, 1]: white ink on black.

        Raises:
          TypeError, ValueError: on samples of the wrong structure, shapes or dtypes.
        """
        samples = self._check_samples(samples)
        n = samples.glyph.shape[0]
        images = _render(
            self._sdf,
            self._interp,
            _pad_rows(samples, bucket_size(n, **_BUCKET)),
            image_size=self.image_size,
        )
        return _first_rows(images, n)
