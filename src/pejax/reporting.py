"""Output files of a run: ``synthetic.npz``, ``report.json``, ``samples.png``, ``metrics.png``.

Nothing here sees private data: it writes synthetic samples (already differentially private), the ledger and
evaluation metrics computed on held-out data.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np


def _atomic_write_bytes(path: pathlib.Path, data: bytes, what: str) -> None:
    """Writes through a temporary file renamed over ``path``; on failure (disk full, ...) the temporary file
    is removed and an ``OSError`` names ``path`` (see :func:`pejax.checkpoint.write_atomically`)."""
    from pejax.checkpoint import write_atomically

    write_atomically(path, lambda f: f.write(data), what=what)


def to_uint8(images) -> np.ndarray:
    """float [0, 1] images (N, H, W, C) -> uint8 (N, H, W) for grey or (N, H, W, C) for colour."""
    arr = np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def write_synthetic(path: pathlib.Path, images, labels, *, notice: str | None = None) -> None:
    """Writes ``images`` (uint8) and ``labels`` (int32) to an ``.npz`` (readable with allow_pickle=False).

    ``notice``: a warning stored beside them as the string array ``notice`` (e.g. "NOT a differentially
    private release" for reproducible-noise runs).
    """
    import io

    buf = io.BytesIO()
    extra = {} if notice is None else {"notice": np.asarray(notice)}
    np.savez(buf, images=to_uint8(images), labels=np.asarray(labels, np.int32), **extra)
    _atomic_write_bytes(path, buf.getvalue(), "synthetic data")


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def write_json(path: pathlib.Path, doc: dict) -> None:
    _atomic_write_bytes(
        path, (json.dumps(_json_safe(doc), indent=2, sort_keys=False) + "\n").encode(), "report"
    )


def sample_grid(images, labels, *, per_class: int = 10, class_names: Sequence[str] | None = None):
    """A (rows*H, per_class*W, C) float grid: one row per class, the first ``per_class`` samples of it."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n, h, w, c = images.shape
    pad = 1
    grid = (
        np.zeros((len(classes) * (h + pad) + pad, per_class * (w + pad) + pad, c), np.float32) + 0.5
    )
    for r, y in enumerate(classes):
        idx = np.flatnonzero(labels == y)[:per_class]
        for j, i in enumerate(idx):
            top, left = pad + r * (h + pad), pad + j * (w + pad)
            grid[top : top + h, left : left + w] = images[i]
    del class_names, n
    return grid


def save_samples_png(
    path: pathlib.Path,
    images,
    labels,
    *,
    per_class: int = 10,
    scale: int = 4,
    notice: str | None = None,
) -> None:
    """Writes ``samples.png``: one row per class, upscaled by ``scale`` with nearest-neighbour pixels.

    ``notice``: a warning stored in the PNG's ``Comment`` text chunk.
    """
    from PIL import Image
    from PIL import PngImagePlugin

    grid = sample_grid(images, labels, per_class=per_class)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    arr = np.clip(np.rint(grid * 255), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    info = PngImagePlugin.PngInfo()
    if notice is not None:
        info.add_text("Comment", notice)
    from pejax.checkpoint import write_atomically

    write_atomically(path, lambda tmp: img.save(tmp, pnginfo=info), what="image", suffix=".png")


def save_metrics_png(path: pathlib.Path, history: Sequence[dict], *, accountant: str) -> None:
    """Writes ``metrics.png``: each metric against iteration and against epsilon spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_names = sorted({k for rec in history for k in rec.get("metrics", {})})
    if not metric_names:
        metric_names = []
    rows = max(1, len(metric_names))
    fig, axes = plt.subplots(rows, 2, figsize=(9, 2.8 * rows), squeeze=False)
    its = [rec["iteration"] for rec in history]
    eps = [rec["epsilon"].get(accountant, float("nan")) for rec in history]
    eps = [float(e) if not isinstance(e, str) else float("inf") for e in eps]
    for r, name in enumerate(metric_names):
        vals = [rec.get("metrics", {}).get(name, float("nan")) for rec in history]
        axes[r, 0].plot(its, vals, "o-")
        axes[r, 0].set_xlabel("iteration")
        axes[r, 0].set_ylabel(name)
        axes[r, 1].plot(eps, vals, "o-")
        axes[r, 1].set_xlabel(f"epsilon spent ({accountant})")
        axes[r, 1].set_ylabel(name)
        for ax in axes[r]:
            ax.grid(alpha=0.3)
    if not metric_names:
        axes[0, 0].plot(its, eps, "o-")
        axes[0, 0].set_xlabel("iteration")
        axes[0, 0].set_ylabel(f"epsilon spent ({accountant})")
        axes[0, 1].axis("off")
    fig.tight_layout()
    from pejax.checkpoint import write_atomically

    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100), what="plot", suffix=".png")
    finally:
        plt.close(fig)
