"""The exceptions and warnings pejax raises, defined in one place.

Every module that raises one of these imports it from here; the modules where they used to live re-export them,
so ``from pejax.runner import CheckpointMismatchError`` and the like keep working. This module imports nothing
from pejax, so any layer can use it.

Errors subclass the built-in exception a caller would naturally catch (``ValueError`` for bad input or a
mismatched file, ``RuntimeError`` for a failure outside the caller's control); warnings subclass
:class:`PejaxWarning`, so ``warnings.simplefilter("error", pejax.PejaxWarning)`` turns all of them into errors.

Two warnings still live in the module that emits them and subclass :class:`PejaxWarning` from here:
``pejax.mechanism.AllZeroHistogramWarning`` and ``pejax.streaming.PrivateDataOnDiskWarning``.
"""

from __future__ import annotations

__all__ = [
    "APIRequestRejectedError",
    "APIUnavailableError",
    "BudgetExceededError",
    "CheckpointMismatchError",
    "CompletionError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "FolderInUseError",
    "ForeignCheckpointError",
    "GeneratorError",
    "GeneratorRetryWarning",
    "ModelCheckpointError",
    "OutputFolderError",
    "PejaxWarning",
    "WeakDeltaWarning",
]


# ----------------------------------------------------------------------------------------------- warnings


class PejaxWarning(UserWarning):
    """Base class of the warnings pejax emits."""


class WeakDeltaWarning(PejaxWarning):
    """delta >= 1/n: a mechanism could then publish a private sample outright and still meet (epsilon, delta)."""


class CorruptCheckpointWarning(PejaxWarning):
    """A corrupt checkpoint was skipped in favour of an older valid one."""


class GeneratorRetryWarning(PejaxWarning):
    """A generator call failed and is being retried."""


# ---------------------------------------------------------------------------------------- privacy budget


class BudgetExceededError(ValueError):
    """A release (or a planned schedule) would spend more privacy than the target allows."""


# -------------------------------------------------------------------------------- checkpoints and folders


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another configuration, generator, key or private data."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or fails its checksum."""


class ModelCheckpointError(CorruptCheckpointError):
    """A model checkpoint is unreadable, incomplete, or does not fit the model's architecture."""


class FolderInUseError(RuntimeError):
    """Another live process holds the lock of a run folder (output folder or checkpoint folder)."""


class ForeignCheckpointError(ValueError):
    """A fresh run was asked to write into a checkpoint folder that holds another run's checkpoints."""


class OutputFolderError(ValueError):
    """The output folder holds files of another run."""


# ------------------------------------------------------------------------------------------- generators


class GeneratorError(RuntimeError):
    """A generator call failed permanently or returned something malformed."""


class APIRequestRejectedError(GeneratorError, ValueError):
    """The endpoint refused a request with a client error (400, 401, 403, 404, ...): not retried."""


class APIUnavailableError(GeneratorError):
    """A request still failed (429, 5xx, timeout, dropped connection) after every retry."""


class CompletionError(GeneratorError, ValueError):
    """Every answer to a request (and its repairs) was empty, refused, non-text or truncated."""
