"""Model checkpoint folders of :mod:`pejax.generators.diffusion`: writing, reading and restoring a Flax model.

A checkpoint is a folder::

  config.json        format, schedule, image shape, class conditioning, the UNet architecture, metadata
  params/            the model state restored with orbax (``StandardCheckpointer``), or
  params.msgpack     the same state serialised with ``flax.serialization`` (msgpack)

Public names are re-exported by :mod:`pejax.generators.diffusion`; import them from there.
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pejax import _validate
from pejax.errors import ModelCheckpointError
from pejax.generators._diffusion_schedule import ScheduleConfig

CHECKPOINT_FORMAT = "pejax-flax-diffusion"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
ORBAX_DIR = "params"
MSGPACK_FILE = "params.msgpack"


def _image_shape(value: Any) -> tuple[int, int, int]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
        or min(value) < 1
        or value[2] not in (1, 3)
    ):
        raise ValueError(
            f"image_shape must be (H, W, C) positive integers with C 1 (grey) or 3 (RGB), got {value!r}; "
            "e.g. image_shape=(16, 16, 1)."
        )
    return tuple(int(v) for v in value)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints.

_SAVED = nnx.Not(nnx.RngState)  # everything but RNG streams (parameters, batch statistics, ...)


def _flat(tree) -> dict[str, Any]:
    """{'a/b/0': leaf} with every key as a string (orbax and msgpack turn int keys into strings)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for p in path:
            k = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
            parts.append(str(k))
        out["/".join(parts)] = leaf
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    image_shape: tuple[int, int, int],
    schedule: ScheduleConfig,
    class_conditional: bool | None = None,
    num_classes: int | None = None,
    params_format: str = "orbax",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a model checkpoint folder (config JSON beside orbax or msgpack parameters).

    The folder is assembled under a temporary name and renamed into place, so ``path`` never holds a
    half-written checkpoint. The architecture is recorded when ``model`` is a pejax
    :class:`~pejax.generators.unet.UNet`; other models must be passed to ``from_checkpoint(model=...)``.

    Args:
      path: the folder to create.
      model: the nnx module (its state except RNG streams is saved).
      image_shape: (H, W, C) of the images.
      schedule: the training noise schedule.
      class_conditional: whether the model takes labels; ``None`` infers it as the generator does.
      num_classes: number of classes of a class-conditional model (``None``: ``model.config.num_classes``).
      params_format: ``"orbax"`` (``params/``, orbax ``StandardCheckpointer``) or ``"msgpack"``
        (``params.msgpack``, ``flax.serialization``).
      metadata: JSON-serialisable facts to record (training steps, data source, ...).
      overwrite: replace an existing folder at ``path``.

    Returns:
      the checkpoint path.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError, TypeError: bad arguments.
    """
    from pejax.generators.unet import UNet

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}.")
    _validate.one_of("params_format", params_format, ("orbax", "msgpack"))
    if not isinstance(schedule, ScheduleConfig):
        raise TypeError(f"schedule must be a ScheduleConfig, got {type(schedule).__name__}.")
    image_shape = _image_shape(image_shape)
    model_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if class_conditional is None:
        class_conditional = model_classes is not None
    if num_classes is None:
        num_classes = model_classes
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint folder {str(path)!r} already exists; choose a new path or pass overwrite=True."
        )
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "params": params_format,
        "image_shape": list(image_shape),
        "schedule": schedule.to_dict(),
        "class_conditional": bool(class_conditional),
        "num_classes": None if num_classes is None else int(num_classes),
        "model": "unet" if isinstance(model, UNet) else type(model).__name__,
        "unet": model.config.to_dict() if isinstance(model, UNet) else None,
        "metadata": metadata or {},
    }
    text = json.dumps(doc, indent=2, sort_keys=True)  # fails early on non-JSON metadata
    state = nnx.to_pure_dict(nnx.state(model, _SAVED))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if params_format == "orbax":
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / ORBAX_DIR, state)
                ckptr.wait_until_finished()
        else:
            from flax import serialization

            (tmp / MSGPACK_FILE).write_bytes(serialization.msgpack_serialize(_host(state)))
        (tmp / CONFIG_FILE).write_text(text)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _host(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"model checkpoint {str(path)!r} does not exist; pass the folder written by "
            "pejax.generators.diffusion.save_checkpoint (it holds config.json and params/)."
        )
    if not path.is_dir():
        raise ModelCheckpointError(
            f"model checkpoint {str(path)!r} is a file; a checkpoint is a folder with {CONFIG_FILE}."
        )
    cfg_path = path / CONFIG_FILE
    try:
        doc = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ModelCheckpointError(
            f"{str(path)!r} is not a pejax diffusion checkpoint: it has no {CONFIG_FILE}."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelCheckpointError(f"{str(cfg_path)!r} is not valid JSON ({e}).") from e
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ModelCheckpointError(
            f"{str(cfg_path)!r} does not describe a {CHECKPOINT_FORMAT!r} checkpoint."
        )
    if doc.get("version") != CHECKPOINT_VERSION:
        raise ModelCheckpointError(
            f"{str(cfg_path)!r} has version {doc.get('version')!r}; this pejax reads version "
            f"{CHECKPOINT_VERSION}."
        )
    missing = [
        k for k in ("params", "image_shape", "schedule", "class_conditional") if k not in doc
    ]
    if missing:
        raise ModelCheckpointError(f"{str(cfg_path)!r} lacks the entries {missing}.")
    return doc


def _read_params(path: pathlib.Path, doc: dict[str, Any]):
    fmt = doc["params"]
    try:
        if fmt == "orbax":
            target = path / ORBAX_DIR
            if not target.is_dir():
                raise ModelCheckpointError(
                    f"model checkpoint {str(path)!r} is incomplete: {ORBAX_DIR}/ is missing."
                )
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(target)
        if fmt == "msgpack":
            from flax import serialization

            target = path / MSGPACK_FILE
            if not target.is_file():
                raise ModelCheckpointError(
                    f"model checkpoint {str(path)!r} is incomplete: {MSGPACK_FILE} is missing."
                )
            return serialization.msgpack_restore(target.read_bytes())
    except ModelCheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore/msgpack raise many types for damaged files
        raise ModelCheckpointError(
            f"the parameters of model checkpoint {str(path)!r} are unreadable or damaged "
            f"({type(e).__name__}: {str(e)[:300]})."
        ) from e
    raise ModelCheckpointError(
        f"{str(path / CONFIG_FILE)!r} names an unknown parameter format {fmt!r}."
    )


def load_model(
    path: str | os.PathLike, *, model: nnx.Module | None = None
) -> tuple[nnx.Module, dict[str, Any]]:
    """Restores the model of a checkpoint folder; returns ``(model, config dict)``.

    Args:
      path: the checkpoint folder.
      model: a module of the checkpoint's architecture (its state is not modified: a new module is returned);
        ``None`` rebuilds the recorded pejax UNet.

    Returns:
      the restored module and the checkpoint's ``config.json`` contents.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ModelCheckpointError: see :meth:`FlaxDiffusionGenerator.from_checkpoint`.
    """
    from pejax.generators.unet import UNet
    from pejax.generators.unet import UNetConfig

    path = pathlib.Path(path).absolute()
    doc = _read_config(path)
    if model is None:
        if doc.get("unet") is None:
            raise ValueError(
                f"checkpoint {str(path)!r} holds a {doc.get('model')!r} model, not a pejax UNet: pass "
                "model=<a module of that architecture> to restore its parameters into."
            )
        try:
            unet_config = UNetConfig.from_dict(doc["unet"])
        except (TypeError, ValueError) as e:
            raise ModelCheckpointError(
                f"{str(path / CONFIG_FILE)!r} has an invalid UNet architecture: {e}"
            ) from e
        model = nnx.eval_shape(lambda: UNet(unet_config, rngs=nnx.Rngs(0)))
    elif not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module or None, got {type(model).__name__}.")
    graphdef, saved, rest = nnx.split(model, _SAVED, ...)
    target = nnx.to_pure_dict(saved)
    loaded = _flat(_read_params(path, doc))
    expected = _flat(target)
    problems = []
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in sorted(set(expected) & set(loaded)):
        want, got = expected[k], loaded[k]
        if tuple(np.shape(got)) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{k}: checkpoint {np.dtype(got.dtype)}{list(np.shape(got))}, model "
                f"{np.dtype(want.dtype)}{list(want.shape)}"
            )
    if problems:
        raise ModelCheckpointError(
            f"the parameters in {str(path)!r} do not fit the model's architecture: "
            + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else "")
            + ". Was it written for another architecture, or is it damaged?"
        )
    keys = list(expected)  # in the flattening order of ``target``
    restored = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(target),
        [jnp.asarray(np.asarray(loaded[k])) for k in keys],  # uncommitted, as freshly built
    )
    nnx.replace_by_pure_dict(saved, restored)
    return nnx.merge(graphdef, saved, rest), doc
