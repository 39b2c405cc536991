"""Text codec, and the causal-LM text generator on a tiny GPT-2 saved to disk and loaded back."""

import difflib
import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_models import byte_bpe_tokenizer
from _tiny_models import tiny_gpt2

import pejax.runner
from pejax.generators import ImageGenerator
from pejax.generators import TextGenerator
from pejax.generators.text_codec import decode_texts
from pejax.generators.text_codec import encode_texts

# ---------------------------------------------------------------------------------------------- codec


def test_codec_round_trip_and_padding():
    texts = ["hello", "", "héllo wörld ✓", "naïve café"]
    arr = encode_texts(texts, 32)
    assert arr.shape == (4, 32) and arr.dtype == np.uint8
    assert decode_texts(arr) == texts
    assert (arr[1] == 0).all() and arr[0, 5:].sum() == 0
    assert decode_texts(jnp.asarray(arr)) == texts
    assert encode_texts([], 8).shape == (0, 8) and decode_texts(np.zeros((0, 8), np.uint8)) == []


@pytest.mark.parametrize("max_bytes", range(1, 12))
def test_codec_truncates_on_character_boundaries(max_bytes):
    text = "aé✓😀b"  # 1 + 2 + 3 + 4 + 1 bytes
    out = decode_texts(encode_texts([text], max_bytes))[0]
    assert text.startswith(out)
    assert len(out.encode()) <= max_bytes
    assert len(out.encode()) > max_bytes - 4  # only the straddling character is dropped
    assert "\ufffd" not in out


def test_codec_drops_nul_and_replaces_malformed_bytes():
    assert decode_texts(encode_texts(["a\x00b"], 4)) == ["ab"]
    bad = np.array([[0xC3, 0x28, 0, 0]], np.uint8)
    assert decode_texts(bad) == ["\ufffd("]


def test_codec_errors():
    with pytest.raises(TypeError, match=r"wrap a single text as \[text\]"):
        encode_texts("abc", 4)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        encode_texts(["a", 3], 4)
    with pytest.raises(ValueError, match="max_bytes"):
        encode_texts(["a"], 0)
    with pytest.raises(ValueError, match="2-D"):
        decode_texts(np.zeros(4, np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        decode_texts(np.zeros((1, 4), np.int32))


# ---------------------------------------------------------------------------------------------- generator

CORPUS = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "rain falls on the old town",
    "the sun is warm today",
    "birds sing in the morning",
    "the river flows to the sea",
]


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="needs pejax[text]")
    pytest.importorskip("transformers", reason="needs pejax[text]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is far faster
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm_path(torch, tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few sentences and a one-layer random GPT-2, saved to disk."""
    fast = byte_bpe_tokenizer(CORPUS)
    model = tiny_gpt2(len(fast))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


PROMPTS = ["A sentence about the weather:", "A sentence about animals:"]


@pytest.fixture(scope="module")
def gen(lm_path):
    from pejax.generators.text import CausalLMTextGenerator

    return CausalLMTextGenerator.from_pretrained(
        lm_path, prompts=PROMPTS, max_new_tokens=12, max_bytes=96, batch_size=3
    )


def _word_distance(a: str, b: str) -> float:
    return 1.0 - difflib.SequenceMatcher(a=a.split(), b=b.split()).ratio()


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def test_random_shapes_and_seeding(gen):
    assert gen.modality == "text"
    key = jax.random.key(0)
    s = gen.random(key, 0, 5)
    assert s.shape == (5, 96) and s.dtype == jnp.uint8
    texts = gen.to_texts(s)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(gen.random(key, 0, 5)))
    # Text i depends on fold_in(key, i) only: a shorter call is a prefix, whatever the batching.
    np.testing.assert_array_equal(np.asarray(gen.random(key, 0, 2)), np.asarray(s[:2]))
    assert gen.to_texts(gen.random(jax.random.key(1), 0, 5)) != texts
    assert gen.random(key, 1, 0).shape == (0, 96)


def test_top_k_and_top_p_filter_before_sampling(lm_path):
    from pejax.generators.text import CausalLMTextGenerator

    # With one token left after filtering, sampling is greedy decoding: every key gives the same text.
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        g = CausalLMTextGenerator.from_pretrained(
            lm_path, prompts=PROMPTS, max_new_tokens=6, max_bytes=64, **kw
        )
        a, b = g.random(jax.random.key(0), 0, 2), g.random(jax.random.key(1), 0, 2)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_fill_variation_moves_further_with_degree(gen):
    base = [*CORPUS[:4], "one two three four five six seven eight nine ten"]
    samples = jnp.asarray(encode_texts(base, 96))
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        np.asarray(gen.variation(key, samples, 0, 0.0)), np.asarray(samples)
    )
    dist = {}
    for degree in (0.2, 0.5, 1.0):
        out = gen.variation(key, samples, 0, degree)
        assert out.shape == samples.shape and out.dtype == jnp.uint8
        np.testing.assert_array_equal(
            np.asarray(out), np.asarray(gen.variation(key, samples, 0, degree))
        )
        texts = gen.to_texts(out)
        dist[degree] = np.mean([_word_distance(a, b) for a, b in zip(base, texts, strict=True)])
        # Unmasked words are kept verbatim and in order; each blank becomes at most one word.
        for a, b in zip(base, texts, strict=True):
            n = len(a.split())
            assert len(b.split()) <= n
            assert _lcs(a.split(), b.split()) >= n - np.ceil(degree * n)
    assert 0 < dist[0.2] < dist[0.5] < dist[1.0], dist


def test_rewrite_variation_uses_adaptive_length(lm_path, monkeypatch):
    from pejax.generators.text import CausalLMTextGenerator

    gen = CausalLMTextGenerator.from_pretrained(
        lm_path,
        prompts=PROMPTS,
        max_new_tokens=40,
        max_bytes=200,
        variation_mode="rewrite",
        length_factor=1.0,
        length_slack=1,
    )
    originals = ["a dog", CORPUS[5]]
    samples = jnp.asarray(encode_texts(originals, 200))
    key = jax.random.key(2)
    np.testing.assert_array_equal(
        np.asarray(gen.variation(key, samples, 1, 0.0)), np.asarray(samples)
    )
    out = gen.variation(key, samples, 1, 0.5)
    assert out.shape == samples.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(out), np.asarray(gen.variation(key, samples, 1, 0.5)))
    # Adaptive length: each rewrite keeps at most (tokens of its original) + slack new tokens.
    budgets = [len(gen.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in originals]
    generated, decoded = [], []
    generate, decode = gen.model.generate, gen.tokenizer.decode

    def spy_generate(**kw):
        generated.append(kw["generation_config"].max_new_tokens)
        return generate(**kw)

    def spy_decode(ids, **kw):
        decoded.append(len(ids))
        return decode(ids, **kw)

    monkeypatch.setattr(gen.model, "generate", spy_generate)
    monkeypatch.setattr(gen.tokenizer, "decode", spy_decode)
    gen.variation(key, samples, 1, 0.5)
    assert generated == [max(budgets)]
    assert all(n <= b for n, b in zip(decoded, budgets, strict=True)) and decoded[0] < decoded[1]


def test_errors(gen, lm_path, tmp_path, torch):
    import transformers

    from pejax.generators.text import CausalLMTextGenerator

    with pytest.raises(FileNotFoundError, match="does not exist"):
        CausalLMTextGenerator.from_pretrained(tmp_path / "nowhere", prompts=PROMPTS)
    with pytest.raises(ValueError, match=r"config\.json"):
        CausalLMTextGenerator.from_pretrained(tmp_path, prompts=PROMPTS)
    vision = tmp_path / "vision"
    transformers.CLIPVisionConfig(
        hidden_size=8, intermediate_size=8, num_attention_heads=2
    ).save_pretrained(vision)
    with pytest.raises(ValueError, match="causal language model"):
        CausalLMTextGenerator.from_pretrained(vision, prompts=PROMPTS)
    with pytest.raises(TypeError, match="one per class"):
        CausalLMTextGenerator.from_pretrained(lm_path, prompts="a prompt")
    with pytest.raises(ValueError, match="variation_mode"):
        CausalLMTextGenerator.from_pretrained(lm_path, prompts=PROMPTS, variation_mode="paraphrase")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="label 2 has no prompt"):
        gen.random(key, 2, 1)
    s = gen.random(key, 0, 1)
    with pytest.raises(ValueError, match=r"degree must lie in \[0.0, 1.0\]"):
        gen.variation(key, s, 0, 1.5)
    with pytest.raises(ValueError, match=r"uint8 array \(N, 96\)"):
        gen.variation(key, np.zeros((1, 10), np.uint8), 0, 0.5)
    # A text generator's samples are the bytes themselves: no to_images, decoded by to_texts.
    assert isinstance(gen, TextGenerator) and not isinstance(gen, ImageGenerator)
    assert not hasattr(gen, "to_images")
    assert gen.to_texts(s) == decode_texts(s)


def _toy_text_embedding(samples):
    """A cheap deterministic text embedding for the loop test: hashed character-bigram counts, normalised."""
    texts = decode_texts(samples)
    out = np.zeros((len(texts), 64), np.float32)
    for i, t in enumerate(texts):
        for a, b in itertools.pairwise(t):
            out[i, (ord(a) * 31 + ord(b)) % 64] += 1.0
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
    return jnp.asarray(out)


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(pejax.runner, "TEXT_SUPPORTED"),
    reason="the runner does not take text generators yet",
)
def test_full_pe_run_through_text_generator(gen):
    from pejax.config import PEConfig
    from pejax.config import PrivacyConfig
    from pejax.config import SpeedConfig
    from pejax.runner import PrivateEvolution

    private = encode_texts(CORPUS * 2, gen.max_bytes)
    labels = np.array([0, 1] * 6, np.int32)
    sigma, delta = 2.0, 1e-4
    runner = PrivateEvolution(
        generator=gen,
        embedding=_toy_text_embedding,
        pe=PEConfig(num_classes=2, samples_per_iteration=8, iterations=2, degrees=(0.5, 0.3)),
        privacy=PrivacyConfig(
            epsilon=None, noise_multiplier=sigma, delta=delta, class_proportions=(0.5, 0.5)
        ),
        speed=SpeedConfig(retry_backoff_s=0.0),
    )
    result = runner.run(jax.random.key(0), private, labels)
    assert np.asarray(result.samples).shape == (8, gen.max_bytes)
    assert np.asarray(result.samples).dtype == np.uint8
    assert len(gen.to_texts(result.samples)) == 8
    releases = result.ledger.releases
    assert [r.iteration for r in releases] == [1, 2]
    assert all(r.noise_multiplier == sigma for r in releases)
    # The run releases the discrete Gaussian (k = 1: one unit change per release): dp-accounting's own PLD.
    pld = dp_accounting.pld.privacy_loss_distribution.from_discrete_gaussian_mechanism(
        sigma, value_discretization_interval=1e-4
    ).self_compose(2)
    assert result.ledger.epsilon("pld") == pytest.approx(pld.get_epsilon_for_delta(delta), rel=1e-6)


@pytest.mark.parametrize("bad", ["", " ", "two words", 3, None])
def test_mask_token_must_be_one_word(bad):
    from pejax.generators.text_codec import check_mask_token

    with pytest.raises(ValueError, match="mask_token must be a non-empty string without spaces"):
        check_mask_token(bad)
    assert check_mask_token("<mask>") == "<mask>"
