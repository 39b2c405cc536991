"""The coverage oracle of experiments/digits_coverage.py against a NumPy float64 brute force."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "digits_coverage.py"


@pytest.fixture(scope="module")
def coverage_module():
    spec = importlib.util.spec_from_file_location("digits_coverage", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _PoolGenerator:
    """random(key, label, n) draws n rows of a fixed pool (so the test knows every image drawn)."""

    def __init__(self, pool):
        self.pool = pool
        self.drawn = []

    def random(self, key, label, num_samples):
        idx = np.asarray(jax.random.randint(key, (num_samples,), 0, len(self.pool)))
        self.drawn.append(idx)
        return idx

    def to_images(self, idx):
        return self.pool[idx]


def test_nearest_random_matches_brute_force(coverage_module):
    rng = np.random.default_rng(3)
    pool = rng.uniform(0, 1, (61, 8, 8, 1)).astype(np.float32)
    private = rng.uniform(0, 1, (13, 8, 8, 1)).astype(np.float32)
    gen = _PoolGenerator(pool)
    # 23 samples in batches of 7: three full batches and a short one.
    out = coverage_module.nearest_random(gen, jax.random.key(0), private, 23, label=0, batch=7)
    drawn = pool[np.concatenate(gen.drawn)].reshape(23, -1).astype(np.float64)
    assert sum(len(d) for d in gen.drawn) == 23 and [len(d) for d in gen.drawn] == [7, 7, 7, 2]
    flat = private.reshape(13, -1).astype(np.float64)
    dist = ((flat[:, None, :] - drawn[None, :, :]) ** 2).sum(-1)
    expected = drawn[dist.argmin(1)].reshape(private.shape)
    assert out.shape == private.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_bad_arguments_are_refused(coverage_module, monkeypatch, capsys):
    for argv in (
        ["--num-random", "0"],
        ["--pools", "-1"],
        ["--generators", "{not json"],
        ["--generators", "[]"],
    ):
        monkeypatch.setattr("sys.argv", ["digits_coverage.py", *argv])
        with pytest.raises(SystemExit) as err:
            coverage_module.main()
        assert err.value.code == 2
        assert "--" in capsys.readouterr().err
