"""The random/variation protocol every pejax generator implements.

A generator never sees private data. It makes *samples*: a pytree of arrays sharing a leading axis of length
``num_samples`` (for an image model, simply the images; for a simulator, the simulator's parameters, so that a
variation moves parameters rather than pixels). ``to_images`` turns samples into images, the only form the rest
of pejax looks at:

  images: float32, shape (N, H, W, C), values in [0, 1] (0 = black). C is 1 (grey) or 3 (RGB).

Randomness is explicit: every call takes a ``jax.random`` key and the same key gives the same samples.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol
from typing import runtime_checkable

import jax

Samples = Any  # a pytree of arrays with a shared leading axis


@runtime_checkable
class Generator(Protocol):
    """Protocol of a PE generator (RANDOM_API and VARIATION_API of the papers).

    Attributes:
      name: a short human-readable name used in error messages and reports.
    """

    name: str

    def random(self, key: jax.Array, label: int, num_samples: int) -> Samples:
        """Draws ``num_samples`` fresh samples of class ``label`` (RANDOM_API)."""
        ...

    def variation(self, key: jax.Array, samples: Samples, label: int, degree: float) -> Samples:
        """Returns one variation of each sample (VARIATION_API), as many as given.

        ``degree`` >= 0 is the variation strength: 0 leaves samples (nearly) unchanged, larger values move them
        further. Its scale is the generator's own and is documented there.
        """
        ...

    def to_images(self, samples: Samples) -> jax.Array:
        """Renders samples to float32 images of shape (N, H, W, C) with values in [0, 1]."""
        ...
