"""Eager argument validation shared by every public function.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument, quotes the value (or its
shape and dtype) and says how to fix it. Checks run in Python before tracing: they never run inside ``jit``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def is_traced(x: Any) -> bool:
    """True when ``x`` is an abstract tracer (we are inside ``jit``/``vmap``): value checks must be skipped."""
    return isinstance(x, jax.core.Tracer)


def on_host(x: Any) -> bool:
    """True for NumPy arrays and concrete JAX arrays on the CPU: checks can then read them for free in NumPy."""
    if isinstance(x, np.ndarray):
        return True
    if isinstance(x, jax.Array) and not is_traced(x):
        try:
            return all(d.platform == "cpu" for d in x.devices())
        except Exception:  # pragma: no cover - arrays without device information
            return False
    return False


# XLA:CPU uses a host buffer in place (no copy) when its data start on a 64-byte boundary; NumPy's own large
# allocations are only 16-byte aligned.
ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered NumPy array whose data start on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    offset = -buf.ctypes.data % ALIGN
    return buf[offset : offset + nbytes].view(dtype).reshape(shape)


def to_device(x: Any, dtype: Any = None) -> jax.Array:
    """A JAX array of ``x``. NumPy input goes through ``jax.device_put`` (``jnp.asarray`` of NumPy compiles a
    small staging program for every new shape, hundreds in a PE run).

    On the CPU, ``jax.device_put`` (jaxlib 0.10) uses a C-contiguous NumPy array in place when its data are
    64-byte aligned and copies it otherwise (``jnp.asarray`` always copies). A dtype conversion is therefore
    written into an aligned buffer, which the device then uses without a second copy.
    """
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    arr = np.asarray(x)
    target = dtype
    if target is None and arr.dtype == np.float64 and not jax.config.jax_enable_x64:
        target = np.float32
    elif target is None and arr.dtype == np.int64 and not jax.config.jax_enable_x64:
        target = np.int32
    if target is not None and np.dtype(target) != arr.dtype:
        out = aligned_empty(arr.shape, target)
        np.copyto(out, arr, casting="unsafe")
        arr = out
    return jax.device_put(arr)


def leading_rows(x: Any, n: int) -> jax.Array:
    """The first ``n`` rows of ``x`` as a JAX array (``x`` itself when it has n rows). CPU arrays are sliced in
    NumPy: slicing a JAX array compiles a program per size."""
    if x.shape[0] == n:
        return x
    if on_host(x):
        return jax.device_put(np.asarray(x)[:n])
    return x[:n]


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Returns ``value`` as an ``int`` after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}.")
    return int(value)


def finite_float(
    name: str, value: Any, *, minimum: float | None = None, strict: bool = False
) -> float:
    """Returns ``value`` as a finite ``float``; with ``minimum``, checks ``value >= minimum`` (``>`` if strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if minimum is not None:
        if strict and not value > minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}.")
        if not strict and not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def epsilon(value: Any, name: str = "epsilon") -> float:
    """Checks a privacy parameter epsilon: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {value!r}.")
    value = float(value)
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(
            f"{name} must be a finite number > 0, got {value}. Pass e.g. {name}=1.0; for a run without "
            "privacy use noise_multiplier=0 explicitly instead of an infinite epsilon."
        )
    return value


def delta(value: Any, name: str = "delta") -> float:
    """Checks a privacy parameter delta: a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1), got {value!r}.")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{name} must lie strictly between 0 and 1, got {value}. A usual choice is "
            f"{name} = 1 / (n ln n) for n private samples, well below 1/n."
        )
    return value


def check_key(key: Any, name: str = "key") -> jax.Array:
    """Checks that ``key`` is a ``jax.random`` key: a typed key array (``jax.random.key``) of any shape, or a
    raw uint32 key of shape (2,) (``jax.random.PRNGKey``). Traced keys (inside ``jit``/``vmap``) pass.

    Returns the key unchanged. A key is never defaulted: ``None`` is refused with the fix.
    """
    if key is None:
        raise TypeError(
            f"{name} is required: pass a jax.random key, e.g. {name}=jax.random.key(0)."
        )
    if isinstance(key, jax.Array) and (
        jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.shape == (2,) and key.dtype == jax.numpy.uint32)
    ):
        return key
    raise TypeError(
        f"{name} must be a jax.random key (e.g. jax.random.key(0)), got {type(key).__name__} "
        f"{getattr(key, 'dtype', '')} {getattr(key, 'shape', '')}."
    )


def one_of(name: str, value: Any, options: tuple[str, ...]) -> str:
    """Checks that ``value`` is one of the strings ``options`` (exact match)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}.")
    return value


def matrix(name: str, x: Any, *, allow_traced: bool = True) -> jax.Array:
    """Checks a 2-D floating-point array with at least one row and column and only finite values.

    Returns the array as a JAX array (float64 inputs are kept as they are; integer inputs are refused).
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (num_samples, dim), got shape {tuple(x.shape)}. "
            "Reshape it, e.g. x.reshape(len(x), -1)."
        )
    if (
        not np.issubdtype(np.dtype(x.dtype), np.floating)
        and np.dtype(x.dtype) != jax.numpy.bfloat16
    ):
        raise TypeError(
            f"{name} must have a floating dtype, got {x.dtype}. Convert it, e.g. {name}.astype(np.float32)."
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}.")
    if is_traced(x):
        if not allow_traced:
            raise TypeError(f"{name} must be a concrete array, not a traced value.")
        return x
    if on_host(x):
        finite = bool(np.isfinite(np.asarray(x)).all())
    else:
        finite = bool(jax.numpy.isfinite(jax.numpy.asarray(x)).all())
    if not finite:
        bad = np.argwhere(~np.isfinite(np.asarray(x, dtype=np.float32)))
        row = int(bad[0][0])
        raise ValueError(
            f"{name} contains NaN or Inf ({len(bad)} entries, first in row {row}). Embeddings must be finite: "
            "check the embedding function or the images that produced row "
            f"{row}; drop or repair those rows before voting."
        )
    return to_device(x) if isinstance(x, np.ndarray) else jax.numpy.asarray(x)


def did_you_mean(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def known_keys(where: str, values: Any, valid) -> dict:
    """Returns ``values`` as a dict after refusing keys outside ``valid`` with a did-you-mean hint.

    Args:
      where: how the config names the table, e.g. ``"config section [generator] (kind 'diffusers')"``.
      values: the table (``None`` is an empty table).
      valid: the accepted keys.

    Raises:
      ValueError: ``values`` is not a table, or holds an unknown key (the message lists the valid ones).
    """
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{where} must be a table of keys, got {type(values).__name__}: {values!r}."
        )
    unknown = sorted(set(values) - set(valid))
    if unknown:
        hints = ", ".join(f"{k!r}{did_you_mean(k, valid)}" for k in unknown)
        raise ValueError(
            f"unknown key(s) in {where}: {hints}. Valid keys: {', '.join(sorted(valid))}."
        )
    return dict(values)
