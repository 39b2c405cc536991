"""The nearest-of-N coverage oracle (pejax.metrics.nearest_random_samples, used by
experiments/digits_coverage.py) against a NumPy float64 brute force, and the script's argument checks."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from pejax.metrics import nearest_random_samples

_ROOT = pathlib.Path(__file__).parents[1]
_SCRIPT = _ROOT / "experiments" / "digits_coverage.py"


class _PoolGenerator:
    """random(key, label, n) draws n rows of a fixed pool (so the test knows every image drawn)."""

    name = "pool"
    modality = "image"

    def __init__(self, pool):
        self.pool = pool
        self.drawn = []

    def random(self, key, label, num_samples):
        idx = np.asarray(jax.random.randint(key, (num_samples,), 0, len(self.pool)))
        self.drawn.append(idx)
        return idx

    def to_images(self, idx):
        return self.pool[idx]


def _flatten(images):
    return np.asarray(images).reshape(len(images), -1)


def test_nearest_random_matches_brute_force():
    rng = np.random.default_rng(3)
    pool = rng.uniform(0, 1, (61, 8, 8, 1)).astype(np.float32)
    private = rng.uniform(0, 1, (13, 64)).astype(np.float32)
    gen = _PoolGenerator(pool)
    # 23 samples in batches of 7: three full batches and a short one.
    out = nearest_random_samples(
        gen, jax.random.key(0), private, label=0, num_random=23, embed=_flatten, batch=7
    )
    assert sum(len(d) for d in gen.drawn) == 23 and [len(d) for d in gen.drawn] == [7, 7, 7, 2]
    drawn = pool[np.concatenate(gen.drawn)].reshape(23, -1).astype(np.float64)
    dist = ((private.astype(np.float64)[:, None, :] - drawn[None, :, :]) ** 2).sum(-1)
    expected = drawn[dist.argmin(1)]
    assert out.shape == private.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key": None}, TypeError, "key is required"),
        ({"label": -1}, ValueError, "label must be a class index >= 0, got -1"),
        ({"num_random": 0}, ValueError, "num_random"),
        ({"batch": 0}, ValueError, "batch"),
        ({"embed": "pixels"}, TypeError, "embed must be a function"),
        ({"private": np.zeros((3, 8, 8))}, ValueError, "private must be a 2-D array"),
        ({"embed": lambda im: _flatten(im)[:, :10]}, ValueError, r"embed must return \(5, 64\)"),
    ],
)
def test_nearest_random_refuses_bad_arguments(kwargs, error, match):
    gen = _PoolGenerator(np.zeros((4, 8, 8, 1), np.float32))
    args = {
        "generator": gen,
        "key": jax.random.key(0),
        "private": np.zeros((3, 64), np.float32),
        "label": 0,
        "num_random": 5,
        "embed": _flatten,
    } | kwargs
    with pytest.raises(error, match=match):
        nearest_random_samples(**args)


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-random", "0"],
        ["--pools", "-1"],
        ["--generators", "{not json"],
        ["--generators", "[]"],
    ],
)
def test_script_refuses_bad_arguments(argv):
    env = dict(os.environ, PYTHONPATH=str(_ROOT / "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(_SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "digits_coverage.py: error: --" in proc.stderr
