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

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import re
import socket
import time
import warnings
import zipfile
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np

from pejax.errors import CorruptCheckpointError as CorruptCheckpointError
from pejax.errors import CorruptCheckpointWarning as CorruptCheckpointWarning
from pejax.errors import FolderInUseError as FolderInUseError
from pejax.errors import ForeignCheckpointError as ForeignCheckpointError

_NAME = re.compile(r"^ckpt-(\d{6})\.npz$")
# Temporary files of pejax's atomic writers: ".<final name>.tmp-<pid>" (plus ".png" for images).
_TMP_NAME = re.compile(r"^\..+\.tmp-\d+(\.png)?$")
META_KEY = "__meta__"
FORMAT_VERSION = 1
LOCK_NAME = ".pejax.lock"


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

    Raises:
      OSError: the write failed (disk full, read-only folder, ...); the message names the checkpoint, the
        previous checkpoints are untouched and no temporary file is left behind.
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
    write_atomically(final, lambda f: np.savez(f, **payload), what="checkpoint", mode=0o600)
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


# ------------------------------------------------------------------------------------------------------------
# Atomic writes, temporary files, folder locks.


def write_atomically(
    path: str | os.PathLike,
    write: Callable,
    *,
    what: str = "file",
    suffix: str = "",
    mode: int | None = None,
) -> pathlib.Path:
    """Writes ``path`` through a temporary file in the same folder, fsynced and renamed over ``path``.

    Args:
      path: final file name.
      write: called with a binary file object open for writing (``f.write(data)``, ``np.savez(f, ...)``) or,
        when ``suffix`` is given, with the temporary path (for writers that choose the format from the name,
        e.g. ``savefig``).
      what: how the error message names the file (``"checkpoint"``, ``"synthetic data"``).
      suffix: appended to the temporary name (``".png"``); the writer then receives the temporary path.
      mode: permission bits of the new file (e.g. ``0o600`` for private checkpoints), set before any byte is
        written; ``None``: the process's default (umask).

    Returns:
      ``path`` as a :class:`pathlib.Path`.

    Raises:
      OSError: the write failed (``ENOSPC`` disk full, ``EROFS`` read-only, ...). The temporary file is
        removed, the old ``path`` (if any) is untouched, and the message names ``path``, the cause and the fix.

    Example:
      >>> import tempfile
      >>> p = write_atomically(pathlib.Path(tempfile.mkdtemp()) / "a.bin", lambda f: f.write(b"hi"))
      >>> p.read_bytes(), [q.name for q in p.parent.iterdir()]
      (b'hi', ['a.bin'])
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        if suffix:
            write(tmp)
            if mode is not None:
                os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            # 0o666 & ~umask, as open() would give: os.open's default 0o777 would make data files executable.
            fd = os.open(tmp, flags, 0o666 if mode is None else mode)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | NotADirectoryError):
            hint = {
                errno.ENOSPC: "the disk is full: free some space",
                errno.EDQUOT: "the disk quota is exhausted: free some space",
                errno.EFBIG: "the file is larger than this system allows",
                errno.EROFS: "the file system is read-only: choose a writable folder",
                errno.EACCES: "permission denied: choose a writable folder",
                errno.EPERM: "permission denied: choose a writable folder",
            }.get(e.errno, e.strerror or str(e))
            raise OSError(
                e.errno, f"could not write {what} {str(path)!r}: {hint}; nothing was replaced"
            ) from e
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Deletes temporary files (``.NAME.tmp-PID``) that interrupted writers left in ``folder``.

    Call it only while holding the folder's lock (:func:`lock_folder` does): no other pejax process is then
    writing there, so every such file is a leftover of a killed run.

    Returns:
      the files removed.
    """
    folder = pathlib.Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if _TMP_NAME.match(p.name) and (p.is_file() or p.is_symlink()):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(fd: int) -> dict:
    """The JSON that the lock holder wrote into the lock file ({} when empty or unreadable)."""
    try:
        raw = os.pread(fd, 4096, 0)
        doc = json.loads(raw.decode()) if raw.strip() else {}
        return doc if isinstance(doc, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _acquire(lock: pathlib.Path, what: str) -> int:
    import fcntl

    for _ in range(20):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, seen = _holder(fd), os.fstat(fd)
            os.close(fd)
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
                # The run that took the lock is dead, but a process it forked still holds the file: stale.
                # Look again after a pause (a run that has just locked a stale file writes its own PID at
                # once) and remove the file only if it is the same file, still naming the dead run.
                time.sleep(0.2)
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        again, now = _holder(fd), os.fstat(fd)
                    finally:
                        os.close(fd)
                    if again == holder and (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
                        lock.unlink()
                continue
            since = holder.get("since")
            started = (
                time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
                if isinstance(since, int | float)
                else ""
            )
            who = f"process {pid} on {host}{started}" if pid is not None else "another process"
            raise FolderInUseError(
                f"{what} {str(lock.parent)!r} is in use by another pejax run ({who}); two runs in one folder "
                "would overwrite each other's files. Wait for it to finish, or choose another folder."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The lock file may have been unlinked (by its releasing holder) between our open and flock: then we
        # locked an orphan inode. Only a lock on the file that is still at ``lock`` counts.
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (mine.st_dev, mine.st_ino) != (current.st_dev, current.st_ino):
            os.close(fd)
            continue
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(doc).encode(), 0)
        except BaseException as e:
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)
            if isinstance(e, OSError):
                raise OSError(
                    e.errno,
                    f"could not write the lock file {str(lock)!r} of the {what}: {e.strerror}",
                ) from e
            raise
        return fd
    raise FolderInUseError(
        f"could not lock {what} {str(lock.parent)!r}: its lock file {LOCK_NAME} keeps changing (another "
        "pejax run is starting or stopping there); try again."
    )


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike, *, what: str = "folder") -> Iterator[pathlib.Path]:
    """Holds an exclusive lock on a run folder for the duration of the ``with`` block.

    The lock is an ``flock`` on ``folder/.pejax.lock`` (which records the holder's PID, host and start time
    for the error message). The kernel drops the lock when its process dies, so the lock of a killed run
    (``kill -9``, power loss) is recovered automatically; a lock file still held by a process forked from a
    dead run is recognised by the recorded PID and taken over. Once locked, temporary files left in the folder
    by interrupted writers are deleted. On exit the lock file is removed, and so is ``folder`` if this call
    created it and it is still empty. POSIX only (``fcntl``).

    Args:
      folder: the folder to lock (created if missing).
      what: how messages name the folder (``"output folder"``, ``"checkpoint folder"``).

    Yields:
      the lock file's path.

    Raises:
      FolderInUseError: another live process holds the lock.
      OSError: the folder cannot be created or written (read-only, not a folder, ...).

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with lock_folder(d):
      ...     with lock_folder(d):
      ...         pass
      Traceback (most recent call last):
      ...
      pejax.errors.FolderInUseError: folder ... is in use by another pejax run ...
    """
    folder = pathlib.Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    try:
        fd = _acquire(lock, what)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        remove_stale_temporaries(folder)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it: a waiter that opened it sees the inode change and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def check_no_foreign_checkpoints(directory: str | os.PathLike, fingerprint: str) -> None:
    """Refuses to start a fresh run in ``directory`` when it holds checkpoints of another run.

    A fresh run (no resume) rewrites ``ckpt-000000.npz`` and then prunes old checkpoints, so it would silently
    replace another run's state. Checkpoints with the same ``fingerprint`` (same configuration, generator,
    embedding and key) are allowed: the run recomputes exactly the same state.

    Args:
      directory: the checkpoint folder.
      fingerprint: the ``"fingerprint"`` the new run writes into its checkpoints' metadata.

    Raises:
      ForeignCheckpointError: some checkpoint was written by another run (or cannot be read). The message names
        it and the fixes (resume that run, or use another folder).
    """
    for path in list_checkpoints(directory):
        try:
            _, meta = load_checkpoint(path)
            same = isinstance(meta, dict) and meta.get("fingerprint") == fingerprint
        except CorruptCheckpointError:
            same = False
        if not same:
            raise ForeignCheckpointError(
                f"checkpoint folder {str(pathlib.Path(directory))!r} already holds {path.name} of another run "
                "(another configuration, generator, embedding or key, or an unreadable file); a fresh run "
                "would replace it. Resume that run (resume=True, --resume), or use a new checkpoint folder; "
                "nothing was changed."
            )


def hold_checkpoint_lock(method: Callable) -> Callable:
    """Decorates a runner method so that it holds :func:`lock_folder` on ``self.checkpoint_dir`` while running.

    Nothing is locked when ``self.checkpoint_dir`` is ``None`` or when this process does not write checkpoints
    (every process but process 0 of a multi-host run).
    """
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        from pejax.sharding import is_checkpoint_writer

        folder = getattr(self, "checkpoint_dir", None)
        if folder is None or not is_checkpoint_writer():
            return method(self, *args, **kwargs)
        with lock_folder(folder, what="checkpoint folder"):
            return method(self, *args, **kwargs)

    return wrapper
