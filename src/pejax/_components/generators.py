"""Built-in generator kinds of :mod:`pejax.registry` (imported by it; heavy imports stay inside each builder)."""

from __future__ import annotations

import dataclasses
import pathlib

from pejax import _validate
from pejax.registry import REQUIRED
from pejax.registry import TORCH_OPTIONS
from pejax.registry import Option
from pejax.registry import check_path
from pejax.registry import class_prompts
from pejax.registry import register
from pejax.registry import torch_placement


@register(
    "generator",
    "glyphs",
    doc="JAX glyph simulator: fonts and handwritten forms rendered from parameters (the digits demo)",
    extra="demo",
    modality="image",
    options=(
        Option("image_size", 32, "side of the square images it renders"),
        Option("texts", None, "the text drawn for each class; default the class numbers"),
        Option("fonts", None, "font files; default matplotlib's bundled fonts"),
        Option("handwriting", False, "also draw digits in common handwritten forms"),
        Option("prior", None, "table of GlyphPrior fields, e.g. {warp = 0.06}"),
        Option("warp_grid", 4, "side of the elastic-warp grid"),
        Option("atlas_size", 64, "side of each glyph's distance field in the atlas"),
    ),
)
def _glyphs(opts, ctx):
    from pejax.generators.glyphs import GlyphPrior
    from pejax.generators.glyphs import GlyphSimulator

    texts = opts["texts"]
    texts = tuple(str(i) for i in range(ctx.num_classes)) if texts is None else tuple(texts)
    if len(texts) != ctx.num_classes:
        raise ValueError(
            f"generator.texts has {len(texts)} entries but pe.num_classes is {ctx.num_classes}."
        )
    kw = {k: opts[k] for k in ("image_size", "handwriting", "warp_grid", "atlas_size")}
    if opts["fonts"] is not None:
        from pejax.config import check_path_list

        check_path_list("generator.fonts", opts["fonts"])
        kw["fonts"] = tuple(opts["fonts"])
    if opts["prior"] is not None:
        fields = tuple(f.name for f in dataclasses.fields(GlyphPrior))
        prior = _validate.known_keys("config section [generator.prior]", opts["prior"], fields)
        kw["prior"] = GlyphPrior(
            **{k: v if isinstance(v, int | float) else tuple(v) for k, v in prior.items()}
        )
    return GlyphSimulator(texts=texts, **kw)


@register(
    "generator",
    "flax-ddpm",
    doc="pejax's JAX diffusion sampler (DDIM/DDPM, SDEdit variation) on a Flax UNet checkpoint",
    extra="flax",
    modality="image",
    options=(
        Option(
            "path",
            REQUIRED,
            "checkpoint folder written by pejax's trainer (experiments/train_flax_ddpm.py)",
        ),
        Option("num_steps", 50, "sampler steps of a full trajectory"),
        Option("sampler", "ddim", "'ddim' (deterministic) or 'ddpm' (ancestral)"),
        Option("clip_denoised", True, "clip the predicted clean image to [-1, 1] at every step"),
        Option("batch_size", 128, "most rows per compiled call (speed only)"),
    ),
)
def _flax_ddpm(opts, ctx):
    try:
        from pejax.generators.diffusion import FlaxDiffusionGenerator
    except ImportError as e:
        raise ImportError(
            f"generator kind 'flax-ddpm' needs Flax, optax and orbax ({e}): pip install 'pejax[flax]'."
        ) from e
    path = check_path("generator.path", opts["path"])
    gen = FlaxDiffusionGenerator.from_checkpoint(
        path,
        num_steps=opts["num_steps"],
        sampler=opts["sampler"],
        clip_denoised=opts["clip_denoised"],
        batch_size=opts["batch_size"],
        name=f"flax-ddpm:{pathlib.Path(path).name}",
    )
    if gen.class_conditional and gen.num_classes != ctx.num_classes:
        raise ValueError(
            f"the checkpoint {path!r} is conditioned on {gen.num_classes} classes but pe.num_classes is "
            f"{ctx.num_classes}."
        )
    return gen


@register(
    "generator",
    "diffusers",
    doc="a saved Diffusers DDPM/DDIM pipeline (pixel UNet2DModel, class-conditional or not); SDEdit variation",
    extra="diffusers",
    modality="image",
    options=(
        Option("path", REQUIRED, "folder written by pipeline.save_pretrained() (model_index.json)"),
        Option("num_inference_steps", None, "sampling steps; default 1000 (DDPM) or 50 (DDIM)"),
        Option("eta", 0.0, "DDIM's eta (0: deterministic steps)"),
        Option("batch_size", 16, "images per UNet call (speed only)"),
        *TORCH_OPTIONS,
    ),
)
def _diffusers(opts, ctx):
    from pejax.generators.hf_diffusers import DiffusersGenerator

    opts = torch_placement(opts, "diffusers")
    gen = DiffusersGenerator.from_pretrained(check_path("generator.path", opts.pop("path")), **opts)
    if gen.num_classes is not None and gen.num_classes != ctx.num_classes:
        raise ValueError(
            f"the pipeline's UNet has {gen.num_classes} class embeddings but pe.num_classes is "
            f"{ctx.num_classes}."
        )
    return gen


@register(
    "generator",
    "stable-diffusion",
    doc="a saved Stable Diffusion pipeline: text-to-image RANDOM, image-to-image VARIATION",
    extra="diffusers",
    modality="image",
    options=(
        Option("path", REQUIRED, "folder written by pipeline.save_pretrained() (model_index.json)"),
        Option("prompts", None, "one prompt per class; default prompt_template per class name"),
        Option(
            "prompt_template", "a photo of a {name}", "prompt of class {name} when prompts is unset"
        ),
        Option("negative_prompt", None, "negative prompt for every class"),
        Option("guidance_scale", 7.5, "classifier-free guidance scale"),
        Option("num_inference_steps", 50, "text-to-image steps; img2img runs degree times as many"),
        Option("height", None, "image height (multiple of 8); default the UNet's"),
        Option("width", None, "image width (multiple of 8); default the UNet's"),
        Option("batch_size", 4, "images per pipeline call (speed only)"),
        *TORCH_OPTIONS,
    ),
)
def _stable_diffusion(opts, ctx):
    from pejax.generators.hf_diffusers import StableDiffusionGenerator

    prompts = class_prompts(opts, ctx, "generator")
    opts = {k: v for k, v in opts.items() if k not in ("prompts", "prompt_template")}
    opts = torch_placement(opts, "diffusers")
    return StableDiffusionGenerator.from_pretrained(
        check_path("generator.path", opts.pop("path")), prompts=prompts, **opts
    )


@register(
    "generator",
    "causal-lm",
    doc="a saved transformers causal LM as an Aug-PE text generator (prompted RANDOM, fill-in VARIATION)",
    extra="text",
    modality="text",
    options=(
        Option(
            "path",
            REQUIRED,
            "folder written by model.save_pretrained() and tokenizer.save_pretrained()",
        ),
        Option("prompts", None, "one prompt per class; default prompt_template per class name"),
        Option(
            "prompt_template",
            "A text about {name}:",
            "prompt of class {name} when prompts is unset",
        ),
        Option("max_new_tokens", 64, "tokens written by RANDOM, and the cap of a rewrite"),
        Option("max_bytes", 512, "byte length of a text sample (longer texts are truncated)"),
        Option("temperature", 1.0, "softmax temperature"),
        Option("top_k", 0, "keep the k most likely tokens (0: all)"),
        Option("top_p", 1.0, "nucleus sampling mass (1: off)"),
        Option(
            "variation_mode", "fill", "'fill' (any LM) or 'rewrite' (instruction-following LMs)"
        ),
        Option(
            "rewrite_template",
            None,
            "prompt of 'rewrite' with {prompt}, {mask}, {words}, {masked}; default Aug-PE's",
        ),
        Option("mask_token", "_", "blank shown for a masked word ('rewrite')"),
        Option("word_tokens", 4, "tokens written to fill one blank ('fill')"),
        Option("length_factor", 1.2, "adaptive length of a rewrite, in tokens of the original"),
        Option("length_slack", 4, "extra tokens allowed to a rewrite"),
        Option("batch_size", 16, "texts per generate call (speed only)"),
        *TORCH_OPTIONS,
    ),
)
def _causal_lm(opts, ctx):
    from pejax.generators.text import CausalLMTextGenerator

    prompts = class_prompts(opts, ctx, "generator")
    opts = {k: v for k, v in opts.items() if k not in ("prompts", "prompt_template")}
    if opts["rewrite_template"] is None:
        del opts["rewrite_template"]
    opts = torch_placement(opts, "text")
    return CausalLMTextGenerator.from_pretrained(
        check_path("generator.path", opts.pop("path")), prompts=prompts, **opts
    )


@register(
    "generator",
    "openai-chat",
    doc="Aug-PE text through an OpenAI-compatible /v1/chat/completions endpoint (vLLM, llama.cpp, "
    "transformers serve, OpenAI)",
    extra="api",
    modality="text",
    options=(
        Option("model", REQUIRED, "model name sent in each request"),
        Option("base_url", None, "API root, e.g. 'http://127.0.0.1:8000/v1' (or give endpoints)"),
        Option(
            "api_key_env", None, "environment variable holding the API key (never the key itself)"
        ),
        Option("api_key_file", None, "file holding the API key (never the key itself)"),
        Option("endpoints", None, "replicas: a list of {base_url, api_key_env | api_key_file}"),
        Option("prompts", None, "one prompt per class; default prompt_template per class name"),
        Option(
            "prompt_template",
            "A text about {name}:",
            "prompt of class {name} when prompts is unset",
        ),
        Option("system_prompt", None, "system message put before every request"),
        Option(
            "random_template", "{prompt}", "RANDOM's message: {prompt} and the random_fills fields"
        ),
        Option(
            "random_fills", None, "field -> list of values; each RANDOM request picks one per field"
        ),
        Option(
            "variation_template",
            None,
            "VARIATION's message with {masked}, {prompt}, {mask}, {words}",
        ),
        Option("mask_token", "_", "blank shown for a masked word"),
        Option("max_tokens", 128, "completion tokens a request may use"),
        Option(
            "length_factor", None, "adaptive VARIATION length: tokens per 4 bytes of the original"
        ),
        Option("length_slack", 8, "extra tokens allowed with length_factor"),
        Option("max_tokens_field", "max_tokens", "'max_tokens' or 'max_completion_tokens'"),
        Option("temperature", 1.0, "sampling temperature in [0, 2] (0: greedy)"),
        Option("top_p", None, "nucleus mass in (0, 1]; default the server's"),
        Option("send_seed", True, "send each request's seed"),
        Option("extra_body", None, "extra JSON fields of every request"),
        Option("max_bytes", 512, "byte length of a text sample"),
        Option("max_concurrency", 16, "requests in flight at once (speed only)"),
        Option("requests_per_minute", None, "client-side request limit"),
        Option("tokens_per_minute", None, "client-side token limit"),
        Option("timeout_s", 60.0, "timeout of one attempt, in seconds"),
        Option("max_retries", 8, "retries after 429, 5xx, timeouts and dropped connections"),
        Option(
            "backoff_s", 1.0, "backoff base: attempt a waits up to backoff_s * 2**a (full jitter)"
        ),
        Option("max_backoff_s", 60.0, "backoff cap (a longer Retry-After is still honoured)"),
        Option("max_repairs", 3, "re-requests of an empty, refused, non-text or truncated answer"),
        Option("on_truncated", "retry", "'retry' or 'keep' a completion cut at max_tokens"),
        Option("cache", None, "SQLite response cache; default <out>/openai_cache.sqlite"),
        Option("prompt_price", 0.0, "price per million prompt tokens (report's cost)"),
        Option("completion_price", 0.0, "price per million completion tokens"),
        Option("progress", False, "a bar over each call's requests (tokens, retries, failures)"),
        Option("trust_env", True, "let the HTTP client read proxy settings from the environment"),
    ),
)
def _openai_chat(opts, ctx):
    from pejax.generators.openai_chat import from_options

    return from_options(opts, ctx)
