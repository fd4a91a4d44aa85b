"""Collecting what crashed or failed saves left behind, and only what is certainly dead.

An attempt (a ``<save_id>/`` directory and its ``<save_id>.lock``) is dead when nobody holds its lock (the kernel
drops the lock of a killed writer) and the checkpoint's manifest does not name it. The manifest is read *after*
the lock is taken, so a writer that publishes and then releases is never mistaken for a dead one. Attempts of a
checkpoint whose manifest cannot be read are left alone: that data may be all there is of the step.

:func:`remove_checkpoint` removes a committed checkpoint, for retention and ``safepoint rm``: unpublish first,
then collect.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import Literal

from . import _faults as faults
from ._errors import CorruptCheckpointError, SafepointError, StorageError
from ._layout import MANIFEST_NAME, join, lock_name, parse_attempt
from ._manifest import MAX_MANIFEST_BYTES, save_id_of
from ._resolve import Kind, is_committed, resolve
from ._storage import AttemptLock, Storage

__all__ = ["GcReport", "attempt_ids", "collect", "collect_checkpoint", "remove_checkpoint"]

logger = logging.getLogger("safepoint")


@dataclass(frozen=True)
class GcReport:
    """What a collection removed, and the attempts it left because their writer is alive. True if it removed
    anything."""

    removed: tuple[str, ...]  # attempts and empty checkpoint directories removed
    in_progress: tuple[str, ...]  # attempts whose writer is alive: left alone

    def __bool__(self) -> bool:
        return bool(self.removed)


def collect(storage: Storage, *, settled_pass: bool = False) -> GcReport:
    """Collect dead attempts in the step directories of a manager directory, or, when the root is a single
    checkpoint (it holds a manifest or attempt lock files), in the root. A directory that is neither is left
    alone: a name that merely looks like a save id proves nothing.

    With ``settled_pass`` (a manager opening), a committed step directory holding one attempt and no lock file,
    as every finished save leaves it, is passed over without reading its manifest: the open of a manager that
    retains many checkpoints must not parse each of their manifests (~1 ms per 200 KB; a large sharded
    checkpoint's manifest is many MB). That lone attempt is its committed data, or, if the step's own data is
    gone, whatever is left of the step; ``safepoint gc`` and ``manager.gc()`` look at every directory."""
    location = resolve(storage)
    if location.kind is not Kind.MANAGER:
        return collect_checkpoint(storage, "", owned=location.committed)
    removed: list[str] = []
    live: list[str] = []
    for found in location.steps:
        if settled_pass and _settled(storage, found.path):
            continue
        report = collect_checkpoint(storage, found.path)
        removed += report.removed
        live += report.in_progress
    return GcReport(tuple(removed), tuple(live))


def _committed_save_id(storage: Storage, checkpoint: str) -> str | None:
    """The save id the manifest names; None if not committed. Raises if the manifest is unreadable. Only the save
    id of a manifest whose checksum matches its text is read (see :func:`save_id_of`): a manager opening collects
    every checkpoint, and parsing each manifest in full cost as much as the restore's own parse of one."""
    path = join(checkpoint, MANIFEST_NAME)
    try:
        data = storage.read_bytes(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    return save_id_of(data, storage.describe(path))


def _settled(storage: Storage, checkpoint: str) -> bool:
    """Whether a step directory is as a finished save leaves it: committed, one attempt, no lock file."""
    try:
        names = storage.listdir(checkpoint)
    except FileNotFoundError:
        return False
    attempts = [parsed for name in names if (parsed := parse_attempt(name)) is not None]
    return len(attempts) == 1 and not attempts[0][1] and is_committed(storage, checkpoint)


def attempt_ids(storage: Storage, checkpoint: str, *, locked_only: bool = False) -> set[str]:
    """Save ids of the attempts (data directories or lock files) in a checkpoint directory; empty if it is gone.
    With ``locked_only``, only attempts that have a lock file."""
    try:
        names = storage.listdir(checkpoint)
    except FileNotFoundError:
        return set()
    parsed = [p for name in names if (p := parse_attempt(name)) is not None]
    return {save_id for save_id, is_lock in parsed if is_lock or not locked_only}


def collect_checkpoint(storage: Storage, checkpoint: str, *, owned: bool = True) -> GcReport:
    """Collect dead attempts in one checkpoint directory. Unless the directory is ``owned`` (a step directory, or
    one holding a manifest), only attempts that have a lock file are considered ours."""
    attempts = sorted(attempt_ids(storage, checkpoint, locked_only=not owned))
    removed: list[str] = []
    live: list[str] = []
    for save_id in attempts:
        outcome = _collect_attempt(storage, checkpoint, save_id)
        (removed if outcome == "removed" else live if outcome == "live" else []).append(join(checkpoint, save_id))
    uncommitted = checkpoint and not is_committed(storage, checkpoint)
    if uncommitted and _abandoned(storage, checkpoint, removed) and storage.remove_empty_dir(checkpoint):
        removed.append(checkpoint)
    return GcReport(tuple(removed), tuple(live))


def remove_checkpoint(
    storage: Storage, checkpoint: str, *, fault_prefix: Literal["retention"] | None = None
) -> GcReport:
    """Unpublish a committed checkpoint, whether its manifest reads or not, then collect its data and remove its
    emptied directory. Retention and ``safepoint rm`` both remove checkpoints through here.

    The manifest goes first, durably: from then on no reader lists or restores the checkpoint, and a crash before
    the data is gone leaves only an uncommitted attempt that :func:`collect` removes. An attempt whose writer is
    alive (a save of the same step in progress) is left, in ``in_progress``. Deciding *whether* a checkpoint may
    go (never the newest valid one) is the caller's: this removes what it is asked to.

    With ``fault_prefix``, the fault points ``<prefix>.unpublish.after`` (the manifest durably gone, the data
    still there) and ``<prefix>.delete.after`` (all of it gone) are reached."""
    storage.remove_file(join(checkpoint, MANIFEST_NAME))
    try:
        storage.sync_dir(checkpoint)
    except StorageError as err:
        if err.errno != errno.ENOENT:
            raise
        return GcReport((), ())  # someone else removed the whole checkpoint first, durably unpublishing it
    if fault_prefix:
        faults.point(f"{fault_prefix}.unpublish.after")
    report = collect_checkpoint(storage, checkpoint)
    if checkpoint and checkpoint not in report.removed and storage.remove_empty_dir(checkpoint):
        # collect_checkpoint removes an emptied directory only when it emptied it; here the caller asked for it
        report = GcReport((*report.removed, checkpoint), report.in_progress)
    if fault_prefix:
        faults.point(f"{fault_prefix}.delete.after")
    return report


#: An empty step directory younger than this may be a save that is just starting (it makes the directory, then
#: its lock file in it); removing it then would make that save start over, and a collector running in a loop
#: could starve it. Found by the reliability suite (two managers on one directory).
EMPTY_DIR_GRACE_S = 600.0


def _abandoned(storage: Storage, checkpoint: str, removed: list[str]) -> bool:
    """Whether an (empty) uncommitted step directory is ours to remove: this pass emptied it, or it is old."""
    if removed:
        return True
    try:
        return time.time() - storage.mtime(checkpoint) > EMPTY_DIR_GRACE_S
    except FileNotFoundError:
        return False
    except StorageError:
        return True  # no directory times (an object store's prefixes): nothing there for a starting save to lose


def _collect_attempt(storage: Storage, checkpoint: str, save_id: str) -> str:
    lock_path = join(checkpoint, lock_name(save_id))
    lock: AttemptLock | None = None
    # asked even when the listing showed no lock file: a listing taken during a writer's start may miss it
    try:
        lock = storage.try_lock_attempt(lock_path)
    except FileNotFoundError:
        lock = None  # no lock file: the writer finished, or never got past creating it
    else:
        if lock is None:
            return "live"
    try:
        try:
            committed = _committed_save_id(storage, checkpoint)
        except (CorruptCheckpointError, SafepointError) as err:
            logger.warning("leaving %s alone: its manifest cannot be read (%s)", storage.describe(checkpoint), err)
            return "kept"
        if committed == save_id:
            return "committed"  # the lock file alone is a leftover: released with remove=True below
        faults.point("gc.delete.before")
        storage.remove_tree(join(checkpoint, save_id))
        faults.point("gc.delete.after")
        return "removed"
    finally:
        if lock is not None:
            lock.release(remove=True)
