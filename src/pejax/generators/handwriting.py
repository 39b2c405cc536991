"""Pen-stroke skeletons of the ten digits in common handwritten forms, for the glyph simulator's atlas.

Fonts draw digits the way type designers do: a 9 with a round loop and a curled tail, a closed 4, a 1 without
a flag. People write several other forms as a matter of course (school handwriting models, e.g. the
straight-stemmed 9, the open-topped 4, the crossed 7, the flagged and based 1). These skeletons add those forms
as polylines in a unit box (x to the right, y down), drawn once with a round pen by Pillow; the glyph
simulator then treats each like one more font (same transforms, elastic warp, stroke width and blur). They are
written from general knowledge of handwriting, not from any data set.
"""

from __future__ import annotations

import math

import numpy as np

# Pen width as a fraction of the drawing's height (before the simulator's own stroke parameter).
_PEN = 0.11


def _arc(cx, cy, rx, ry, start_deg, stop_deg, num=24):
    """Points of an elliptical arc, angles in degrees measured clockwise from +x (y points down)."""
    t = np.radians(np.linspace(start_deg, stop_deg, num))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in t]


def _skeletons() -> dict[str, list[list[list[tuple[float, float]]]]]:
    """For each digit, a list of forms; each form is a list of strokes (polylines in the unit box)."""
    return {
        "0": [
            [_arc(0.5, 0.5, 0.3, 0.46, -90, 270, 40)],
            [_arc(0.5, 0.5, 0.22, 0.46, -80, 285, 40)],
        ],
        "1": [
            [[(0.5, 0.04), (0.5, 0.96)]],
            [[(0.28, 0.28), (0.56, 0.04), (0.56, 0.96)]],
            [[(0.28, 0.28), (0.56, 0.04), (0.56, 0.96)], [(0.28, 0.96), (0.84, 0.96)]],
        ],
        "2": [
            [[*_arc(0.5, 0.3, 0.28, 0.26, 190, 370, 20), (0.2, 0.96), (0.86, 0.96)]],
            [[*_arc(0.48, 0.3, 0.3, 0.26, 180, 380, 20), (0.28, 0.82), (0.18, 0.96), (0.86, 0.93)]],
        ],
        "3": [
            [
                _arc(0.48, 0.27, 0.27, 0.23, 200, 450, 20)
                + _arc(0.48, 0.72, 0.3, 0.24, -90, 160, 20)
            ],
            [[(0.2, 0.05), (0.8, 0.05), (0.45, 0.42), *_arc(0.48, 0.7, 0.3, 0.26, -90, 160, 20)]],
        ],
        "4": [
            [[(0.62, 0.04), (0.16, 0.66), (0.86, 0.66)], [(0.66, 0.34), (0.66, 0.96)]],
            [[(0.22, 0.04), (0.18, 0.58), (0.86, 0.58)], [(0.7, 0.04), (0.7, 0.96)]],
        ],
        "5": [
            [[(0.8, 0.04), (0.3, 0.04), (0.25, 0.44), *_arc(0.5, 0.68, 0.3, 0.28, -130, 150, 22)]],
            [
                [(0.28, 0.04), (0.24, 0.46), *_arc(0.5, 0.68, 0.3, 0.28, -130, 150, 22)],
                [(0.28, 0.05), (0.82, 0.05)],
            ],
        ],
        "6": [
            [_arc(0.72, 0.62, 0.48, 0.6, 235, 180, 14) + _arc(0.5, 0.7, 0.26, 0.26, 180, 540, 30)],
            [[(0.66, 0.04), (0.28, 0.6), *_arc(0.5, 0.72, 0.25, 0.24, 200, 560, 30)]],
        ],
        "7": [
            [[(0.14, 0.05), (0.86, 0.05), (0.38, 0.96)]],
            [[(0.14, 0.05), (0.86, 0.05), (0.42, 0.96)], [(0.34, 0.5), (0.78, 0.5)]],
            [[(0.14, 0.16), (0.2, 0.05), (0.86, 0.05), (0.6, 0.5), (0.55, 0.96)]],
        ],
        "8": [
            [_arc(0.5, 0.27, 0.22, 0.22, 90, 450, 30), _arc(0.5, 0.72, 0.27, 0.24, -90, 270, 30)],
            [_arc(0.5, 0.26, 0.18, 0.22, 90, 450, 30), _arc(0.5, 0.72, 0.22, 0.24, -90, 270, 30)],
            # One stroke: over the top loop to the left, down across the waist, round the bottom loop
            # and back up across the waist to the start.
            [
                _arc(0.5, 0.25, 0.2, 0.2, -30, -200, 20)
                + _arc(0.5, 0.71, 0.26, 0.24, -20, 200, 24)
                + [(0.68, 0.12)]
            ],
            # A small top loop on a large bottom loop.
            [_arc(0.5, 0.2, 0.15, 0.15, 90, 450, 24), _arc(0.5, 0.66, 0.3, 0.3, -90, 270, 30)],
        ],
        "9": [
            [_arc(0.45, 0.28, 0.25, 0.24, 0, 360, 30), [(0.7, 0.28), (0.7, 0.96)]],
            [_arc(0.5, 0.25, 0.22, 0.21, 0, 360, 30), [(0.72, 0.25), (0.66, 0.96)]],
            [
                _arc(0.45, 0.28, 0.25, 0.24, 0, 360, 30),
                [(0.7, 0.28), (0.66, 0.8), (0.45, 0.96), (0.28, 0.88)],
            ],
            # A small flat loop and a straight stem slanting down to the left.
            [_arc(0.45, 0.22, 0.22, 0.18, 0, 360, 30), [(0.67, 0.22), (0.35, 0.96)]],
            # A stem that hooks back to the left at the bottom.
            [
                _arc(0.5, 0.24, 0.2, 0.19, 0, 360, 30),
                [(0.7, 0.26), (0.68, 0.66), *_arc(0.5, 0.68, 0.18, 0.28, 0, 150, 12)],
            ],
        ],
    }


SKELETON_TEXTS = tuple(str(d) for d in range(10))


def draw_forms(text: str, high_res: int) -> list[np.ndarray]:
    """The handwritten forms of a digit ``text``, each a bool (high_res, high_res) ink mask (empty list for
    texts that are not a single digit). Each form is drawn on a canvas with a margin, so the caller can crop
    and fit it like a font glyph."""
    from PIL import Image
    from PIL import ImageDraw

    forms = _skeletons().get(text, [])
    out = []
    width = max(2, round(_PEN * high_res))
    for strokes in forms:
        canvas = Image.new("L", (high_res, high_res), 0)
        draw = ImageDraw.Draw(canvas)
        margin = 0.15 * high_res
        scale = high_res - 2 * margin
        for stroke in strokes:
            pts = [(margin + x * scale, margin + y * scale) for x, y in stroke]
            draw.line(pts, fill=255, width=width, joint="curve")
            r = width / 2  # round pen: round caps at both ends
            for x, y in (pts[0], pts[-1]):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        out.append(np.asarray(canvas) >= 128)
    return out


__all__ = ["SKELETON_TEXTS", "draw_forms"]
