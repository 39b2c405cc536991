"""Private helpers shared by the PyTorch adapters (Diffusers, transformers, sentence-transformers).

Imported only by those adapters, never by ``import pejax``. Covers: importing an optional dependency with an
error that names the extra to install, device and dtype options, per-sample seeds derived from a
``jax.random`` key, DLPack transfers between torch and JAX, and a context that turns on torch's deterministic
algorithms for the duration of a call.
"""

from __future__ import annotations

import contextlib
import importlib
import numbers
import os
import pathlib
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = ("float32", "float16", "bfloat16")


def check_prompts(prompts: Any) -> tuple[str, ...]:
    """Validates per-class prompts (a sequence, or a mapping with keys 0..C-1); ``prompts[y]`` is class y's."""
    if isinstance(prompts, Mapping):
        keys = sorted(prompts)
        if keys != list(range(len(keys))):
            raise ValueError(
                f"prompts given as a mapping must have the keys 0..C-1 (one per class), got {keys!r}."
            )
        prompts = [prompts[k] for k in keys]
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(
            "prompts must be a non-empty list of strings, one per class (prompts[y] is the prompt of "
            f"class y), got {prompts!r}."
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] must be a non-empty string, got {p!r}.")
    return tuple(prompts)


def prompt_for(prompts: tuple[str, ...], label: Any) -> str:
    """The prompt of class ``label``; a clear error for a non-integer or unknown label."""
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise ValueError(f"label must be an integer class index, got {label!r}.")
    if not 0 <= label < len(prompts):
        raise ValueError(
            f"label {label} has no prompt: prompts were given for classes 0..{len(prompts) - 1}."
        )
    return prompts[int(label)]


def local_folder(path: Any, missing: str) -> pathlib.Path:
    """Checks that ``path`` names an existing local folder; ``missing`` is the error when it does not exist.

    ``missing`` may use ``{path}`` for the quoted path.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"path must be a folder path (str or os.PathLike), got {type(path).__name__}."
        )
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(missing.format(path=repr(str(p))))
    return p


def require(module: str, extra: str):
    """Imports ``module`` or raises ImportError naming the pejax extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this pejax adapter needs the package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'pejax[{extra}]'."
        ) from e


_SEED_BLOCK = 256


@jax.jit
def _seed_block(key: jax.Array, start: jax.Array) -> jax.Array:
    idx = start + jnp.arange(_SEED_BLOCK, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), (2,), jnp.uint32))(idx)


def sample_seeds(key: jax.Array, num: int) -> list[int]:
    """One 63-bit torch seed per sample: seed i comes from ``fold_in(key, i)`` only.

    Seed i does not depend on ``num``, so the first m samples of a call for n >= m samples are the samples of
    a call for m (same key), whatever the batch size. Computed in jitted blocks of 256 (one compilation).
    """
    blocks = [_seed_block(key, jnp.uint32(start)) for start in range(0, num, _SEED_BLOCK)]
    if not blocks:
        return []
    bits = np.concatenate([np.asarray(jax.device_get(b)) for b in blocks])[:num].astype(np.uint64)
    return [int(((hi & 0x7FFFFFFF) << 32) | lo) for hi, lo in bits]


def torch_generators(torch, seeds: list[int], device) -> list:
    """A seeded ``torch.Generator`` per seed, on ``device``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def check_device(torch, device: Any):
    """Validates a torch device given as a string or ``torch.device``; CUDA must be available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}."
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for but torch sees no CUDA device; use device='cpu'."
        )
    return dev


def check_dtype(torch, dtype: Any):
    """Maps ``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the torch dtype itself) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}.")
    return getattr(torch, dtype)


def to_jax(tensor) -> jax.Array:
    """Moves a torch tensor to JAX through DLPack (zero-copy on CPU when the layout allows it).

    A CUDA tensor is handed over directly when JAX has a GPU backend, else moved to the CPU first. bfloat16
    and float16 are kept; callers cast.
    """
    t = tensor.detach()
    if t.device.type != "cpu" and jax.default_backend() == "cpu":
        t = t.cpu()
    t = t.contiguous()
    try:
        return jax.dlpack.from_dlpack(t)
    except Exception:  # pragma: no cover - e.g. a device JAX cannot import from
        return jax.dlpack.from_dlpack(t.cpu().contiguous())


def to_torch(torch, array: Any, device=None, dtype=None):
    """Moves an array (JAX or NumPy) to torch through DLPack, then to ``device``/``dtype`` if given.

    The result may share memory with ``array``: callers never modify it in place.
    """
    if isinstance(array, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(array))
    else:
        t = torch.from_dlpack(jnp.asarray(array))
    if device is not None or dtype is not None:
        t = t.to(device=device, dtype=dtype)
    return t


@contextlib.contextmanager
def deterministic(torch):
    """Turns on torch's deterministic algorithms (warn-only) for the block, then restores the settings."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = cudnn
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def batches(num: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) bounds of consecutive batches covering ``range(num)``."""
    return [(s, min(s + batch_size, num)) for s in range(0, num, batch_size)]


class NullBar:
    """A progress bar that shows nothing (``update`` and ``close`` do nothing), so callers need no checks."""

    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


NULL_BAR = NullBar()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` samples, or :data:`NULL_BAR` when disabled or tqdm is missing."""
    if not enabled:
        return NULL_BAR
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers and diffusers
        return NULL_BAR
    return tqdm(total=total, desc=desc, unit="sample", leave=False)
