"""Diffusers pipelines (PyTorch) as pejax generators: DDPM/DDIM and Stable Diffusion.

diffusers 0.40+ has no Flax models, so these adapters run the PyTorch pipelines (CPU, or CUDA on a GPU) and hand
images to JAX through DLPack. Both load a pipeline saved on disk with the library's own loading call
(``from_pretrained(path)``); nothing is downloaded.

Samples are the images themselves: float32, shape (N, H, W, C), values in [0, 1]; ``to_images`` returns them.

* :class:`DiffusersGenerator`: a ``DDPMPipeline`` or ``DDIMPipeline`` folder (a pixel-space ``UNet2DModel``),
  unconditional or class-conditional (``UNet2DModel(num_class_embeds=C)``, labels passed as ``class_labels``).
  RANDOM runs the reverse diffusion from Gaussian noise; VARIATION is SDEdit (Meng et al., 2022): noise the image
  with ``scheduler.add_noise`` to the timestep reached after a fraction ``degree`` of the sampling schedule has
  been undone, then denoise from there.
* :class:`StableDiffusionGenerator`: a ``StableDiffusionPipeline`` folder. RANDOM is text-to-image with one prompt
  per class; VARIATION is image-to-image (``StableDiffusionImg2ImgPipeline`` built from the same components) with
  ``strength = degree``.

Degree scale (both): ``degree`` in [0, 1] is the fraction of the ``num_inference_steps`` sampling steps that are
re-run, exactly as img2img's ``strength``; ``int(num_inference_steps * degree)`` steps run, so a degree below
``1 / num_inference_steps`` (and 0) returns the samples unchanged.

Randomness: sample i of a call uses a ``torch.Generator`` seeded from ``fold_in(key, i)`` (initial noise,
SDEdit noise and any per-step noise), so the same key gives the same images, independently of ``batch_size``
up to floating-point differences of batched kernels. Streams of CPU and CUDA generators differ: the same key
gives other images on another device.
"""

from __future__ import annotations

import copy
import inspect
import json
import numbers
import os
import pathlib
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _torch_bridge as tb
from pejax import _validate

_EXTRA = "diffusers"
_UNET_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


def _imports():
    torch = tb.require("torch", _EXTRA)
    diffusers = tb.require("diffusers", _EXTRA)
    return torch, diffusers


def _pipeline_class(
    path: Any, accepted: tuple[str, ...], other_hint: str
) -> tuple[pathlib.Path, str]:
    """Checks that ``path`` is a saved Diffusers pipeline of one of the ``accepted`` classes."""
    p = tb.local_folder(
        path,
        "pipeline folder {path} does not exist. Give the folder that pipeline.save_pretrained() "
        "wrote (weights cannot be downloaded by pejax).",
    )
    index = p / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{str(p)!r} is not a saved Diffusers pipeline: it has no model_index.json. Save one with "
            "pipeline.save_pretrained(path)."
        )
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(index)!r} is not valid JSON: {e}") from e
    if cls not in accepted:
        raise ValueError(
            f"{str(p)!r} holds a {cls!r}, but this generator loads {' or '.join(accepted)}. {other_hint}"
        )
    return p, cls


def _check_degree(degree: Any) -> float:
    if isinstance(degree, bool) or not isinstance(degree, numbers.Real):
        raise TypeError(f"degree must be a number in [0, 1], got {degree!r}.")
    d = float(degree)
    if not 0.0 <= d <= 1.0:
        raise ValueError(
            f"degree must lie in [0, 1] (the fraction of the sampling schedule re-run, as img2img's "
            f"strength), got {degree!r}. Set PEConfig.degrees within [0, 1] for this generator."
        )
    return d


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_images(name: str, samples: Any, shape: tuple[int, int, int]) -> jax.Array:
    arr = jnp.asarray(samples)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name} must be images of shape (N, {shape[0]}, {shape[1]}, {shape[2]}) as this generator makes "
            f"them, got {tuple(arr.shape)}."
        )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name} must be float images in [0, 1], got dtype {arr.dtype}.")
    return arr.astype(jnp.float32)


def _nchw_to_jax(torch, x) -> jax.Array:
    """(B, C, H, W) torch images in [0, 1] -> (B, H, W, C) float32 JAX array (DLPack)."""
    return tb.to_jax(x.clamp(0, 1).permute(0, 2, 3, 1).to(torch.float32).contiguous())


def _concat(parts: list[jax.Array], shape: tuple[int, int, int]) -> jax.Array:
    if not parts:
        return jnp.zeros((0, *shape), jnp.float32)
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


class DiffusersGenerator:
    """A DDPM/DDIM pipeline (pixel-space ``UNet2DModel``) as a pejax generator.

    Build it with :meth:`from_pretrained`. Class-conditional when the UNet has class embeddings
    (``num_class_embeds``): label y is passed as ``class_labels=y``; otherwise labels are ignored (every class
    starts from the same unconditional model, as in the PE paper's unconditional experiments).

    Attributes:
      name: ``"diffusers:<pipeline class>:<folder name>"``.
      modality: ``"image"``.
      image_shape: (H, W, C) of the samples.
      num_classes: number of class embeddings, or ``None`` for an unconditional UNet.
      pipeline: the loaded Diffusers pipeline (its ``unet`` and ``scheduler`` are used).
    """

    modality = "image"

    def __init__(
        self,
        pipeline,
        *,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        batch_size: int = 16,
        device: Any = "cpu",
        dtype: Any = "float32",
        progress: bool = False,
        name: str | None = None,
    ):
        """Wraps a loaded pipeline; prefer :meth:`from_pretrained`, which documents the arguments."""
        torch, diffusers = _imports()
        if not isinstance(pipeline, diffusers.DDPMPipeline | diffusers.DDIMPipeline):
            raise TypeError(
                f"pipeline must be a diffusers DDPMPipeline or DDIMPipeline, got {type(pipeline).__name__}; "
                "use StableDiffusionGenerator for Stable Diffusion."
            )
        if not isinstance(pipeline.unet, diffusers.UNet2DModel):
            raise TypeError(
                f"the pipeline's unet must be a UNet2DModel, got {type(pipeline.unet).__name__}."
            )
        cfg = pipeline.unet.config
        channels = int(cfg.in_channels)
        if channels not in (1, 3):
            raise ValueError(
                f"the UNet works on {channels} channels; a pixel-space pipeline with 1 (grey) or 3 (RGB) "
                "channels is needed (latent models: use StableDiffusionGenerator)."
            )
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self._torch = torch
        self.device = tb.check_device(torch, device)
        self.dtype = tb.check_dtype(torch, dtype)
        self.batch_size = _check_positive("batch_size", batch_size)
        default_steps = 1000 if isinstance(pipeline, diffusers.DDPMPipeline) else 50
        self.num_inference_steps = _check_positive(
            "num_inference_steps",
            default_steps if num_inference_steps is None else num_inference_steps,
        )
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1] (DDIM only), got {eta!r}.")
        self.eta = float(eta)
        self.progress = bool(progress)
        self.pipeline = pipeline
        self.unet = pipeline.unet.to(self.device).eval()
        if self.unet.dtype != self.dtype:
            self.unet = self.unet.to(dtype=self.dtype)
        self.scheduler = copy.deepcopy(pipeline.scheduler)
        if not hasattr(self.scheduler, "add_noise"):
            raise TypeError(
                f"scheduler {type(self.scheduler).__name__} has no add_noise(); SDEdit variations need one "
                "(DDPMScheduler and DDIMScheduler have it)."
            )
        params = inspect.signature(self.scheduler.step).parameters
        self._step_kwargs = {"eta": self.eta} if "eta" in params else {}
        self._step_takes_generator = "generator" in params
        self.image_shape = (h, w, channels)
        ncls = getattr(cfg, "num_class_embeds", None)
        self.num_classes = None if ncls is None else int(ncls)
        self.name = name or f"diffusers:{type(pipeline).__name__}"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        batch_size: int = 16,
        device: Any = "cpu",
        dtype: Any = "float32",
        progress: bool = False,
    ) -> DiffusersGenerator:
        """Loads a saved ``DDPMPipeline``/``DDIMPipeline`` with ``DiffusionPipeline.from_pretrained(path)``.

        Args:
          path: the folder written by ``pipeline.save_pretrained(path)`` (holds ``model_index.json``).
          num_inference_steps: sampling steps of RANDOM (and the schedule VARIATION's degree is a fraction of);
            ``None``: 1000 for DDPM, 50 for DDIM (the pipelines' defaults).
          eta: DDIM's eta (0: deterministic DDIM steps); ignored by schedulers without it.
          batch_size: samples per UNet call. Does not change the samples (beyond float rounding).
          device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
          dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the UNet's dtype (images are float32).
          progress: show a tqdm bar over samples in each call.

        Returns:
          the generator.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: ``path`` is not a saved pipeline, or holds another kind of pipeline (e.g. Stable
            Diffusion), or a bad option.
          ImportError: torch or diffusers is missing (``pip install 'pejax[diffusers]'``).

        Example (not run here: needs a saved pipeline)::

          gen = DiffusersGenerator.from_pretrained("ddpm-cifar10-32", num_inference_steps=100)
          images = gen.random(jax.random.key(0), label=0, num_samples=8)   # (8, 32, 32, 3) in [0, 1]
        """
        _, diffusers = _imports()
        p, cls_name = _pipeline_class(
            path,
            _UNET_PIPELINES,
            "For Stable Diffusion use StableDiffusionGenerator.from_pretrained(path, prompts=...).",
        )
        pipeline = diffusers.DiffusionPipeline.from_pretrained(
            str(p), dtype=tb.check_dtype(tb.require("torch", _EXTRA), dtype)
        )
        gen = cls(
            pipeline,
            num_inference_steps=num_inference_steps,
            eta=eta,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
            name=f"diffusers:{cls_name}:{p.name}",
        )
        return gen

    # ------------------------------------------------------------------------------------------ helpers
    def _labels(self, label: Any, n: int):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
            raise ValueError(f"label must be an integer >= 0, got {label!r}.")
        if self.num_classes is None:
            return None
        if label >= self.num_classes:
            raise ValueError(
                f"label {label} is out of range: the UNet has {self.num_classes} class embeddings "
                f"(labels 0..{self.num_classes - 1})."
            )
        return self._torch.full((n,), int(label), dtype=self._torch.long, device=self.device)

    def _denoise(self, x, timesteps, class_labels, gens):
        sched = self.scheduler
        kwargs = dict(self._step_kwargs)
        if self._step_takes_generator:
            kwargs["generator"] = gens
        for t in timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = self.unet(inp, t, class_labels=class_labels).sample
            x = sched.step(out, t, x, **kwargs).prev_sample
        return x

    def _run(self, key, n: int, desc: str, body) -> jax.Array:
        torch = self._torch
        from diffusers.utils.torch_utils import randn_tensor

        seeds = tb.sample_seeds(key, n)
        bar = tb.progress_bar(n, desc, self.progress)
        parts = []
        with tb.deterministic(torch):
            for s, e in tb.batches(n, self.batch_size):
                gens = tb.torch_generators(torch, seeds[s:e], self.device)
                shape = (e - s, self.image_shape[2], *self.image_shape[:2])
                noise = randn_tensor(shape, generator=gens, device=self.device, dtype=self.dtype)
                parts.append(body(s, e, noise, gens))
                bar.update(e - s)
        bar.close()
        return _concat(parts, self.image_shape)

    # ------------------------------------------------------------------------------------------ protocol
    def random(self, key: jax.Array, label: int, num_samples: int) -> jax.Array:
        """Samples ``num_samples`` images of class ``label`` by the pipeline's reverse diffusion.

        Args:
          key: ``jax.random`` key; sample i depends only on ``fold_in(key, i)``.
          label: class index (ignored by an unconditional UNet).
          num_samples: N >= 0.

        Returns:
          float32 (N, H, W, C) images in [0, 1].
        """
        key = _validate.check_key(key)
        n = _check_count("num_samples", num_samples)
        labels = self._labels(label, n)
        self.scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps

        def body(s, e, noise, gens):
            x = noise * getattr(self.scheduler, "init_noise_sigma", 1.0)
            lab = None if labels is None else labels[s:e]
            x = self._denoise(x, timesteps, lab, gens)
            return _nchw_to_jax(self._torch, x / 2 + 0.5)

        return self._run(key, n, f"{self.name} random", body)

    def variation(self, key: jax.Array, samples: Any, label: int, degree: float) -> jax.Array:
        """SDEdit: noise each image to the step given by ``degree`` and denoise it.

        Args:
          key: ``jax.random`` key; sample i depends only on ``fold_in(key, i)`` and sample i.
          samples: float (N, H, W, C) images in [0, 1] of this generator's shape.
          label: class index (ignored by an unconditional UNet).
          degree: in [0, 1], the fraction of the ``num_inference_steps`` schedule re-run; below
            ``1 / num_inference_steps`` the images are returned unchanged.

        Returns:
          float32 (N, H, W, C) images in [0, 1].
        """
        key = _validate.check_key(key)
        images = _check_images("samples", samples, self.image_shape)
        d = _check_degree(degree)
        n = images.shape[0]
        labels = self._labels(label, n)
        steps = self.num_inference_steps
        run_steps = min(int(steps * d), steps)
        if run_steps == 0 or n == 0:
            return images
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps[steps - run_steps :]
        torch = self._torch

        def body(s, e, noise, gens):
            x0 = tb.to_torch(torch, images[s:e], self.device, self.dtype).permute(0, 3, 1, 2)
            x0 = x0 * 2 - 1
            t0 = timesteps[:1].repeat(e - s)
            x = self.scheduler.add_noise(x0, noise, t0)
            lab = None if labels is None else labels[s:e]
            x = self._denoise(x, timesteps, lab, gens)
            return _nchw_to_jax(torch, x / 2 + 0.5)

        return self._run(key, n, f"{self.name} variation", body)

    def to_images(self, samples: Any) -> jax.Array:
        """The samples are images: returns them as float32 (N, H, W, C) in [0, 1]."""
        return jnp.clip(_check_images("samples", samples, self.image_shape), 0.0, 1.0)


class StableDiffusionGenerator:
    """Stable Diffusion as a pejax generator: text-to-image RANDOM, image-to-image VARIATION.

    Build it with :meth:`from_pretrained`. RANDOM(y) is text-to-image with ``prompts[y]``; VARIATION is
    ``StableDiffusionImg2ImgPipeline`` (built from the same components) with ``strength = degree`` and the same
    prompt. A safety checker saved in the folder stays active (it replaces flagged images by black ones).

    Attributes:
      name: ``"diffusers:<pipeline class>:<folder name>"``.
      modality: ``"image"``.
      prompts: one prompt per class.
      image_shape: (H, W, 3) of the samples.
      pipeline: the text-to-image pipeline; ``img2img``: the image-to-image one (shared modules).
    """

    modality = "image"

    def __init__(
        self,
        pipeline,
        *,
        prompts: Sequence[str] | Mapping[int, str],
        negative_prompt: str | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 4,
        device: Any = "cpu",
        dtype: Any = "float32",
        progress: bool = False,
        name: str | None = None,
    ):
        """Wraps a loaded pipeline; prefer :meth:`from_pretrained`, which documents the arguments."""
        torch, diffusers = _imports()
        if not isinstance(
            pipeline,
            diffusers.StableDiffusionPipeline | diffusers.StableDiffusionImg2ImgPipeline,
        ):
            raise TypeError(
                "pipeline must be a diffusers StableDiffusionPipeline (or StableDiffusionImg2ImgPipeline), "
                f"got {type(pipeline).__name__}; use DiffusersGenerator for DDPM/DDIM pipelines."
            )
        self._torch = torch
        self.prompts = tb.check_prompts(prompts)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or None, got {negative_prompt!r}.")
        self.negative_prompt = negative_prompt
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, numbers.Real)
            or not np.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(
                f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}."
            )
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = _check_positive("num_inference_steps", num_inference_steps)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.device = tb.check_device(torch, device)
        self.dtype = tb.check_dtype(torch, dtype)
        self.progress = bool(progress)
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        size = pipeline.unet.config.sample_size
        default = int(size if isinstance(size, int) else size[0]) * scale
        h = default if height is None else _check_positive("height", height)
        w = default if width is None else _check_positive("width", width)
        if h % scale or w % scale:
            raise ValueError(
                f"height and width must be multiples of {scale} (the VAE's scale factor), got {h} x {w}."
            )
        self.image_shape = (h, w, 3)
        pipeline = pipeline.to(self.device)
        if pipeline.dtype != self.dtype:
            pipeline = pipeline.to(dtype=self.dtype)
        comps = dict(pipeline.components)
        requires = bool(getattr(pipeline.config, "requires_safety_checker", False))
        requires = requires and comps.get("safety_checker") is not None
        if isinstance(pipeline, diffusers.StableDiffusionImg2ImgPipeline):
            self.img2img = pipeline
            self.pipeline = diffusers.StableDiffusionPipeline(
                **comps, requires_safety_checker=requires
            )
        else:
            self.pipeline = pipeline
            self.img2img = diffusers.StableDiffusionImg2ImgPipeline(
                **comps, requires_safety_checker=requires
            )
        for p in (self.pipeline, self.img2img):
            p.set_progress_bar_config(disable=True)
        self.name = name or f"diffusers:{type(pipeline).__name__}"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        prompts: Sequence[str] | Mapping[int, str],
        negative_prompt: str | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 4,
        device: Any = "cpu",
        dtype: Any = "float32",
        progress: bool = False,
    ) -> StableDiffusionGenerator:
        """Loads a saved Stable Diffusion pipeline with ``StableDiffusionPipeline.from_pretrained(path)``.

        Args:
          path: the folder written by ``pipeline.save_pretrained(path)`` (holds ``model_index.json``).
          prompts: one prompt per class, a list (``prompts[y]``) or a mapping {0: ..., C-1: ...}.
          negative_prompt: optional negative prompt used for every class.
          guidance_scale: classifier-free guidance scale (<= 1 turns guidance off).
          num_inference_steps: denoising steps of text-to-image; img2img runs ``int(steps * degree)`` of them.
          height: image height in pixels (a multiple of the VAE factor, usually 8); default the UNet's.
          width: image width, likewise.
          batch_size: images per pipeline call. Does not change the images (beyond float rounding).
          device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
          dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the pipeline's modules.
          progress: show a tqdm bar over samples in each call.

        Returns:
          the generator.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: ``path`` is not a saved pipeline, holds another kind of pipeline, or a bad option.
          ImportError: torch, diffusers or transformers is missing (``pip install 'pejax[diffusers]'``).

        Example (not run here: needs saved weights)::

          gen = StableDiffusionGenerator.from_pretrained(
              "stable-diffusion-v1-5", prompts=["a photo of a cat", "a photo of a dog"],
              device="cuda", dtype="float16", num_inference_steps=25)
        """
        torch, diffusers = _imports()
        tb.require("transformers", _EXTRA)
        p, cls_name = _pipeline_class(
            path,
            _SD_PIPELINES,
            "For DDPM/DDIM pipelines use DiffusersGenerator.from_pretrained(path).",
        )
        prompts = tb.check_prompts(prompts)
        pipeline = diffusers.StableDiffusionPipeline.from_pretrained(
            str(p), dtype=tb.check_dtype(torch, dtype)
        )
        return cls(
            pipeline,
            prompts=prompts,
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
            name=f"diffusers:{cls_name}:{p.name}",
        )

    def _run(self, key, n: int, desc: str, call) -> jax.Array:
        torch = self._torch
        seeds = tb.sample_seeds(key, n)
        bar = tb.progress_bar(n, desc, self.progress)
        parts = []
        with tb.deterministic(torch):
            for s, e in tb.batches(n, self.batch_size):
                gens = tb.torch_generators(torch, seeds[s:e], self.device)
                kwargs = {
                    "negative_prompt": None
                    if self.negative_prompt is None
                    else [self.negative_prompt] * (e - s),
                    "guidance_scale": self.guidance_scale,
                    "num_inference_steps": self.num_inference_steps,
                    "generator": gens,
                    "output_type": "pt",
                }
                out = call(s, e, kwargs).images
                parts.append(_nchw_to_jax(torch, out))
                bar.update(e - s)
        bar.close()
        return _concat(parts, self.image_shape)

    def random(self, key: jax.Array, label: int, num_samples: int) -> jax.Array:
        """Text-to-image with ``prompts[label]``.

        Args:
          key: ``jax.random`` key; image i depends only on ``fold_in(key, i)``.
          label: class index in [0, len(prompts)).
          num_samples: N >= 0.

        Returns:
          float32 (N, H, W, 3) images in [0, 1].
        """
        key = _validate.check_key(key)
        n = _check_count("num_samples", num_samples)
        prompt = tb.prompt_for(self.prompts, label)
        h, w, _ = self.image_shape

        def call(s, e, kwargs):
            return self.pipeline(prompt=[prompt] * (e - s), height=h, width=w, **kwargs)

        return self._run(key, n, f"{self.name} random", call)

    def variation(self, key: jax.Array, samples: Any, label: int, degree: float) -> jax.Array:
        """Image-to-image with ``prompts[label]`` and ``strength = degree``.

        Args:
          key: ``jax.random`` key; image i depends only on ``fold_in(key, i)`` and sample i.
          samples: float (N, H, W, 3) images in [0, 1] of this generator's shape.
          label: class index in [0, len(prompts)).
          degree: img2img strength in [0, 1]; below ``1 / num_inference_steps`` the images are returned
            unchanged (img2img would run no step). Any positive strength passes the images through the VAE.

        Returns:
          float32 (N, H, W, 3) images in [0, 1].
        """
        key = _validate.check_key(key)
        images = _check_images("samples", samples, self.image_shape)
        d = _check_degree(degree)
        prompt = tb.prompt_for(self.prompts, label)
        n = images.shape[0]
        if int(self.num_inference_steps * d) == 0 or n == 0:
            return images
        torch = self._torch

        def call(s, e, kwargs):
            x = tb.to_torch(torch, images[s:e], self.device, self.dtype).permute(0, 3, 1, 2)
            return self.img2img(prompt=[prompt] * (e - s), image=x, strength=d, **kwargs)

        return self._run(key, n, f"{self.name} variation", call)

    def to_images(self, samples: Any) -> jax.Array:
        """The samples are images: returns them as float32 (N, H, W, 3) in [0, 1]."""
        return jnp.clip(_check_images("samples", samples, self.image_shape), 0.0, 1.0)


__all__ = ["DiffusersGenerator", "StableDiffusionGenerator"]
