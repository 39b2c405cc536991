"""Per-sample cost of the PyTorch adapters on this machine (CPU), with random weights.

Cost does not depend on the weights' values, so real-size architectures are built from their published configs
with random weights (no download): the DDPM CIFAR-10 UNet (35.7M parameters), GPT-2 small (124M), the CLIP
ViT-B/32 vision tower (88M), and optionally one Stable Diffusion 1.5 UNet step (860M). The tiny test-size models
show the adapters' fixed overhead. Every number is seconds per sample, the median of ``--repeats`` timed calls
after one warm-up call.

Usage:
  python benchmarks/bench_hf_adapters.py [--threads 2] [--repeats 3] [--sd15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out) if isinstance(out, jax.Array) else None
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` dummy words (ids the LM can emit all decode)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for w in ("the", "a", "cat", "sat", "on", "mat", "rain", "falls", "sky", "is", "red"):
        vocab[w] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]"
    )


def bench_ddim(repeats: int, *, tiny: bool, steps: int, n: int) -> dict:
    import diffusers

    from pejax.generators.hf_diffusers import DiffusersGenerator

    if tiny:
        unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )
    else:  # google/ddpm-cifar10-32
        unet = diffusers.UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            dropout=0.1,
        )
    gen = DiffusersGenerator(
        diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()),
        num_inference_steps=steps,
        batch_size=n,
    )
    key = jax.random.key(0)
    x = gen.random(key, 0, n)
    rnd = timed(lambda: gen.random(key, 0, n), repeats) / n
    var = timed(lambda: gen.variation(key, x, 0, 0.5), repeats) / n
    return {
        "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3),
        "image": list(gen.image_shape),
        "steps": steps,
        "batch": n,
        "random_s_per_sample": round(rnd, 4),
        "random_s_per_sample_per_step": round(rnd / steps, 5),
        "variation_degree_0.5_s_per_sample": round(var, 4),
    }


def bench_tiny_sd(repeats: int, n: int) -> dict:
    import diffusers
    import transformers
    from tokenizers import pre_tokenizers

    from pejax.generators.hf_diffusers import StableDiffusionGenerator

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=2,
            attention_head_dim=2,
        ),
        vae=diffusers.AutoencoderKL(
            block_out_channels=[4, 8],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=2,
        ),
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False),
        text_encoder=transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(vocab),
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    gen = StableDiffusionGenerator(
        pipe, prompts=["a cat"], num_inference_steps=10, guidance_scale=2.0, batch_size=n
    )
    key = jax.random.key(0)
    x = gen.random(key, 0, n)
    return {
        "image": list(gen.image_shape),
        "steps": 10,
        "batch": n,
        "random_s_per_sample": round(timed(lambda: gen.random(key, 0, n), repeats) / n, 4),
        "variation_degree_0.5_s_per_sample": round(
            timed(lambda: gen.variation(key, x, 0, 0.5), repeats) / n, 4
        ),
    }


def bench_sd15_unet_step(repeats: int) -> dict:
    """One classifier-free-guided UNet step of Stable Diffusion 1.5 at 512 x 512 (latent 64 x 64)."""
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8
    ).eval()
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    with torch.inference_mode():
        step = timed(lambda: unet(x, 999, encoder_hidden_states=ctx).sample, repeats)
    return {
        "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3),
        "cfg_unet_step_s_per_image": round(step, 3),
        "extrapolated_50_steps_s_per_image": round(50 * step, 1),
    }


def bench_text(repeats: int, *, tiny: bool, n: int) -> dict:
    import torch
    import transformers

    from pejax.generators.text import CausalLMTextGenerator
    from pejax.generators.text_codec import encode_texts

    if tiny:
        cfg = transformers.GPT2Config(
            vocab_size=300, n_positions=128, n_embd=32, n_layer=1, n_head=2
        )
    else:  # GPT-2 small
        cfg = transformers.GPT2Config()
    cfg.bos_token_id = cfg.eos_token_id = 0
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    gen = CausalLMTextGenerator(
        model,
        word_tokenizer(cfg.vocab_size),
        prompts=["a sentence :"],
        max_new_tokens=32,
        max_bytes=512,
        batch_size=n,
    )
    key = jax.random.key(0)
    samples = jnp.asarray(
        encode_texts(["the cat sat on the mat and the rain falls on the red sky"] * n, 512)
    )
    out = {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "batch": n,
        "random_32_tokens_s_per_sample": round(
            timed(lambda: gen.random(key, 0, n), repeats) / n, 4
        ),
        "fill_variation_degree_0.5_of_13_words_s_per_sample": round(
            timed(lambda: gen.variation(key, samples, 0, 0.5), repeats) / n, 4
        ),
    }
    gen.variation_mode = "rewrite"
    out["rewrite_variation_degree_0.5_s_per_sample"] = round(
        timed(lambda: gen.variation(key, samples, 0, 0.5), repeats) / n, 4
    )
    return out


def bench_embeddings(repeats: int) -> dict:
    import transformers

    from pejax.generators.text_codec import encode_texts
    from pejax.hf_embeddings import SentenceTransformerEmbedding
    from pejax.hf_embeddings import TransformersImageEmbedding

    out = {}
    minilm = SentenceTransformerEmbedding(batch_size=64)
    texts = encode_texts(["the cat sat on the mat and the rain falls on the red sky"] * 64, 128)
    out["minilm_real_weights_s_per_text"] = round(timed(lambda: minilm(texts), repeats) / 64, 5)
    clip = TransformersImageEmbedding(
        transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(projection_dim=512)  # ViT-B/32 defaults
        ),
        resize=("shortest", 224),
        crop=(224, 224),
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        batch_size=32,
    )
    images = jax.random.uniform(jax.random.key(0), (32, 32, 32, 3))
    out["clip_vit_b32_from_32px_s_per_image"] = round(timed(lambda: clip(images), repeats) / 32, 5)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sd15", action="store_true", help="also time one SD 1.5 UNet step (slow)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    r = args.repeats
    report = {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    steps = [
        ("ddim_tiny_8x8", lambda: bench_ddim(r, tiny=True, steps=10, n=8)),
        ("ddim_cifar10_unet_32x32", lambda: bench_ddim(r, tiny=False, steps=10, n=4)),
        ("stable_diffusion_tiny_16x16", lambda: bench_tiny_sd(r, n=4)),
        ("gpt2_tiny", lambda: bench_text(r, tiny=True, n=8)),
        ("gpt2_small_124M", lambda: bench_text(r, tiny=False, n=8)),
        ("embeddings", lambda: bench_embeddings(r)),
    ]
    if args.sd15:
        steps.append(("sd15_unet_512", lambda: bench_sd15_unet_step(max(1, r - 2))))
    for name, fn in steps:
        t0 = time.perf_counter()
        report[name] = fn()
        report[name]["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
