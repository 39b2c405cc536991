"""Tests of the Flax diffusion generator: schedules, samplers, SDEdit variation, checkpoints, a PE run.

Independent references: schedules in NumPy float64 from the papers' formulas; the samplers against a NumPy
float64 re-implementation of the generalised DDIM update driven by an analytic denoiser (the exact noise
prediction for Gaussian data), whose samples must also follow the data distribution when the step count is
large.
"""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compiles import count_compiles

pytest.importorskip("flax", reason="needs pejax[flax]")
pytest.importorskip("orbax.checkpoint", reason="needs pejax[flax]")

from flax import nnx
from scipy.optimize import brentq
from scipy.stats import norm

from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.embeddings import get_embedding
from pejax.generators import Generator
from pejax.generators import diffusion
from pejax.generators.diffusion import FlaxDiffusionGenerator
from pejax.generators.diffusion import ModelCheckpointError
from pejax.generators.diffusion import ScheduleConfig
from pejax.generators.unet import UNet
from pejax.generators.unet import UNetConfig
from pejax.runner import PrivateEvolution

SIZE = 8
N = 7  # awkward on purpose; padded to a compiled batch of 8
# Two resolutions, attention, 3 classes; few distinct parameter shapes (each costs an initialiser compile).
TINY = UNetConfig(
    image_size=SIZE, base_channels=8, channel_mults=(1, 1), num_classes=3, attention=True
)
SCHED = ScheduleConfig(kind="cosine", num_timesteps=100)


@pytest.fixture(scope="module")
def unet():
    model = UNet(TINY, rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.conv_out.kernel[...]).max()) == 0.0  # an untrained UNet predicts 0

    # Perturb the parameters so that the model predicts non-trivial noise (NumPy noise: no compilations).
    rng = np.random.default_rng(1)
    state = nnx.state(model, nnx.Param)
    nnx.update(
        model,
        jax.tree_util.tree_map(
            lambda a: jnp.asarray(np.asarray(a) + 0.05 * rng.normal(size=a.shape), a.dtype), state
        ),
    )
    return model


@pytest.fixture(scope="module")
def gen(unet):
    return FlaxDiffusionGenerator(
        unet, image_shape=(SIZE, SIZE, 1), num_steps=6, schedule=SCHED, batch_size=8
    )


@pytest.fixture(scope="module")
def images(gen):
    return gen.random(jax.random.key(0), 1, N)


# ------------------------------------------------------------------------------------------------ schedules


def test_linear_schedule_matches_ddpm():
    s = diffusion.linear_schedule(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-5)
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)  # DDPM's abar_T
    assert s.betas.dtype == jnp.float32 and s.alphas_cumprod.shape == (1000,)


@pytest.mark.parametrize("T", [2, 37, 1000])
def test_cosine_schedule_matches_formula(T):
    s = diffusion.cosine_schedule(T)
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = np.minimum([1 - f[t + 1] / f[t] for t in range(T)], 0.999)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5, atol=1e-9)
    ab = np.asarray(s.alphas_cumprod, np.float64)
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
    assert float(s.betas[-1]) == pytest.approx(0.999)  # f(T) = 0: clipped


def test_schedule_monotone_and_config_roundtrip():
    for cfg in (ScheduleConfig(kind="linear", num_timesteps=50), ScheduleConfig()):
        ab = np.asarray(cfg.build().alphas_cumprod)
        assert np.all(np.diff(ab) < 0)
        assert ScheduleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"schedule\.kind"):
        ScheduleConfig(kind="sigmoid")
    with pytest.raises(ValueError, match="beta_end"):
        diffusion.linear_schedule(10, beta_end=1.5)
    with pytest.raises(ValueError, match="keys among"):
        ScheduleConfig.from_dict({"kind": "cosine", "bogus": 1})


def test_add_noise_and_sampling_grid():
    s = diffusion.linear_schedule(10)
    x0, noise, t = jnp.ones((2, 3)), jnp.full((2, 3), 2.0), jnp.array([0, 9])
    ab = np.asarray(s.alphas_cumprod)[[0, 9]][:, None]
    np.testing.assert_allclose(
        diffusion.add_noise(s, x0, t, noise),
        np.broadcast_to(np.sqrt(ab) + 2 * np.sqrt(1 - ab), (2, 3)),
        rtol=1e-6,
    )
    assert diffusion.sampling_grid(1000, 5).tolist() == [999, 749, 500, 250, 0]
    assert diffusion.sampling_grid(1000, 10, 0.3).tolist() == [300, 150, 0]
    assert diffusion.sampling_grid(1000, 10, 0.01).tolist() == [10]
    assert diffusion.sampling_grid(10, 50, 0.2).tolist() == [2, 1, 0]  # distinct timesteps only
    for strength in (0.05, 0.5, 1.0):
        g = diffusion.sampling_grid(100, 13, strength)
        assert g[0] == round(strength * 99) and np.all(np.diff(g) < 0)
        assert g[-1] == 0 or len(g) == 1  # one step goes from t0 straight to the clean image
    with pytest.raises(ValueError, match="strength"):
        diffusion.sampling_grid(100, 10, 1.5)


# ---------------------------------------------------------------------------------------- the generator


def test_protocol_shapes_ranges_and_same_key(gen, images):
    assert isinstance(gen, Generator)
    assert images.shape == (N, SIZE, SIZE, 1) and images.dtype == jnp.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.01  # not a constant image
    np.testing.assert_array_equal(gen.random(jax.random.key(0), 1, N), images)
    assert not np.array_equal(gen.random(jax.random.key(1), 1, N), images)
    assert not np.array_equal(gen.random(jax.random.key(0), 2, N), images)  # class-conditional
    v = gen.variation(jax.random.key(5), images, 1, 0.5)
    assert v.shape == images.shape and v.dtype == jnp.float32
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    np.testing.assert_array_equal(gen.variation(jax.random.key(5), images, 1, 0.5), v)
    np.testing.assert_array_equal(gen.to_images(images), images)


def test_degree_zero_returns_input_and_distance_grows(gen, images):
    np.testing.assert_array_equal(gen.variation(jax.random.key(3), images, 1, 0.0), images)
    dist = []
    for degree in (0.0, 0.3, 0.7):
        v = gen.variation(jax.random.key(3), images, 1, degree)
        dist.append(float(jnp.sqrt(jnp.mean((v - images) ** 2))))
    assert dist[0] == 0.0 < dist[1] < dist[2], dist


def test_sample_i_depends_only_on_key_and_i(unet, gen, images):
    # A prefix of a request equals a shorter request; another batch size gives the same samples.
    np.testing.assert_array_equal(gen.random(jax.random.key(0), 1, 5), images[:5])
    small = FlaxDiffusionGenerator(
        unet, image_shape=(SIZE, SIZE, 1), num_steps=6, schedule=SCHED, batch_size=3
    )
    np.testing.assert_allclose(small.random(jax.random.key(0), 1, N), images, atol=1e-5)


def test_not_retraced_within_a_bucket(unet, gen, images):
    keys = [jax.random.key(i) for i in range(3)]
    host = np.asarray(images)
    gen.random(keys[0], 0, 5)
    # 5, 6 and 3 rows share the 8-row bucket; degrees are not static arguments.
    with count_compiles() as compiles:
        gen.random(keys[1], 2, 6)
        gen.variation(keys[2], host, 0, 0.2)
        gen.variation(keys[2], host[:3], 0, 0.9)
    # The sampler (the whole trajectory, the one costly program) is not compiled again. Small eager ops on
    # the unpadded rows still compile per row count (issue 13's compile-count work removes them).
    assert compiles.of("_sample") == [], compiles.names
    # The check can fail: another number of sampler steps is another program.
    other = FlaxDiffusionGenerator(
        unet, image_shape=(SIZE, SIZE, 1), num_steps=5, schedule=SCHED, batch_size=8
    )
    with count_compiles() as compiles:
        other.random(keys[1], 2, 6)
    assert len(compiles.of("_sample")) == 1, compiles.names


def test_ddpm_sampler_is_stochastic_per_step(unet, images):
    ddpm = FlaxDiffusionGenerator(
        unet, image_shape=(SIZE, SIZE, 1), num_steps=6, schedule=SCHED, sampler="ddpm", batch_size=8
    )
    x = ddpm.random(jax.random.key(0), 1, N)
    assert x.shape == images.shape and not np.array_equal(x, images)
    np.testing.assert_array_equal(ddpm.random(jax.random.key(0), 1, N), x)


# ------------------------------------------------------------------- exact reference: a Gaussian denoiser


class GaussianDenoiser(nnx.Module):
    """The exact noise prediction when every pixel of x0 is N(mu, s^2) (an unconditional 'any' nnx model)."""

    def __init__(self, alphas_cumprod, mu: float, s: float):
        self.ab = nnx.Variable(jnp.asarray(alphas_cumprod))
        self.mu, self.s = mu, s

    def __call__(self, x, t, y=None):
        assert y is None
        ab = self.ab[...][t][:, None, None, None]
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * self.mu) / (ab * self.s**2 + 1 - ab)


def _reference(x0, keys, grid, ab_all, eta, mu, s, strength):
    """NumPy float64 generalised-DDIM sampler with the analytic Gaussian denoiser."""
    ab_all = np.asarray(ab_all, np.float64)
    shape = x0.shape[1:]
    z = [
        [np.asarray(jax.random.normal(jax.random.fold_in(k, j), shape), np.float64) for k in keys]
        for j in range(len(grid) + 1)
    ]
    a0 = 0.0 if strength == 1.0 else ab_all[grid[0]]
    x = np.sqrt(a0) * x0 + np.sqrt(1 - a0) * np.stack(z[0])
    for j, t in enumerate(grid):
        ab_t = ab_all[t]
        ab_s = ab_all[grid[j + 1]] if j + 1 < len(grid) else 1.0
        eps = np.sqrt(1 - ab_t) * (x - np.sqrt(ab_t) * mu) / (ab_t * s**2 + 1 - ab_t)
        x0_hat = np.clip((x - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t), -1, 1)
        eps = (x - np.sqrt(ab_t) * x0_hat) / np.sqrt(1 - ab_t)
        sigma = eta * np.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = (
            np.sqrt(ab_s) * x0_hat
            + np.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
            + sigma * np.stack(z[j + 1])
        )
    return np.clip((np.clip(x, -1, 1) + 1) / 2, 0, 1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_matches_float64_reference(sampler):
    sched = ScheduleConfig(kind="linear", num_timesteps=200)
    ab = np.asarray(sched.build().alphas_cumprod)
    mu, s = -0.2, 0.3
    model = GaussianDenoiser(ab, mu, s)
    g = FlaxDiffusionGenerator(
        model, image_shape=(3, 2, 1), num_steps=9, sampler=sampler, schedule=sched, batch_size=8
    )
    assert g.class_conditional is False
    key = jax.random.key(4)
    keys = [jax.random.fold_in(key, i) for i in range(5)]
    eta = 0.0 if sampler == "ddim" else 1.0
    out = g.random(key, 7, 5)  # an unconditional model ignores the label
    ref = _reference(
        np.zeros((5, 3, 2, 1)), keys, diffusion.sampling_grid(200, 9), ab, eta, mu, s, 1.0
    )
    np.testing.assert_allclose(out, ref, atol=2e-5)
    x0 = np.asarray(out, np.float64) * 2 - 1
    var = g.variation(key, out, 0, 0.4)
    ref = _reference(x0, keys, diffusion.sampling_grid(200, 9, 0.4), ab, eta, mu, s, 0.4)
    np.testing.assert_allclose(var, ref, atol=2e-5)


def test_many_step_samples_follow_the_data_distribution():
    sched = ScheduleConfig(kind="linear", num_timesteps=1000)
    mu, s = -0.2, 0.3
    model = GaussianDenoiser(sched.build().alphas_cumprod, mu, s)
    g = FlaxDiffusionGenerator(
        model, image_shape=(4, 4, 1), num_steps=1000, sampler="ddpm", schedule=sched, batch_size=256
    )
    x = np.asarray(g.random(jax.random.key(0), 0, 256)) * 2 - 1  # 4096 pixels ~ N(mu, s^2)
    assert abs(x.mean() - mu) < 0.02 and abs(x.std() - s) < 0.015
    v = np.asarray(g.variation(jax.random.key(1), (x + 1) / 2, 0, 0.5)) * 2 - 1
    assert abs(v.mean() - mu) < 0.02 and abs(v.std() - s) < 0.015  # SDEdit keeps the distribution


# ------------------------------------------------------------------------------------------- validation


def test_argument_errors(unet, gen, images):
    kw = {"image_shape": (SIZE, SIZE, 1), "num_steps": 4, "schedule": SCHED}
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        FlaxDiffusionGenerator(lambda x, t, y: x, **kw)
    with pytest.raises(ValueError, match="image_shape"):
        FlaxDiffusionGenerator(unet, **{**kw, "image_shape": (SIZE, SIZE, 2)})
    with pytest.raises(ValueError, match="cannot be called"):
        FlaxDiffusionGenerator(unet, **{**kw, "image_shape": (16, 16, 1)})
    with pytest.raises(ValueError, match="cannot be called"):
        FlaxDiffusionGenerator(unet, **kw, class_conditional=False)
    with pytest.raises(ValueError, match="sampler"):
        FlaxDiffusionGenerator(unet, **kw, sampler="euler")
    with pytest.raises(ValueError, match="num_steps"):
        FlaxDiffusionGenerator(unet, **{**kw, "num_steps": 101})
    with pytest.raises(TypeError, match="key is required"):
        gen.random(None, 0, 3)
    with pytest.raises(ValueError, match="label"):
        gen.random(jax.random.key(0), 3, 3)
    with pytest.raises(ValueError, match="num_samples"):
        gen.random(jax.random.key(0), 0, 0)
    with pytest.raises(ValueError, match=r"degree must lie in \[0, 1\]"):
        gen.variation(jax.random.key(0), images, 0, 1.5)
    with pytest.raises(ValueError, match="degree"):
        gen.variation(jax.random.key(0), images, 0, -0.1)
    with pytest.raises(ValueError, match="shape"):
        gen.variation(jax.random.key(0), images[..., 0], 0, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gen.variation(jax.random.key(0), images * 3, 0, 0.5)


def test_degree_to_strength(unet, images):
    g = FlaxDiffusionGenerator(
        unet,
        image_shape=(SIZE, SIZE, 1),
        num_steps=6,
        schedule=SCHED,
        batch_size=8,
        degree_to_strength=lambda d: 1 - math.exp(-d),
    )
    assert g.strength(0.0) == 0.0 and g.strength(2.0) == pytest.approx(1 - math.exp(-2))
    assert g.variation(jax.random.key(0), images, 0, 3.0).shape == images.shape
    bad = FlaxDiffusionGenerator(
        unet, image_shape=(SIZE, SIZE, 1), num_steps=6, schedule=SCHED, degree_to_strength=abs
    )
    with pytest.raises(ValueError, match="degree_to_strength"):
        bad.variation(jax.random.key(0), images, 0, 2.0)


def test_unet_config_shapes_and_errors():
    cfg = UNetConfig.from_dict(json.loads(json.dumps(TINY.to_dict())))
    assert cfg == TINY
    abstract = nnx.eval_shape(lambda: UNet(UNetConfig(image_size=16, channels=3), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    x = jax.ShapeDtypeStruct((5, 16, 16, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((5,), jnp.int32)

    def call(state, x, t, y=None):
        return nnx.merge(graphdef, state)(x, t, y)

    eps = jax.eval_shape(call, state, x, t)
    assert eps.shape == (5, 16, 16, 3) and eps.dtype == jnp.float32
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(call, state, x, t, t)
    with pytest.raises(ValueError, match="x must have shape"):
        jax.eval_shape(call, state, jax.ShapeDtypeStruct((5, 8, 8, 3), jnp.float32), t)
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=10, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(base_channels=12, groups=8)
    with pytest.raises(ValueError, match="unknown UNetConfig"):
        UNetConfig.from_dict({"image_size": 16, "depth": 3})


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("params_format", ["orbax", "msgpack"])
def test_checkpoint_roundtrip_gives_identical_outputs(unet, gen, images, tmp_path, params_format):
    path = diffusion.save_checkpoint(
        tmp_path / "model",
        unet,
        image_shape=(SIZE, SIZE, 1),
        schedule=SCHED,
        params_format=params_format,
        metadata={"steps": 0},
    )
    doc = json.loads((path / "config.json").read_text())
    assert (
        doc["unet"] == TINY.to_dict() and doc["num_classes"] == 3 and doc["params"] == params_format
    )
    loaded = FlaxDiffusionGenerator.from_checkpoint(path, num_steps=6, batch_size=8)
    assert loaded.schedule == SCHED and loaded.class_conditional and loaded.num_classes == 3
    assert loaded.image_shape == (SIZE, SIZE, 1)
    for a, b in zip(
        jax.tree_util.tree_leaves(nnx.state(unet)),
        jax.tree_util.tree_leaves(nnx.state(loaded.model)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.random(jax.random.key(0), 1, N), images)
    np.testing.assert_array_equal(
        loaded.variation(jax.random.key(2), images, 1, 0.5),
        gen.variation(jax.random.key(2), images, 1, 0.5),
    )
    with pytest.raises(FileExistsError):
        diffusion.save_checkpoint(path, unet, image_shape=(SIZE, SIZE, 1), schedule=SCHED)


def test_missing_and_corrupt_checkpoints(unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FlaxDiffusionGenerator.from_checkpoint(tmp_path / "nope", num_steps=4)
    kw = {"image_shape": (SIZE, SIZE, 1), "schedule": SCHED}
    good = diffusion.save_checkpoint(tmp_path / "good", unet, **kw)
    bigger_cfg = UNetConfig(**{**TINY.to_dict(), "base_channels": 16})
    bigger = nnx.eval_shape(lambda: UNet(bigger_cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ModelCheckpointError, match=r"do not fit.*conv_in/kernel"):
        FlaxDiffusionGenerator.from_checkpoint(good, num_steps=4, model=bigger)

    def broken(name, fmt="orbax"):
        p = tmp_path / name
        shutil.copytree(tmp_path / ("good" if fmt == "orbax" else "good_msgpack"), p)
        return p

    diffusion.save_checkpoint(tmp_path / "good_msgpack", unet, params_format="msgpack", **kw)
    p = broken("no_config")
    (p / "config.json").unlink()
    with pytest.raises(ModelCheckpointError, match=r"no config\.json"):
        FlaxDiffusionGenerator.from_checkpoint(p, num_steps=4)
    p = broken("bad_json")
    (p / "config.json").write_text("{not json")
    with pytest.raises(ModelCheckpointError, match="not valid JSON"):
        FlaxDiffusionGenerator.from_checkpoint(p, num_steps=4)
    p = broken("wrong_arch")
    doc = json.loads((p / "config.json").read_text())
    doc["unet"]["channel_mults"] = [1, 2]
    (p / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelCheckpointError, match="do not fit"):
        FlaxDiffusionGenerator.from_checkpoint(p, num_steps=4)
    p = broken("no_params")
    shutil.rmtree(p / "params")
    with pytest.raises(ModelCheckpointError, match="incomplete"):
        FlaxDiffusionGenerator.from_checkpoint(p, num_steps=4)
    p = broken("damaged")
    for f in (p / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"garbage")
    with pytest.raises(ModelCheckpointError, match="unreadable or damaged"):
        FlaxDiffusionGenerator.from_checkpoint(p, num_steps=4)
    p = broken("truncated", "msgpack")
    data = (p / "params.msgpack").read_bytes()
    (p / "params.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelCheckpointError, match="unreadable or damaged"):
        FlaxDiffusionGenerator.from_checkpoint(p, num_steps=4)


# ---------------------------------------------------------------------------------------- a full PE run


def test_pe_run_two_iterations_through_the_adapter(gen):
    from pejax.data import load_digits_split

    split = load_digits_split()
    keep = split.train_labels < 3
    images, labels = split.train_images[keep][:150], split.train_labels[keep][:150]
    pe = PEConfig(
        num_classes=3,
        samples_per_iteration=24,
        iterations=2,
        k=1,
        lookahead_degree=1,
        degrees=(0.5, 0.2),
        final_samples_per_class=8,
        final_degree=0.1,
    )
    runner = PrivateEvolution(
        generator=gen,
        embedding=get_embedding("resize", size=(8, 8), channels=1),
        pe=pe,
        privacy=PrivacyConfig(epsilon=2.0, delta=1e-4),
    )
    result = runner.run(jax.random.key(0), images, labels)
    assert result.images.shape == (24, SIZE, SIZE, 1)
    assert np.bincount(result.labels).tolist() == [8, 8, 8]
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    releases = result.ledger.releases
    assert [r.iteration for r in releases] == [0, 1, 2]
    assert releases[0].description == "class counts"
    assert all(r.sensitivity == 1.0 for r in releases)
    assert all(r.noise_multiplier == result.noise_multiplier for r in releases[1:])
    assert result.ledger.delta == 1e-4
    eps = result.ledger.epsilons()["pld"]
    assert 1.95 < eps <= 2.0 + 1e-9
    # Independent check: the releases compose to Gaussian DP with mu = sqrt(sum sigma_i^-2), whose exact
    # (epsilon, delta) curve is delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
    mu = math.sqrt(sum(r.noise_multiplier**-2 for r in releases))
    delta = result.ledger.delta

    def gap(e):
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta

    assert brentq(gap, 1e-6, 50) == pytest.approx(eps, rel=1e-3)
