"""Time of one PE iteration at 2000 synthetic samples with lookahead 8, against per-sample Pillow rendering.

The reference implementation's font simulator renders every sample with Pillow; one of its iterations at 2000
samples with lookahead 8 took 4.9 s on this machine (issue #3). This script times pejax's steady-state
iteration (after compilation) on the digits with the glyph simulator, and, in the same run, the Pillow cost of
rendering the same number of images one by one (2000 x (1 + 8) renders), the part that dominated the reference.

  python benchmarks/bench_iteration.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.data import load_digits_split
from pejax.embeddings import resize_embedding
from pejax.generators.glyphs import GlyphSimulator
from pejax.generators.glyphs import default_fonts
from pejax.runner import PrivateEvolution


def pillow_renders(count: int, size: int = 16) -> float:
    """Seconds to render ``count`` digit images one by one with Pillow (font cached, random transforms)."""
    from PIL import Image
    from PIL import ImageDraw
    from PIL import ImageFont

    fonts = [ImageFont.truetype(p, 48) for p in default_fonts()[:8]]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(count):
        img = Image.new("L", (64, 64))
        ImageDraw.Draw(img).text((16, 4), str(i % 10), font=fonts[i % len(fonts)], fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        np.asarray(img.resize((size, size), Image.BILINEAR), np.float32)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--lookahead", type=int, default=8)
    args = parser.parse_args()

    split = load_digits_split()
    timings = []

    def record(info):
        if info.iteration > 0:
            timings.append((info.iteration, info.timings["total"]))

    pe = PEConfig(
        num_classes=10,
        samples_per_iteration=args.samples,
        iterations=args.repeats + 1,
        lookahead_degree=args.lookahead,
        output="population",
    )
    runner = PrivateEvolution(
        generator=GlyphSimulator(image_size=16),
        embedding=lambda x: resize_embedding(x, size=(8, 8)),
        pe=pe,
        privacy=PrivacyConfig(epsilon=1.0, max_private_samples=1797),
        callbacks=[record],
    )
    runner.run(jax.random.key(0), split.train_images, split.train_labels)
    first = timings[0][1]
    steady = [t for it, t in timings[1:]]
    pil = pillow_renders(args.samples * (1 + args.lookahead))
    print(f"pejax first iteration (includes compilation): {first:.2f} s")
    print(
        f"pejax steady-state iteration, median of {len(steady)}: {statistics.median(steady):.3f} s"
    )
    print(
        f"  ({args.samples} samples, lookahead {args.lookahead}, per-class votes, noise, selection, variation)"
    )
    print(
        f"Pillow, rendering the same {args.samples * (1 + args.lookahead)} images one by one: {pil:.2f} s"
    )
    print(
        f"reference implementation's measured iteration (issue #3): 4.9 s -> speed-up "
        f"{4.9 / statistics.median(steady):.0f}x"
    )


if __name__ == "__main__":
    main()
