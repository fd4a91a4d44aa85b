"""safepoint: crash-safe, verified checkpoints for PyTorch training.

A checkpoint is either complete and verified or invisible; a restore is total or nothing, and loud; closing is
safe from any state. Start with :class:`CheckpointManager`, or :func:`save` / :func:`restore` for one directory.
"""

from __future__ import annotations

from ._api import load, restore, save, verify
from ._codec import Pickled
from ._distributed import PerRank
from ._errors import (
    AmbiguousCommitError,
    BackgroundSaveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    ConversionError,
    CoordinationError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidStateError,
    KeyPathError,
    ManagerClosedError,
    MigrationError,
    RestoreError,
    SafepointError,
    StateVersionError,
    StorageError,
    UnsafeCheckpointError,
)
from ._gc import GcReport
from ._interop import ImportReport, export_checkpoint, import_checkpoint
from ._manager import CheckpointInfo, CheckpointManager
from ._manifest import FORMAT_VERSION
from ._migrations import Migrations, move_key, remove_key, rename_key, set_default
from ._restore import Replace, RestoreReport, SkippedCheckpoint
from ._rng import RNGState
from ._verify import CheckpointStatus, VerifyReport
from ._writer import SaveHandle

__all__ = [
    "FORMAT_VERSION",
    "AmbiguousCommitError",
    "BackgroundSaveError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "ConfigError",
    "ConversionError",
    "CoordinationError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "GcReport",
    "ImportReport",
    "InvalidStateError",
    "KeyPathError",
    "ManagerClosedError",
    "MigrationError",
    "Migrations",
    "PerRank",
    "Pickled",
    "RNGState",
    "Replace",
    "RestoreError",
    "RestoreReport",
    "SafepointError",
    "SaveHandle",
    "SkippedCheckpoint",
    "StateVersionError",
    "StorageError",
    "UnsafeCheckpointError",
    "VerifyReport",
    "export_checkpoint",
    "import_checkpoint",
    "load",
    "move_key",
    "remove_key",
    "rename_key",
    "restore",
    "save",
    "set_default",
    "verify",
]
