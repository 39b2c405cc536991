"""Tiny models that tests build and save themselves (no download): a byte-level BPE tokenizer and GPT-2; a
character-level CLIP tokenizer, a CLIP model and a Stable Diffusion pipeline of random tiny parts."""

from __future__ import annotations


def byte_bpe_tokenizer(corpus):
    """A byte-level BPE tokenizer (vocabulary 300, EOS ``<|endoftext|>`` = id 0) trained on ``corpus`` x 4."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_gpt2(vocab_size: int, n_positions: int = 128):
    """A one-layer GPT-2 (width 32, 2 heads) with weights drawn after ``torch.manual_seed(0)``."""
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def clip_tokenizer():
    """A character-level CLIP tokenizer (no merges) built from the byte-level alphabet: ``(tokenizer, vocab size)``."""
    import transformers
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), len(vocab)


def save_tiny_clip(path, *, num_layers: int, image_size: int) -> None:
    """Saves a CLIP model (width 32, ``num_layers`` layers per tower, patches of 8, projection 16; weights drawn
    after ``torch.manual_seed(0)``) and its image processor at ``image_size`` to ``path``."""
    import torch
    import transformers

    tower = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=num_layers
    )
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=99),
        vision_config=dict(tower, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)


def tiny_stable_diffusion(*, text_layers: int):
    """A ``StableDiffusionPipeline`` of random tiny parts, weights drawn after ``torch.manual_seed(2)``: a UNet of
    4 and 8 channels on 8 x 8 x 4 latents (cross-attention width 32), a VAE of 4 and 8 channels (16 x 16 images),
    a CLIP text encoder of width 32 with ``text_layers`` layers, Stable Diffusion 1.x's DDIM scheduler, the
    tokenizer of :func:`clip_tokenizer`, and no safety checker."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(
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
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    tokenizer, vocab_size = clip_tokenizer()
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=text_layers,
            vocab_size=vocab_size,
            max_position_embeddings=77,
        )
    )
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
