"""A tiny deterministic image generator and private data set for loop tests (no fonts, fast to compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class ToyGenerator:
    """Samples are (N, 6, 6, 1) images in [0, 1]; variation adds Gaussian noise of std 0.3 * degree."""

    name = "toy"
    modality = "image"

    def __init__(self):
        self.calls = {"random": 0, "variation": 0, "to_images": 0}

    def random(self, key, label, num_samples):
        self.calls["random"] += 1
        return jax.random.uniform(jax.random.fold_in(key, label), (num_samples, 6, 6, 1))

    def variation(self, key, samples, label, degree):
        self.calls["variation"] += 1
        noise = jax.random.normal(key, jnp.shape(samples))
        return jnp.clip(samples + 0.3 * degree * noise, 0.0, 1.0)

    def to_images(self, samples):
        self.calls["to_images"] += 1
        return samples


def private_data(n_per_class=(30, 20, 25), seed=0):
    """Class y's private images are bright in one third of the rows (an easy, structured target)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for y, n in enumerate(n_per_class):
        x = rng.uniform(0, 0.2, size=(n, 6, 6, 1))
        x[:, 2 * y : 2 * y + 2] += 0.7
        images.append(np.clip(x, 0, 1))
        labels.append(np.full(n, y))
    return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int32)


def flat(images):
    return jnp.reshape(images, (images.shape[0], -1))
