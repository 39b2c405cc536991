"""Text generation with a causal language model (transformers, PyTorch): Aug-PE's RANDOM and VARIATION APIs.

Following Aug-PE (Xie et al., ICML 2024): RANDOM(y) samples continuations of a per-class prompt; VARIATION masks a
fraction ``degree`` of a sample's words and has the LM fill them in. transformers 5 has no Flax models, so the LM
runs on PyTorch; any causal LM that ``AutoModelForCausalLM.from_pretrained(path)`` loads works.

Samples follow the text contract of :mod:`pejax.generators.text_codec`: a uint8 array (N, L) of zero-padded UTF-8
bytes with ``L = max_bytes`` (texts longer than that are truncated on a character boundary); ``to_texts`` decodes
them. The generator has ``modality = "text"``: the runner hands the byte array to a text embedding.

Two variation modes (``variation_mode``):

* ``"fill"`` (default; works with any causal LM, however small): ``ceil(degree * words)`` words, chosen at random,
  are replaced one by one, left to right, by the first word the LM writes after the class prompt and the text
  before the blank (its right context is not seen: a causal LM only reads left). Unmasked words are kept
  verbatim, so degree 0 returns the sample unchanged and the share of changed words grows with the degree.
* ``"rewrite"`` (Aug-PE's prompt-based fill-in-the-blanks, for instruction-following LMs): the masked words are
  replaced by ``mask_token`` and the LM is asked, through ``rewrite_template``, to write the whole text again;
  its output replaces the sample. Adaptive length (Aug-PE): each output is cut to
  ``ceil(length_factor * tokens of the original) + length_slack`` tokens (at most ``max_new_tokens``).

Degree scale: ``degree`` in [0, 1] is the fraction of words masked (degree 0: samples returned unchanged).

Randomness: sampling uses the Gumbel-max trick, with each sample's Gumbel noise drawn from its own
``torch.Generator`` seeded from ``fold_in(key, i)``, so sample i depends on the key and sample i only (up to the
floating-point effects of batching and padding); no global RNG is touched. Temperature, top-k and top-p act as in
``transformers``' sampling.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _torch_bridge as tb
from pejax import _validate
from pejax.generators.text_codec import check_mask_token
from pejax.generators.text_codec import decode_texts
from pejax.generators.text_codec import encode_texts

_EXTRA = "text"
VARIATION_MODES = ("fill", "rewrite")
"""Accepted values of ``variation_mode``."""

DEFAULT_REWRITE_TEMPLATE = (
    "{prompt}\nFill in the blanks ({mask}) in the text below and write the whole text, in about {words} "
    "words.\nText: {masked}\nFilled-in text:"
)
"""Prompt of the ``"rewrite"`` variation; fields: prompt (class prompt), mask, words, masked (masked text)."""


def _imports():
    torch = tb.require("torch", _EXTRA)
    transformers = tb.require("transformers", _EXTRA)
    return torch, transformers


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _float(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    v = float(value)
    if v > hi or v < lo or (open_lo and v == lo):
        bracket = "(" if open_lo else "["
        raise ValueError(f"{name} must lie in {bracket}{lo}, {hi}], got {value!r}.")
    return v


def _gumbel_processor(torch, transformers, gens, temperature: float, top_k: int, top_p: float):
    """Logits processor: temperature, top-k, top-p, then Gumbel noise from one generator per row.

    Greedy decoding of the processed scores (argmax) then samples from the filtered softmax (Gumbel-max).
    """

    class _Gumbel(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.float() / temperature
            if top_k > 0 and top_k < scores.shape[-1]:
                kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, -math.inf)
            if top_p < 1.0:
                order = torch.sort(scores, dim=-1, descending=True)
                probs = order.values.softmax(-1)
                # Drop a token when the tokens ranked above it already hold top_p: the first always stays.
                drop_sorted = (probs.cumsum(-1) - probs) >= top_p
                drop = drop_sorted.scatter(-1, order.indices, drop_sorted)
                scores = scores.masked_fill(drop, -math.inf)
            u = torch.stack(
                [
                    torch.rand(scores.shape[-1], generator=g, device=g.device, dtype=torch.float64)
                    for g in gens
                ]
            ).to(scores.device)
            tiny = torch.finfo(torch.float64).tiny
            gumbel = -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-16)))
            return (scores.double() + gumbel).float()

    return _Gumbel()


class CausalLMTextGenerator:
    """A causal language model as a pejax text generator (Aug-PE).

    Build it with :meth:`from_pretrained`. See the module docstring for the variation modes and the degree.

    Attributes:
      name: ``"text:<folder name>"``.
      modality: ``"text"``.
      prompts: one prompt per class.
      max_bytes: L, the byte length of a sample row.
      model: the transformers model; ``tokenizer``: its tokenizer (left padding).
    """

    modality = "text"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        prompts: Sequence[str] | Mapping[int, str],
        max_new_tokens: int = 64,
        max_bytes: int = 512,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        variation_mode: str = "fill",
        rewrite_template: str = DEFAULT_REWRITE_TEMPLATE,
        mask_token: str = "_",
        word_tokens: int = 4,
        length_factor: float = 1.2,
        length_slack: int = 4,
        batch_size: int = 16,
        device: Any = "cpu",
        progress: bool = False,
        name: str | None = None,
    ):
        """Wraps a loaded model and tokenizer; prefer :meth:`from_pretrained`, which documents the arguments."""
        torch, transformers = _imports()
        self._torch, self._tf = torch, transformers
        self.prompts = tb.check_prompts(prompts)
        self.max_new_tokens = _int("max_new_tokens", max_new_tokens, 1)
        self.max_bytes = _int("max_bytes", max_bytes, 1)
        self.temperature = _float("temperature", temperature, 0.0, 100.0, open_lo=True)
        self.top_k = _int("top_k", top_k, 0)
        self.top_p = _float("top_p", top_p, 0.0, 1.0, open_lo=True)
        if variation_mode not in VARIATION_MODES:
            raise ValueError(
                f"variation_mode must be one of {VARIATION_MODES}, got {variation_mode!r}."
            )
        self.variation_mode = variation_mode
        if not isinstance(rewrite_template, str) or "{masked}" not in rewrite_template:
            raise ValueError(
                "rewrite_template must be a string with a {masked} field (and optionally {prompt}, {mask}, "
                f"{{words}}), got {rewrite_template!r}."
            )
        try:
            rewrite_template.format(prompt="", mask="", words=0, masked="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"rewrite_template may only use the fields prompt, mask, words and masked: {e!r}."
            ) from e
        self.rewrite_template = rewrite_template
        self.mask_token = check_mask_token(mask_token)
        self.word_tokens = _int("word_tokens", word_tokens, 1)
        self.length_factor = _float("length_factor", length_factor, 0.0, 100.0, open_lo=True)
        self.length_slack = _int("length_slack", length_slack, 0)
        self.batch_size = _int("batch_size", batch_size, 1)
        self.device = tb.check_device(torch, device)
        self.progress = bool(progress)
        self.model = model.to(self.device).eval()
        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "the tokenizer has neither a pad token nor an eos token; batched generation needs one "
                    "(set tokenizer.pad_token)."
                )
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        cfg = model.config
        self._max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        gen_cfg = copy.deepcopy(model.generation_config)
        gen_cfg.do_sample = False
        gen_cfg.num_beams = 1
        gen_cfg.temperature = None
        gen_cfg.top_k = None
        gen_cfg.top_p = None
        gen_cfg.pad_token_id = tokenizer.pad_token_id
        if gen_cfg.eos_token_id is None:
            gen_cfg.eos_token_id = tokenizer.eos_token_id
        self._gen_cfg = gen_cfg
        self.name = name or f"text:{type(model).__name__}"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        prompts: Sequence[str] | Mapping[int, str],
        max_new_tokens: int = 64,
        max_bytes: int = 512,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        variation_mode: str = "fill",
        rewrite_template: str = DEFAULT_REWRITE_TEMPLATE,
        mask_token: str = "_",
        word_tokens: int = 4,
        length_factor: float = 1.2,
        length_slack: int = 4,
        batch_size: int = 16,
        device: Any = "cpu",
        dtype: Any = "float32",
        progress: bool = False,
    ) -> CausalLMTextGenerator:
        """Loads a causal LM and its tokenizer with ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)``.

        Args:
          path: a folder written by ``model.save_pretrained(path)`` and ``tokenizer.save_pretrained(path)``.
          prompts: one prompt per class, a list (``prompts[y]``) or a mapping {0: ..., C-1: ...}.
          max_new_tokens: tokens generated by RANDOM, and the cap of a rewrite.
          max_bytes: L, the byte length of a sample row (longer texts are truncated on a character boundary).
          temperature: softmax temperature (> 0).
          top_k: keep the k most likely tokens (0: all).
          top_p: nucleus sampling mass in (0, 1] (1: off).
          variation_mode: ``"fill"`` (any LM) or ``"rewrite"`` (Aug-PE prompt; instruction-following LMs).
          rewrite_template: prompt of ``"rewrite"``, with fields {prompt}, {mask}, {words}, {masked}.
          mask_token: the blank written in place of a masked word (``"rewrite"`` mode).
          word_tokens: tokens generated to fill one blank (``"fill"`` mode); the first word is kept.
          length_factor: adaptive length of a rewrite, in tokens of the original.
          length_slack: extra tokens allowed to a rewrite.
          batch_size: texts per ``generate`` call. Does not change the texts (beyond float rounding).
          device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
          dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the model's weights.
          progress: show a tqdm bar over samples in each call.

        Returns:
          the generator.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: ``path`` holds no transformers config, or a model that is not a causal LM, or a bad option.
          ImportError: torch or transformers is missing (``pip install 'pejax[text]'``).

        Example (not run here: needs saved weights)::

          gen = CausalLMTextGenerator.from_pretrained(
              "gpt2", prompts=["A one-sentence movie review, positive:", "A one-sentence movie review, negative:"])
          samples = gen.random(jax.random.key(0), label=0, num_samples=4)    # (4, 512) uint8
          gen.to_texts(samples)
        """
        torch, transformers = _imports()
        p = tb.local_folder(
            path,
            "model folder {path} does not exist. Give the folder that model.save_pretrained() and "
            "tokenizer.save_pretrained() wrote (weights cannot be downloaded by pejax).",
        )
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{str(p)!r} is not a saved transformers model: it has no config.json. Save one with "
                "model.save_pretrained(path) and tokenizer.save_pretrained(path)."
            )
        torch_dtype = tb.check_dtype(torch, dtype)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise ValueError(
                    f"{str(p)!r} does not hold a causal language model that AutoModelForCausalLM loads "
                    f"({e}). Use a decoder-only LM such as GPT-2, Llama or Mistral."
                ) from e
            raise
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(p))
        return cls(
            model,
            tokenizer,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            max_bytes=max_bytes,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            variation_mode=variation_mode,
            rewrite_template=rewrite_template,
            mask_token=mask_token,
            word_tokens=word_tokens,
            length_factor=length_factor,
            length_slack=length_slack,
            batch_size=batch_size,
            device=device,
            progress=progress,
            name=f"text:{p.name}",
        )

    # ------------------------------------------------------------------------------------------ helpers

    def _generate(
        self, contexts: list[str], gens: list, max_new: list[int], bar=tb.NULL_BAR
    ) -> list[str]:
        """Continues each context; row i samples with ``gens[i]`` and keeps at most ``max_new[i]`` tokens."""
        torch = self._torch
        out: list[str] = []
        for s, e in tb.batches(len(contexts), self.batch_size):
            budget = max(max_new[s:e])
            limit = None if self._max_positions is None else max(1, self._max_positions - budget)
            enc = self.tokenizer(
                contexts[s:e],
                return_tensors="pt",
                padding=True,
                truncation=limit is not None,
                max_length=limit,
            ).to(self.device)
            processor = _gumbel_processor(
                torch, self._tf, gens[s:e], self.temperature, self.top_k, self.top_p
            )
            gen_cfg = copy.copy(self._gen_cfg)
            gen_cfg.max_new_tokens = budget
            ids = self.model.generate(
                **enc,
                generation_config=gen_cfg,
                logits_processor=self._tf.LogitsProcessorList([processor]),
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            for row, limit_i in zip(new, max_new[s:e], strict=True):
                out.append(self.tokenizer.decode(row[:limit_i], skip_special_tokens=True))
            bar.update(e - s)
        return out

    def _encode(self, texts: list[str]) -> jax.Array:
        return jnp.asarray(encode_texts(texts, self.max_bytes))

    def _check_samples(self, samples: Any) -> np.ndarray:
        arr = np.asarray(samples)
        if arr.ndim != 2 or arr.dtype != np.uint8 or arr.shape[1] != self.max_bytes:
            raise ValueError(
                f"samples must be a uint8 array (N, {self.max_bytes}) of UTF-8 bytes as this generator makes "
                f"them (max_bytes={self.max_bytes}), got {arr.dtype} {arr.shape}."
            )
        return arr

    # ------------------------------------------------------------------------------------------ protocol
    def random(self, key: jax.Array, label: int, num_samples: int) -> jax.Array:
        """Samples ``num_samples`` continuations of ``prompts[label]`` (RANDOM_API).

        Args:
          key: ``jax.random`` key; text i depends only on ``fold_in(key, i)``.
          label: class index in [0, len(prompts)).
          num_samples: N >= 0.

        Returns:
          uint8 (N, max_bytes) UTF-8 bytes (see :mod:`pejax.generators.text_codec`).
        """
        key = _validate.check_key(key)
        n = _int("num_samples", num_samples, 0)
        prompt = tb.prompt_for(self.prompts, label)
        torch = self._torch
        gens = tb.torch_generators(torch, tb.sample_seeds(key, n), self.device)
        bar = tb.progress_bar(n, f"{self.name} random", self.progress)
        with tb.deterministic(torch):
            texts = self._generate([prompt] * n, gens, [self.max_new_tokens] * n, bar)
        bar.close()
        return self._encode([t.strip() for t in texts])

    def variation(self, key: jax.Array, samples: Any, label: int, degree: float) -> jax.Array:
        """Masks a fraction ``degree`` of each text's words and has the LM fill them in (VARIATION_API).

        Args:
          key: ``jax.random`` key; text i depends only on ``fold_in(key, i)`` and sample i.
          samples: uint8 (N, max_bytes) UTF-8 bytes made by this generator.
          label: class index in [0, len(prompts)) (its prompt is the LM's context).
          degree: fraction of words masked, in [0, 1]; 0 returns the samples unchanged.

        Returns:
          uint8 (N, max_bytes) UTF-8 bytes.
        """
        key = _validate.check_key(key)
        arr = self._check_samples(samples)
        d = _float("degree", degree, 0.0, 1.0)
        prompt = tb.prompt_for(self.prompts, label)
        n = arr.shape[0]
        if d == 0.0 or n == 0:
            return jnp.asarray(arr)
        torch = self._torch
        seeds = tb.sample_seeds(key, n)
        gens = tb.torch_generators(torch, seeds, self.device)
        words = [t.split() for t in decode_texts(arr)]
        masked = []
        for i, w in enumerate(words):
            rng = np.random.default_rng(seeds[i])
            m = min(len(w), math.ceil(d * len(w)))
            masked.append(sorted(rng.choice(len(w), size=m, replace=False).tolist()))
        bar = tb.progress_bar(n, f"{self.name} variation", self.progress)
        with tb.deterministic(torch):
            if self.variation_mode == "fill":
                texts = self._fill(prompt, words, masked, gens)
            else:
                texts = self._rewrite(prompt, words, masked, gens, bar)
        if self.variation_mode == "fill":
            bar.update(n)
        bar.close()
        return self._encode(texts)

    def _fill(self, prompt: str, words, masked, gens) -> list[str]:
        words = [list(w) for w in words]
        rounds = max((len(m) for m in masked), default=0)
        for j in range(rounds):
            rows = [i for i, m in enumerate(masked) if len(m) > j]
            contexts = [
                " ".join([prompt, *(x for x in words[i][: masked[i][j]] if x)]) for i in rows
            ]
            fills = self._generate(
                contexts, [gens[i] for i in rows], [self.word_tokens] * len(rows)
            )
            for i, fill in zip(rows, fills, strict=True):
                first = fill.split()
                words[i][masked[i][j]] = first[0] if first else ""
        return [" ".join(x for x in w if x) for w in words]

    def _rewrite(self, prompt: str, words, masked, gens, bar) -> list[str]:
        contexts, budgets = [], []
        for w, m in zip(words, masked, strict=True):
            shown = list(w)
            for pos in m:
                shown[pos] = self.mask_token
            contexts.append(
                self.rewrite_template.format(
                    prompt=prompt, mask=self.mask_token, words=len(w), masked=" ".join(shown)
                )
            )
            n_tok = len(self.tokenizer(" ".join(w), add_special_tokens=False)["input_ids"])
            budgets.append(
                max(
                    1,
                    min(
                        self.max_new_tokens,
                        math.ceil(self.length_factor * n_tok) + self.length_slack,
                    ),
                )
            )
        texts = self._generate(contexts, gens, budgets, bar)
        return [t.strip() for t in texts]

    def to_texts(self, samples: Any) -> list[str]:
        """Decodes samples (uint8 (N, L) UTF-8 bytes) to N strings."""
        return decode_texts(samples)


__all__ = ["DEFAULT_REWRITE_TEMPLATE", "VARIATION_MODES", "CausalLMTextGenerator"]
