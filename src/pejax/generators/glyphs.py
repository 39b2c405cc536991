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

The Pillow atlas and its glyph selection are in :mod:`pejax.generators._glyph_atlas`; the parameters, the prior
and the jitted kernels in :mod:`pejax.generators._glyph_kernels`.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _validate
from pejax.buckets import bucket_size
from pejax.generators._glyph_atlas import ATLAS_FIT as ATLAS_FIT
from pejax.generators._glyph_atlas import _build_atlas
from pejax.generators._glyph_atlas import _catmull_rom_matrix
from pejax.generators._glyph_atlas import default_fonts as default_fonts
from pejax.generators._glyph_kernels import GlyphParams as GlyphParams
from pejax.generators._glyph_kernels import GlyphPrior as GlyphPrior
from pejax.generators._glyph_kernels import _render
from pejax.generators._glyph_kernels import _sample_prior
from pejax.generators._glyph_kernels import _vary

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

    ``modality`` is ``"image"`` (a class attribute, not an argument).

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

    batch_buckets = True  # compiles per batch size: the PE engine calls it at shared padded sizes

    texts: tuple[str, ...] = tuple("0123456789")
    image_size: int = 32
    fonts: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)
    prior: GlyphPrior = GlyphPrior()  # noqa: RUF009 (a frozen dataclass: one shared default is safe)
    warp_grid: int = 4
    atlas_size: int = 64
    handwriting: bool = False
    name: str = "glyphs"
    modality: ClassVar[str] = "image"

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
    def atlas(self) -> jax.Array:
        """The glyph atlas: (num_glyphs, atlas_size, atlas_size) float32 signed distance fields.

        Entry ``[g, i, j]`` is the distance from the centre of atlas pixel (row i, column j) to the outline of
        glyph ``g`` (class ``glyph_labels[g]``, font ``glyph_fonts[g]``), in fractions of the atlas side,
        negative inside the glyph. A glyph's longer side spans ``ATLAS_FIT`` of the atlas side.
        """
        return self._sdf

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


__all__ = [
    "ATLAS_FIT",
    "GlyphParams",
    "GlyphPrior",
    "GlyphSimulator",
    "default_fonts",
]
