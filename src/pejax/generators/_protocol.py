"""The random/variation protocol every pejax generator implements.

A generator never sees private data. It makes *samples*: a pytree of arrays sharing a leading axis of length
``num_samples``. What the rest of pejax looks at depends on the generator's ``modality``:

* ``"image"`` (:class:`ImageGenerator`): samples are whatever suits the generator (for an image model, simply the
  images; for a simulator, the simulator's parameters, so that a variation moves parameters rather than pixels),
  and ``to_images`` renders them to the images that embeddings and reports see::

    images: float32, shape (N, H, W, C), values in [0, 1] (0 = black). C is 1 (grey) or 3 (RGB).

* ``"text"`` (:class:`TextGenerator`): samples ARE what text embeddings see, one uint8 array of shape (N, L)
  holding each text's UTF-8 bytes, zero-padded (:mod:`pejax.generators.text_codec`); ``to_texts`` decodes them
  to N strings for people and files. A text generator has no ``to_images``.

Randomness is explicit: every call takes a ``jax.random`` key and the same key gives the same samples.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol
from typing import runtime_checkable

import jax

Samples = Any  # a pytree of arrays with a shared leading axis

MODALITIES = ("image", "text")
"""The values of :attr:`Generator.modality`."""


@runtime_checkable
class Generator(Protocol):
    """Protocol of a PE generator (RANDOM_API and VARIATION_API of the papers).

    A generator also implements the method of its modality: ``to_images`` (:class:`ImageGenerator`) or
    ``to_texts`` (:class:`TextGenerator`).

    Attributes:
      name: a short human-readable name used in error messages and reports.
      modality: ``"image"`` or ``"text"`` (:data:`MODALITIES`): what the samples are, and so which embeddings,
        data and metrics a run can pair with the generator. A generator without the attribute is taken as an
        image generator by :class:`pejax.generators.CheckedGenerator` (and by the runner).
    """

    name: str
    modality: str

    def random(self, key: jax.Array, label: int, num_samples: int) -> Samples:
        """Draws ``num_samples`` fresh samples of class ``label`` (RANDOM_API)."""
        ...

    def variation(self, key: jax.Array, samples: Samples, label: int, degree: float) -> Samples:
        """Returns one variation of each sample (VARIATION_API), as many as given.

        ``degree`` >= 0 is the variation strength: 0 leaves samples (nearly) unchanged, larger values move them
        further. Its scale is the generator's own and is documented there.
        """
        ...


@runtime_checkable
class ImageGenerator(Generator, Protocol):
    """A generator of ``modality = "image"``: its samples render to images."""

    def to_images(self, samples: Samples) -> jax.Array:
        """Renders samples to float32 images of shape (N, H, W, C) with values in [0, 1]."""
        ...


@runtime_checkable
class TextGenerator(Generator, Protocol):
    """A generator of ``modality = "text"``: its samples are (N, L) uint8 arrays of UTF-8 bytes."""

    def to_texts(self, samples: Samples) -> list[str]:
        """Decodes samples to N strings (:func:`pejax.generators.text_codec.decode_texts`)."""
        ...
