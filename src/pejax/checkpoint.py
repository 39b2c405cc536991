"""Atomic, checksummed, pickle-free checkpoints.

Checkpoints are private artifacts: they hold the run's secret noise key (see :mod:`pejax.secure_noise`), so the
folder is made owner-only (0700) and every file is created owner-only (0600). Do not share them.

One checkpoint is one ``.npz`` file (never pickled: it is read with ``allow_pickle=False``) holding the run's
arrays and, under the name ``__meta__``, a UTF-8 JSON document with the scalar state and a SHA-256 checksum of
every array. It is written to a temporary file in the same folder, flushed and fsynced, then renamed over the
final name (``os.replace`` is atomic on POSIX), and the folder is fsynced: a crash leaves either the old
checkpoint or the new one, never a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import warnings
import zipfile

import numpy as np

from pejax.mechanism import PejaxWarning

_NAME = re.compile(r"^ckpt-(\d{6})\.npz$")
META_KEY = "__meta__"
FORMAT_VERSION = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or fails its checksum."""


class CorruptCheckpointWarning(PejaxWarning):
    """A corrupt checkpoint was skipped in favour of an older valid one."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def checkpoint_path(directory: str | os.PathLike, iteration: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"ckpt-{iteration:06d}.npz"


def save_checkpoint(
    directory: str | os.PathLike,
    iteration: int,
    arrays: dict[str, np.ndarray],
    meta: dict,
    *,
    keep: int = 2,
) -> pathlib.Path:
    """Writes ``ckpt-<iteration>.npz`` atomically and deletes all but the ``keep`` newest checkpoints.

    Args:
      directory: checkpoint folder (created if missing).
      iteration: iteration number in the file name.
      arrays: name -> numeric array (no object arrays). Names must not start with ``__``.
      meta: JSON-serialisable dict of scalar state.
      keep: how many checkpoints to keep (>= 1).

    Returns:
      the path written.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Checkpoints are private artifacts (they hold the run's secret noise key): owner-only.
    directory.chmod(0o700)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for name, a in arrays.items():
        if name.startswith("__") or a.dtype == object:
            raise ValueError(f"checkpoint array {name!r} must be numeric with a plain name.")
    doc = {"format": FORMAT_VERSION, "sha256": _digest(arrays), "meta": meta}
    payload = dict(arrays)
    payload[META_KEY] = np.frombuffer(json.dumps(doc, sort_keys=True).encode(), dtype=np.uint8)
    final = checkpoint_path(directory, iteration)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads and verifies one checkpoint; returns ``(arrays, meta)``.

    Raises:
      CorruptCheckpointError: unreadable, truncated, not a pejax checkpoint, or checksum mismatch. The
        message names the file.
    """
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is unreadable or truncated ({type(e).__name__}: {e})."
        ) from e
    if META_KEY not in arrays:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} has no {META_KEY} entry.")
    try:
        doc = json.loads(arrays.pop(META_KEY).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} has a malformed {META_KEY}: {e}"
        ) from e
    if doc.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} has format {doc.get('format')!r}, expected {FORMAT_VERSION}."
        )
    if doc.get("sha256") != _digest(arrays):
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} fails its SHA-256 checksum: the file was modified or damaged."
        )
    return arrays, doc["meta"]


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_valid_checkpoint(directory: str | os.PathLike):
    """The newest checkpoint that verifies, as ``(path, arrays, meta)``, or ``None`` when there is none.

    Corrupt newer checkpoints are skipped with a :class:`CorruptCheckpointWarning` naming them; they are left
    on disk untouched for inspection.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            arrays, meta = load_checkpoint(path)
        except CorruptCheckpointError as e:
            warnings.warn(
                f"{e} Falling back to an older checkpoint.", CorruptCheckpointWarning, stacklevel=2
            )
            continue
        return path, arrays, meta
    return None
