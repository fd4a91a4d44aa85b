"""safepoint: crash-safe, verified checkpoints for PyTorch training.

A checkpoint is either complete and verified or invisible; a restore is total or nothing, and loud; closing is
safe from any state. Start with :class:`CheckpointManager`, or :func:`save` / :func:`restore` for one directory.
"""

from __future__ import annotations

from .api import load, restore, save, verify
from .codec import Pickled
from .distributed import PerRank
from .errors import (
    AmbiguousCommitError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CoordinationError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidStateError,
    ManagerClosedError,
    RestoreError,
    SafepointError,
    StorageError,
    UnsafeCheckpointError,
)
from .gc import GcReport
from .manager import CheckpointInfo, CheckpointManager
from .manifest import FORMAT_VERSION
from .restore import RestoreReport, SkippedCheckpoint
from .rng import RNGState
from .verify import CheckpointStatus, VerifyReport

__all__ = [
    "FORMAT_VERSION",
    "AmbiguousCommitError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "ConfigError",
    "CoordinationError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "GcReport",
    "InvalidStateError",
    "ManagerClosedError",
    "PerRank",
    "Pickled",
    "RNGState",
    "RestoreError",
    "RestoreReport",
    "SafepointError",
    "SkippedCheckpoint",
    "StorageError",
    "UnsafeCheckpointError",
    "VerifyReport",
    "load",
    "restore",
    "save",
    "verify",
]
