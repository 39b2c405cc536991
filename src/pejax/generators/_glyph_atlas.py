"""The glyph atlas of :mod:`pejax.generators.glyphs`: glyphs rendered once with Pillow, as signed distance fields.

Glyph selection. A (font, text) pair is used only when, for every character of the text, the font's cmap has
the character and the mapped glyph's PostScript name decodes (Adobe Glyph List, ``fontTools.agl``) to the same
character up to NFKC normalisation, and the render is not empty. The name check drops TeX- and symbol-encoded
fonts that map ASCII code points to other symbols (matplotlib's ``cmsy10``, ``cmex10``; ``cmmi10``'s old-style
digits) and last-resort fonts whose glyphs are placeholder boxes; fonts without glyph names (post table format 3)
are trusted by their cmap. Identical renders within a class (a font that shares another's outlines) are kept once.

Public names are re-exported by :mod:`pejax.generators.glyphs`; import them from there.
"""

from __future__ import annotations

import functools
import glob
import os
import unicodedata

import numpy as np
from scipy import ndimage

ATLAS_FIT = 0.75
"""Fraction of the atlas side taken by a glyph's longer side (the rest is margin for dilation): a glyph of
``GlyphParams.scale`` s is drawn at ``s / ATLAS_FIT`` times the atlas size."""


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
    """Renders ``text`` centred by its ink box, longer side ``ATLAS_FIT * high_res``; bool (high_res, high_res)."""
    from PIL import Image
    from PIL import ImageDraw

    left, top, right, bottom = font.getbbox(text)
    pad = 8
    width, height = max(right - left, 1) + 2 * pad, max(bottom - top, 1) + 2 * pad
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    return _fit(canvas, high_res)


def _fit(canvas, high_res: int) -> np.ndarray | None:
    """Crops a Pillow "L" image to its ink, centres it with longer side ``ATLAS_FIT * high_res``; bool mask."""
    from PIL import Image

    box = canvas.getbbox()
    if box is None:
        return None
    crop = canvas.crop(box)
    zoom = ATLAS_FIT * high_res / max(crop.size)
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
