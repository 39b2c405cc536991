"""pejax: Private Evolution on a JAX core.

Differentially private synthetic data through a generator's inference API only (Lin et al., ICLR 2024).
The public surface is the names in ``__all__``; modules whose names start with an underscore are internal.
"""

from pejax import accounting
from pejax import engine
from pejax import errors
from pejax.accounting import PrivacyLedger
from pejax.accounting import Release
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig
from pejax.engine import PEState
from pejax.errors import APIRequestRejectedError
from pejax.errors import APIUnavailableError
from pejax.errors import BudgetExceededError
from pejax.errors import CheckpointMismatchError
from pejax.errors import CompletionError
from pejax.errors import CorruptCheckpointError
from pejax.errors import CorruptCheckpointWarning
from pejax.errors import FolderInUseError
from pejax.errors import ForeignCheckpointError
from pejax.errors import GeneratorError
from pejax.errors import GeneratorRetryWarning
from pejax.errors import ModelCheckpointError
from pejax.errors import OutputFolderError
from pejax.errors import PejaxWarning
from pejax.errors import WeakDeltaWarning
from pejax.mechanism import AllZeroHistogramWarning
from pejax.mechanism import Selection
from pejax.mechanism import add_discrete_gaussian_noise
from pejax.mechanism import add_gaussian_noise
from pejax.mechanism import release_lattice_votes
from pejax.mechanism import select
from pejax.mechanism import select_parents
from pejax.mechanism import threshold
from pejax.neighbors import Neighbors
from pejax.neighbors import nearest_neighbors
from pejax.runner import IterationInfo
from pejax.runner import PrivateEvolution
from pejax.runner import RunResult
from pejax.secure_noise import NoiseKey
from pejax.votes import HISTOGRAM_SENSITIVITY
from pejax.votes import LatticeVotes
from pejax.votes import histogram_sensitivity
from pejax.votes import lattice_vote_histogram
from pejax.votes import vote_histogram

__version__ = "0.1.0"

__all__ = [
    "HISTOGRAM_SENSITIVITY",
    "APIRequestRejectedError",
    "APIUnavailableError",
    "AllZeroHistogramWarning",
    "BudgetExceededError",
    "CheckpointMismatchError",
    "CompletionError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "FolderInUseError",
    "ForeignCheckpointError",
    "GeneratorError",
    "GeneratorRetryWarning",
    "IterationInfo",
    "LatticeVotes",
    "ModelCheckpointError",
    "Neighbors",
    "NoiseKey",
    "OutputFolderError",
    "PEConfig",
    "PEState",
    "PejaxWarning",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivateEvolution",
    "Release",
    "RunResult",
    "Selection",
    "SpeedConfig",
    "WeakDeltaWarning",
    "accounting",
    "add_discrete_gaussian_noise",
    "add_gaussian_noise",
    "engine",
    "errors",
    "histogram_sensitivity",
    "lattice_vote_histogram",
    "nearest_neighbors",
    "release_lattice_votes",
    "select",
    "select_parents",
    "threshold",
    "vote_histogram",
]
