import dataclasses
import importlib.util
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _toy import ToyGenerator
from _toy import flat
from _toy import private_data

import pejax
from pejax import checkpoint as ckpt
from pejax import engine
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig
from pejax.errors import GeneratorError
from pejax.errors import GeneratorRetryWarning
from pejax.runner import CheckpointMismatchError
from pejax.runner import PrivateEvolution
from pejax.runner import allocate

PE = PEConfig(
    num_classes=3,
    samples_per_iteration=24,
    iterations=3,
    k=2,
    lookahead_degree=2,
    variation_folds=2,
    final_samples_per_class=6,
    degrees=(0.8, 0.2),
)
# Reproducible noise (privacy.noise_seed) so that equality tests can compare runs; the secret-key default is
# tested in tests/test_privacy_attacks.py.
PRIV = PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=0)


def make(tmp_path=None, pe=PE, privacy=PRIV, generator=None, **kw):
    return PrivateEvolution(
        generator=generator or ToyGenerator(),
        embedding=flat,
        pe=pe,
        privacy=privacy,
        checkpoint_dir=tmp_path,
        speed=kw.pop("speed", SpeedConfig(retry_backoff_s=0.0)),
        **kw,
    )


def run(tmp_path=None, key=0, **kw):
    x, y = private_data()
    resume = kw.pop("resume", False)
    stop_after = kw.pop("stop_after", None)
    return make(tmp_path, **kw).run(jax.random.key(key), x, y, resume=resume, stop_after=stop_after)


def test_run_shapes_ledger_and_budget():
    r = run()
    assert r.images.shape == (18, 6, 6, 1) and r.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    releases = r.ledger.releases
    assert [x.description for x in releases] == ["class counts"] + ["vote histogram"] * 3
    assert [x.iteration for x in releases] == [0, 1, 2, 3]
    eps = r.ledger.epsilons()
    assert eps["pld"] <= 2.0 and eps["pld"] == pytest.approx(2.0, rel=1e-3)
    assert eps["rdp"] > eps["pld"]
    assert sum(r.class_sizes) == 24 and min(r.class_sizes) >= PE.min_samples_per_class
    assert r.ledger.delta == 1e-4 and r.delta_rule == "given"
    assert not r.dp_release  # noise_seed: reproducible noise is not a DP release
    assert {x.mechanism for x in releases} == {"discrete_gaussian"}
    assert len(r.history) == 4 and r.history[1]["stats"]["noise_multiplier"] == r.noise_multiplier


def test_same_seed_same_output_different_seed_differs():
    a, b, c = run(key=1), run(key=1), run(key=2)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))


@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_resume_is_bit_identical_and_spends_once(tmp_path, stop_after):
    unbroken = run(key=3)
    partial = run(tmp_path, key=3, stop_after=stop_after)
    assert len(partial.ledger.releases) == 1 + stop_after
    resumed = run(tmp_path, key=3, resume=True)
    assert resumed.resumed_from == stop_after
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(unbroken.images))
    np.testing.assert_array_equal(resumed.labels, unbroken.labels)
    assert resumed.ledger == unbroken.ledger
    assert [r.iteration for r in resumed.ledger.releases] == [0, 1, 2, 3]
    # Resuming a finished run returns the released set without spending anything more.
    again = run(tmp_path, key=3, resume=True)
    assert again.resumed_from == 3 and again.ledger == unbroken.ledger
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(unbroken.images))


def test_resume_refuses_another_config(tmp_path):
    run(tmp_path, key=0, stop_after=1)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        run(tmp_path, key=0, resume=True, pe=dataclasses.replace(PE, k=1))
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        run(tmp_path, key=1, resume=True)


def test_checkpoints_hold_no_private_data(tmp_path):
    x, _ = private_data()
    run(tmp_path, key=0)
    for path in ckpt.list_checkpoints(tmp_path):
        arrays, meta = ckpt.load_checkpoint(path)
        assert all(n.startswith("samples") or n == "labels" for n in arrays)
        assert set(meta) <= {
            "iteration",
            "ledger",
            "class_sizes",
            "history",
            "fingerprint",
            "noise_multiplier",
            "noise_key",
            "noise_key_reproducible",
            "data_digest",
        }
        blob = b"".join(a.tobytes() for a in arrays.values())
        # No private row (as float32 bytes) appears anywhere in the checkpoint.
        for row in x[::7]:
            assert row.tobytes() not in blob


def test_public_class_proportions_spend_nothing_on_counts():
    r = run(
        privacy=PrivacyConfig(
            epsilon=2.0, delta=1e-4, noise_seed=0, class_proportions=(0.5, 0.25, 0.25)
        )
    )
    assert [x.description for x in r.ledger.releases] == ["vote histogram"] * 3
    assert r.class_sizes == (10, 7, 7)  # 4 each, the other 12 split 6:3:3
    assert r.ledger.epsilon("pld") == pytest.approx(2.0, rel=1e-3)


def test_budget_exceeded_is_refused_before_any_generation():
    gen = ToyGenerator()
    with pytest.raises(pejax.BudgetExceededError, match=r"above the target epsilon=0\.5"):
        run(
            generator=gen,
            privacy=PrivacyConfig(epsilon=0.5, delta=1e-4, noise_seed=0, noise_multiplier=2.0),
        )
    assert gen.calls["random"] == 0


def test_noise_multiplier_zero_is_not_private_but_runs():
    r = run(privacy=PrivacyConfig(epsilon=None, delta=1e-4, noise_seed=0, noise_multiplier=0.0))
    assert math.isinf(r.ledger.epsilon())


def test_user_level_run():
    x, y = private_data()
    groups = y * 1000 + np.arange(len(y)) // 3  # users of 1-3 samples, each within one class
    r = make(privacy=PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=0, user_level=True)).run(
        jax.random.key(0), x, y, group_ids=groups
    )
    assert {rel.neighboring_relation for rel in r.ledger.releases} == {"add_or_remove_one_group"}
    with pytest.raises(ValueError, match="needs group_ids"):
        make(privacy=PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=0, user_level=True)).run(
            jax.random.key(0), x, y
        )
    with pytest.raises(ValueError, match="user_level is False"):
        make().run(jax.random.key(0), x, y, group_ids=groups)


def test_lookahead_embeds_the_mean_of_L_variations_in_one_call():
    gen = ToyGenerator()
    samples = gen.random(jax.random.key(0), 1, 7)
    seen = []
    inner_variation = gen.variation

    def spy(key, s, label, degree):
        seen.append(s.shape[0])
        return inner_variation(key, s, label, degree)

    gen.variation = spy

    def embed(key, degree, rows):
        return np.asarray(
            engine.embed_candidates(
                key, samples, 1, degree, generator=gen, embedding=flat, lookahead=3, rows=rows
            )
        )

    emb = embed(jax.random.key(1), 0.5, 9)
    assert seen == [
        21
    ]  # one call for 3 variations of 7 candidates (a non-batching generator: exact size)
    assert emb.shape == (9, np.asarray(samples)[0].size)  # padded to the requested rows
    # Row i is the mean of the embeddings of rows i, 7 + i, 14 + i of that call's output.
    var = np.asarray(inner_variation(jax.random.key(1), np.tile(samples, (3, 1, 1, 1)), 1, 0.5))
    expected = var.reshape(3, 7, -1).mean(axis=0)
    np.testing.assert_allclose(emb[:7], expected, rtol=1e-6, atol=1e-6)
    # Degree 0 varies nothing: the lookahead embedding is the candidate's own.
    np.testing.assert_allclose(
        embed(jax.random.key(2), 0.0, 7), np.asarray(samples).reshape(7, -1), atol=1e-6
    )


def test_uniform_fallback_is_recorded():
    r = run(pe=dataclasses.replace(PE, threshold_sigmas=1000.0))
    assert all(r.history[1]["stats"]["uniform_fallback"])


def test_selection_concentrates_on_the_private_distribution():
    r = run(
        key=0,
        privacy=PrivacyConfig(epsilon=None, delta=1e-4, noise_seed=0, noise_multiplier=0.0),
        pe=dataclasses.replace(PE, iterations=4),
    )
    img = np.asarray(r.images)[..., 0]
    # Class y's bright rows are rows 2y, 2y+1: the synthetic images of each class are brightest there.
    for y in range(3):
        rows = img[r.labels == y].mean(axis=(0, 2))
        assert rows[2 * y : 2 * y + 2].mean() > np.delete(rows, [2 * y, 2 * y + 1]).mean()


class Flaky(ToyGenerator):
    name = "flaky"

    def __init__(self, failures):
        super().__init__()
        self.failures = failures

    def variation(self, key, samples, label, degree):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("service unavailable")
        return super().variation(key, samples, label, degree)


def test_transient_generator_failure_is_retried():
    with pytest.warns(GeneratorRetryWarning, match="retrying"):
        r = run(key=5, generator=Flaky(failures=1))
    np.testing.assert_array_equal(np.asarray(r.images), np.asarray(run(key=5).images))


def test_permanent_generator_failure_stops_with_checkpoint_intact(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeneratorRetryWarning)
        with pytest.raises(
            GeneratorError, match=r"generator 'flaky' failed in variation.*3 attempt"
        ):
            run(tmp_path, key=0, generator=Flaky(failures=10**6))
    _path, _, meta = ckpt.latest_valid_checkpoint(tmp_path)
    assert meta["iteration"] == 0
    # The generator (same name) recovers: resuming continues from the intact checkpoint.
    resumed = run(tmp_path, key=0, resume=True, generator=Flaky(failures=0))
    assert resumed.resumed_from == 0
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(run(key=0).images))


class Broken(ToyGenerator):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.name = f"broken-{mode}"

    def random(self, key, label, num_samples):
        out = super().random(key, label, num_samples)
        if self.mode == "count":
            return out[:-1]
        return out

    def to_images(self, samples):
        if self.mode == "nan":
            return samples.at[0, 0, 0, 0].set(jnp.nan)
        if self.mode == "shape":
            return samples[..., 0]
        if self.mode == "range":
            return samples * 255
        if self.mode == "dtype":
            return (samples * 255).astype(jnp.uint8)
        return samples


@pytest.mark.parametrize(
    "mode,match",
    [
        ("count", r"returned \[\d+\] samples from random.*expected"),
        ("nan", "NaN or Inf pixels"),
        ("shape", r"must return images of shape"),
        ("range", r"outside the documented range \[0, 1\]"),
        ("dtype", "must return float images"),
    ],
)
def test_malformed_generator_output_is_a_clear_error(mode, match):
    with pytest.raises(GeneratorError, match=match):
        run(generator=Broken(mode))


def test_generator_without_protocol_methods():
    class NoVariation:
        def random(self, key, label, n):
            return jnp.zeros((n, 2, 2, 1))

        def to_images(self, s):
            return s

    with pytest.raises(TypeError, match=r"has no method variation\(\)"):
        make(generator=NoVariation())


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, y: (x, np.where(y == 2, 5, y)), r"labels must lie in \[0, 3\)"),
        (lambda x, y: (x, np.where(y == 2, 0, y)), r"class\(es\) \[2\] have no private samples"),
        (lambda x, y: (np.where(x > 0.85, np.nan, x), y), "NaN or Inf"),
        (lambda x, y: (x[..., 0], y), r"shape \(n, H, W, C\)"),
        (lambda x, y: (x * 255, y), r"must lie in \[0, 1\]"),
        (lambda x, y: (x, y[:-1]), "one per image"),
        (lambda x, y: (x, y.astype(float)), "labels must be integers"),
        (lambda x, y: ((x * 255).astype(np.uint8), y), "divide uint8 images by 255"),
    ],
)
def test_bad_private_data(mutate, match):
    x, y = mutate(*private_data())
    with pytest.raises((ValueError, TypeError), match=match):
        make().run(jax.random.key(0), x, y)


def test_key_is_required_and_checked():
    x, y = private_data()
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        make().run(0, x, y)


def test_mismatched_embedding_dimension_is_caught():
    x, y = private_data()

    calls = []

    def bad_embedding(
        images,
    ):  # private images (embedded first, one call per class) get 30 dimensions
        calls.append(images.shape[0])
        return flat(images)[:, : 30 if len(calls) <= PE.num_classes else 36]

    with pytest.raises(ValueError, match="same embedding dimension"):
        PrivateEvolution(
            generator=ToyGenerator(), embedding=bad_embedding, pe=PE, privacy=PRIV
        ).run(jax.random.key(0), x, y)


def test_allocate():
    assert allocate(24, [0.5, 0.25, 0.25], 4) == (10, 7, 7)
    assert sum(allocate(1000, [0.1] * 10, 4)) == 1000
    with pytest.raises(ValueError, match="cannot give"):
        allocate(5, [0.5, 0.5], 4)


def test_weak_delta_warns():
    with pytest.warns(pejax.runner.WeakDeltaWarning, match=r"is >= 1/n"):
        run(privacy=PrivacyConfig(epsilon=2.0, delta=0.05, neighboring="replace_one"))


def test_user_level_requires_one_class_per_user_and_counts_users():
    x, y = private_data()
    groups = y * 1000 + np.arange(len(y)) // 3
    groups[0] = groups[-1]  # user spans class 0 and class 2
    with pytest.raises(
        ValueError, match=r"needs each user's samples in a single class.*classes \[0, 2\]"
    ):
        make(privacy=PrivacyConfig(epsilon=2.0, delta=1e-4, noise_seed=0, user_level=True)).run(
            jax.random.key(0), x, y, group_ids=groups
        )
    # One user holding every sample of class 1: the class count release sees 1 user, not 20 samples.
    groups = np.arange(len(y))
    groups[y == 1] = 10_000
    r = make(
        privacy=PrivacyConfig(
            epsilon=None, delta=1e-4, noise_seed=0, noise_multiplier=0.0, user_level=True
        )
    ).run(jax.random.key(0), x, y, group_ids=groups)
    assert r.history[0]["stats"]["noisy_class_counts"] == [30, 1, 25]


def test_bfloat16_votes_give_the_float32_run():
    """speed.precision='bfloat16' (exact re-check) reproduces the float32 run; refused with a mesh."""
    r32 = run()
    r16 = run(speed=SpeedConfig(retry_backoff_s=0.0, precision="bfloat16"))
    np.testing.assert_array_equal(np.asarray(r32.images), np.asarray(r16.images))
    with pytest.raises(ValueError, match=r"speed\.precision must be one of"):
        SpeedConfig(precision="float8")
    with pytest.raises(ValueError, match="not supported by PrivateEvolution with a device mesh"):
        make(speed=SpeedConfig(precision="bfloat16"), mesh=jax.make_mesh((1,), ("data",)))


def test_host_backend_votes_give_the_xla_run():
    """speed.backend='blas' (and 'faiss' when installed) reproduces the XLA run; refused with a mesh."""
    r = run()
    backends = ["blas"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    for backend in backends:
        rb = run(speed=SpeedConfig(retry_backoff_s=0.0, backend=backend))
        np.testing.assert_array_equal(np.asarray(r.images), np.asarray(rb.images))
    with pytest.raises(ValueError, match="cannot vote over a device mesh"):
        make(speed=SpeedConfig(backend="blas"), mesh=jax.make_mesh((1,), ("data",)))


def test_progress_bar_shows_a_remote_generators_usage(capsys):
    class Counting(ToyGenerator):
        name = "counting"

        def usage(self):
            return {
                "requests": 12,
                "retries": 2,
                "prompt_tokens": 300,
                "completion_tokens": 45,
                "cost": 0.0125,
            }

    x, y = private_data()
    make(generator=Counting(), progress=True).run(jax.random.key(0), x, y)
    err = capsys.readouterr().err
    assert "req=12" in err and "retries=2" in err and "tok=345" in err and "cost=0.0125" in err
