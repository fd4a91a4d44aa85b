"""The one-checkpoint functions: save, restore, load and verify a single checkpoint directory.

They share the format, the commit protocol and the verification of :class:`~safepoint.CheckpointManager`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from ._backup import TensorBackups
from ._errors import CheckpointNotFoundError, ConfigError, StorageError
from ._manager import CheckpointInfo
from ._migrations import Migrations, check_migrations
from ._pipeline import gc_paused, save_to
from ._reader import read_checkpoint
from ._resolve import Kind, Location, resolve
from ._restore import RestoreReport, copied_into, plain_values, prepare_checkpoint
from ._storage import Storage, open_storage
from ._validate import non_negative_int
from ._verify import VerifyReport, verify_storage

__all__ = ["load", "restore", "save", "verify"]

PathLike = str | os.PathLike[str]


def save(
    path: PathLike,
    state: Mapping[str, Any],
    *,
    step: int = 0,
    metrics: Mapping[str, float] | None = None,
    state_version: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Write ``state`` as one checkpoint directory at ``path`` (a local path or a URL such as ``s3://b/ckpt``,
    opened with ``storage_options``), durably and atomically.

    Raises CheckpointExistsError if ``path`` already holds a committed checkpoint (it is left untouched).
    """
    storage = open_storage(path, storage_options)
    if _refuse_file(storage, resolve(storage)).kind is Kind.MANAGER:
        raise ConfigError(f"{storage.describe('')} is a CheckpointManager directory; save there with the manager")
    return save_to(
        storage, "", step, state, metrics=metrics, state_version=non_negative_int("state_version", state_version)
    )


def restore(
    path: PathLike,
    state: MutableMapping[str, Any],
    *,
    strict: bool = True,
    state_version: int | None = None,
    migrations: Migrations | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cast_dtypes: bool = False,
) -> RestoreReport:
    """Apply the checkpoint at ``path`` to ``state`` in place: verified, totally or not at all.

    Given the code's ``state_version``, a checkpoint of an older one is upgraded by ``migrations`` first and a
    newer one is refused (StateVersionError); without it, the saved version is not checked.
    ``cast_dtypes=True`` casts floating-point tensors saved in another floating-point dtype to the live one,
    listing each in ``report.cast``; without it such a tensor is a mismatch (RestoreError).
    """
    if migrations is not None and state_version is None:
        raise ConfigError("migrations need the code's state_version to know where the chain ends")
    version = non_negative_int("state_version", state_version, allow_none=True)
    chain = check_migrations(migrations, version) if version is not None else None
    storage = _committed(path, storage_options)
    # a restore allocates a few objects per entry (see gc_paused); the backups of tensors read in place are put
    # back if anything fails before the restore is complete
    with gc_paused(), TensorBackups().until_complete() as backups:
        loaded = read_checkpoint(storage, "", copied=copied_into(state, version), backups=backups)
        prepared = prepare_checkpoint(
            loaded, state, strict=strict, path=storage.describe(""), state_version=version, migrations=chain,
            cast_dtypes=cast_dtypes,
        )  # fmt: skip
        return prepared.apply()


def load(
    path: PathLike,
    *,
    allow_pickle: Iterable[str] | bool = False,
    storage_options: Mapping[str, Any] | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """The checkpoint at ``path`` as nested plain values (objects' state_dicts as dicts), every byte verified.

    Entries saved with :class:`safepoint.Pickled` are unpickled only if ``allow_pickle`` is True or names their
    key path; otherwise UnsafeCheckpointError names them.

    Every tensor (and ndarray) returned owns a fresh allocation of its own size, aligned as ``torch.empty``
    aligns, so it is safe to hand to any torch API and keeps nothing else alive.

    ``mmap=True`` maps the payload files instead of reading them into the process's memory: tensors are views of
    the mapping (they share it, and keep it alive), backed by the page cache (shared, reclaimable) and
    copy-on-write (changing them never changes the file). Every byte is still verified against its checksum
    before this returns, so the files are read once; what is lazy is the memory, not the check. A file changed on
    disk after that is not detected, and truncating it while mapped makes the process crash on access (SIGBUS):
    committed checkpoints are never rewritten in place by safepoint.
    """
    storage = _committed(path, storage_options)
    with gc_paused():
        return plain_values(read_checkpoint(storage, "", mmap=mmap), allow_pickle)


def verify(path: PathLike, *, storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check every byte of the checkpoint at ``path``, or of every checkpoint in the manager directory."""
    storage = open_storage(path, storage_options)
    location = resolve(storage)
    if location.kind is Kind.MISSING:
        raise CheckpointNotFoundError(f"{storage.describe('')} does not exist")
    return verify_storage(storage, location=_refuse_file(storage, location))


def _refuse_file(storage: Storage, location: Location) -> Location:
    if location.kind is Kind.FILE:
        raise StorageError(f"{storage.describe('')} is a file, not a checkpoint directory", path=storage.describe(""))
    return location


def _committed(path: PathLike, storage_options: Mapping[str, Any] | None) -> Storage:
    storage = open_storage(path, storage_options)
    location = _refuse_file(storage, resolve(storage))
    if not location.is_committed_checkpoint:
        hint = (
            f"; it is a manager directory with steps {[found.step for found in location.steps][-5:]}: use "
            "CheckpointManager(path).restore(state), or pass one step directory"
            if location.kind is Kind.MANAGER
            else ""
        )
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.describe('')}{hint}")
    return storage
