"""Tiny text models that tests build and save themselves (no download): a byte-level BPE tokenizer and GPT-2."""

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
