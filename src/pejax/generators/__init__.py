"""Generators behind the random/variation protocol.

Adapters with heavy dependencies (Pillow fonts, Flax, torch, diffusers, transformers) are imported lazily, so
``import pejax.generators`` stays light: ``pejax.generators.GlyphSimulator`` loads the glyph module on first use.
"""

from pejax.errors import GeneratorError
from pejax.errors import GeneratorRetryWarning
from pejax.generators._checked import CheckedGenerator
from pejax.generators._protocol import MODALITIES
from pejax.generators._protocol import Generator
from pejax.generators._protocol import ImageGenerator
from pejax.generators._protocol import TextGenerator

_LAZY = {
    "GlyphSimulator": "pejax.generators.glyphs",
    "GlyphParams": "pejax.generators.glyphs",
    "GlyphPrior": "pejax.generators.glyphs",
    "default_fonts": "pejax.generators.glyphs",
    "FlaxDiffusionGenerator": "pejax.generators.diffusion",
    "UNet": "pejax.generators.unet",
    "UNetConfig": "pejax.generators.unet",
    "DiffusersGenerator": "pejax.generators.hf_diffusers",
    "StableDiffusionGenerator": "pejax.generators.hf_diffusers",
    "CausalLMTextGenerator": "pejax.generators.text",
    "OpenAIChatGenerator": "pejax.generators.openai_chat",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pejax.generators' has no attribute {name!r}")


__all__ = [
    "MODALITIES",
    "CausalLMTextGenerator",
    "CheckedGenerator",
    "DiffusersGenerator",
    "FlaxDiffusionGenerator",
    "Generator",
    "GeneratorError",
    "GeneratorRetryWarning",
    "GlyphParams",
    "GlyphPrior",
    "GlyphSimulator",
    "ImageGenerator",
    "OpenAIChatGenerator",
    "StableDiffusionGenerator",
    "TextGenerator",
    "UNet",
    "UNetConfig",
    "default_fonts",
]
