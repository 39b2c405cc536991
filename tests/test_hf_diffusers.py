"""Diffusers adapters on tiny random pipelines saved to disk and loaded back with from_pretrained(path)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs pejax[diffusers]")
diffusers = pytest.importorskip("diffusers", reason="needs pejax[diffusers]")
transformers = pytest.importorskip("transformers", reason="needs pejax[diffusers]")

from _tiny_models import tiny_stable_diffusion  # noqa: E402

from pejax.config import PEConfig  # noqa: E402
from pejax.config import PrivacyConfig  # noqa: E402
from pejax.config import SpeedConfig  # noqa: E402
from pejax.embeddings import pixel_embedding  # noqa: E402
from pejax.generators.hf_diffusers import DiffusersGenerator  # noqa: E402
from pejax.generators.hf_diffusers import StableDiffusionGenerator  # noqa: E402
from pejax.runner import PrivateEvolution  # noqa: E402

STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny models on a shared 2-core machine: OpenMP threads fighting over busy cores make each small kernel
    # 100x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet(num_class_embeds=None):
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


@pytest.fixture(scope="module")
def ddim_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ddim")
    diffusers.DDIMPipeline(
        unet=_unet(num_class_embeds=2), scheduler=diffusers.DDIMScheduler()
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ddpm_path(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ddpm")
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    pipe = tiny_stable_diffusion(text_layers=2)
    path = tmp_path_factory.mktemp("sd")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ddim(ddim_path):
    return DiffusersGenerator.from_pretrained(ddim_path, num_inference_steps=STEPS, batch_size=4)


@pytest.fixture(scope="module")
def sd(sd_path):
    return StableDiffusionGenerator.from_pretrained(
        sd_path,
        prompts=["a photo of a cat", "a photo of a dog"],
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        batch_size=3,
    )


def _dist(a, b):
    return float(jnp.sqrt(((jnp.asarray(a) - jnp.asarray(b)) ** 2).sum(axis=(1, 2, 3))).mean())


def _check_images(x, shape):
    assert x.shape == shape and x.dtype == jnp.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and bool(jnp.isfinite(x).all())


def test_ddim_random_shapes_and_seeding(ddim):
    assert ddim.num_classes == 2 and ddim.image_shape == (8, 8, 1)
    key = jax.random.key(0)
    x = ddim.random(key, 1, 6)
    _check_images(x, (6, 8, 8, 1))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ddim.random(key, 1, 6)))
    # Sample i depends on fold_in(key, i) only: a shorter call is a prefix, whatever the batching.
    np.testing.assert_allclose(np.asarray(ddim.random(key, 1, 3)), np.asarray(x[:3]), atol=1e-5)
    assert _dist(x, ddim.random(jax.random.key(1), 1, 6)) > 0.1
    assert (
        _dist(x, ddim.random(key, 0, 6)) > 0.01
    )  # class-conditional: the label changes the images
    assert ddim.random(key, 0, 0).shape == (0, 8, 8, 1)


def test_ddim_variation_degree(ddim):
    x = ddim.random(jax.random.key(0), 0, 6)
    key = jax.random.key(5)
    np.testing.assert_array_equal(np.asarray(ddim.variation(key, x, 0, 0.0)), np.asarray(x))
    # Below one step of the schedule nothing runs either.
    np.testing.assert_array_equal(np.asarray(ddim.variation(key, x, 0, 0.05)), np.asarray(x))
    v = {d: ddim.variation(key, x, 0, d) for d in (0.2, 0.5, 1.0)}
    for out in v.values():
        _check_images(out, x.shape)
    d = [_dist(v[k], x) for k in (0.2, 0.5, 1.0)]
    assert 0 < d[0] < d[1] < d[2], d
    np.testing.assert_array_equal(np.asarray(v[0.5]), np.asarray(ddim.variation(key, x, 0, 0.5)))


def test_ddpm_unconditional_is_stochastic_but_seeded(ddpm_path):
    gen = DiffusersGenerator.from_pretrained(
        ddpm_path, num_inference_steps=STEPS, batch_size=2, progress=True
    )
    assert gen.num_classes is None and gen.name.startswith("diffusers:DDPMPipeline")
    key = jax.random.key(3)
    x = gen.random(key, 0, 4)
    _check_images(x, (4, 8, 8, 1))
    # DDPM draws noise at every step; per-sample generators keep it reproducible and batch-independent.
    np.testing.assert_allclose(np.asarray(gen.random(key, 7, 4)), np.asarray(x), atol=1e-5)
    gen.batch_size = 4
    np.testing.assert_allclose(np.asarray(gen.random(key, 0, 4)), np.asarray(x), atol=1e-5)
    vkey = jax.random.key(4)  # not the key of x: the same key would replay x's own noise
    d = [_dist(gen.variation(vkey, x, 0, deg), x) for deg in (0.2, 0.5, 1.0)]
    assert d[0] < d[1] < d[2], d


def test_stable_diffusion_random_and_variation(sd):
    assert sd.image_shape == (16, 16, 3)
    key = jax.random.key(0)
    x = sd.random(key, 0, 4)
    _check_images(x, (4, 16, 16, 3))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(sd.random(key, 0, 4)))
    np.testing.assert_allclose(np.asarray(sd.random(key, 0, 2)), np.asarray(x[:2]), atol=1e-4)
    assert _dist(x, sd.random(key, 1, 4)) > 1e-3  # the prompt matters
    vkey = jax.random.key(1)
    np.testing.assert_array_equal(np.asarray(sd.variation(vkey, x, 0, 0.0)), np.asarray(x))
    v = {d: sd.variation(vkey, x, 0, d) for d in (0.2, 0.5, 1.0)}
    for out in v.values():
        _check_images(out, x.shape)
    np.testing.assert_array_equal(np.asarray(v[0.5]), np.asarray(sd.variation(vkey, x, 0, 0.5)))
    # Any positive strength goes through the (random, untrained) VAE, so distances are measured from the
    # VAE's reconstruction of the input: with real weights the reconstruction is close to the input itself.
    vae = sd.pipeline.vae
    with torch.no_grad():
        t = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) * 2 - 1
        latents = vae.encode(t).latent_dist.mode()
        rec = ((vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    d = [_dist(v[k], rec) for k in (0.2, 0.5, 1.0)]
    assert d[0] < d[1] < d[2], d


def test_errors(tmp_path, ddim_path, sd_path, ddim):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusersGenerator.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"model_index\.json"):
        DiffusersGenerator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="StableDiffusionGenerator"):
        DiffusersGenerator.from_pretrained(sd_path)
    with pytest.raises(ValueError, match="DiffusersGenerator"):
        StableDiffusionGenerator.from_pretrained(ddim_path, prompts=["x"])
    with pytest.raises(TypeError, match="one per class"):
        StableDiffusionGenerator.from_pretrained(sd_path, prompts="a cat")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline'"):
        DiffusersGenerator.from_pretrained(bad)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="out of range"):
        ddim.random(key, 2, 1)
    x = ddim.random(key, 0, 1)
    with pytest.raises(ValueError, match=r"degree must lie in \[0, 1\]"):
        ddim.variation(key, x, 0, 1.5)
    with pytest.raises(ValueError, match=r"shape \(N, 8, 8, 1\)"):
        ddim.variation(key, jnp.zeros((1, 16, 16, 1)), 0, 0.5)
    with pytest.raises(TypeError, match=r"jax\.random key"):
        ddim.random(0, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        DiffusersGenerator.from_pretrained(ddim_path, dtype="float64")


def _check_ledger(result, sigma, delta, iterations):
    releases = result.ledger.releases
    assert [r.iteration for r in releases] == list(range(1, iterations + 1))
    assert [r.description for r in releases] == ["vote histogram"] * iterations
    assert all(r.noise_multiplier == sigma for r in releases)
    assert result.noise_multiplier == sigma
    # The run releases the discrete Gaussian (k = 1: one unit change per release): dp-accounting's own PLD.
    pld = dp_accounting.pld.privacy_loss_distribution.from_discrete_gaussian_mechanism(
        sigma, value_discretization_interval=1e-4
    ).self_compose(iterations)
    assert result.ledger.epsilon("pld") == pytest.approx(pld.get_epsilon_for_delta(delta), rel=1e-6)


@pytest.mark.slow
def test_full_pe_run_through_ddim(ddim):
    rng = np.random.default_rng(0)
    private = rng.uniform(size=(20, 8, 8, 1)).astype(np.float32)
    labels = np.repeat([0, 1], 10).astype(np.int32)
    sigma, delta = 3.0, 1e-5
    runner = PrivateEvolution(
        generator=ddim,
        embedding=pixel_embedding,
        pe=PEConfig(
            num_classes=2,
            samples_per_iteration=8,
            iterations=2,
            degrees=(0.6, 0.3),
            final_degree=0.2,
        ),
        privacy=PrivacyConfig(
            epsilon=None, noise_multiplier=sigma, delta=delta, class_proportions=(0.5, 0.5)
        ),
        speed=SpeedConfig(retry_backoff_s=0.0),
    )
    result = runner.run(jax.random.key(0), private, labels)
    assert result.images.shape == (8, 8, 8, 1) and result.labels.tolist() == [0] * 4 + [1] * 4
    _check_ledger(result, sigma, delta, 2)


@pytest.mark.slow
def test_full_pe_run_through_stable_diffusion(sd):
    rng = np.random.default_rng(1)
    private = rng.uniform(size=(12, 16, 16, 3)).astype(np.float32)
    labels = np.repeat([0, 1], 6).astype(np.int32)
    sigma, delta = 2.0, 1e-4
    runner = PrivateEvolution(
        generator=sd,
        embedding=pixel_embedding,
        pe=PEConfig(num_classes=2, samples_per_iteration=8, iterations=2, degrees=(0.6, 0.3)),
        privacy=PrivacyConfig(
            epsilon=None, noise_multiplier=sigma, delta=delta, class_proportions=(0.5, 0.5)
        ),
        speed=SpeedConfig(retry_backoff_s=0.0),
    )
    result = runner.run(jax.random.key(1), private, labels)
    assert result.images.shape == (8, 16, 16, 3)
    _check_ledger(result, sigma, delta, 2)
