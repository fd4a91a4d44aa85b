"""Checking every byte of one checkpoint or of every checkpoint in a manager directory: the VerifyReport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._errors import SafepointError
from ._gc import attempt_ids
from ._manifest import Manifest
from ._reader import read_manifest, verify_checkpoint
from ._resolve import Location, is_committed, resolve
from ._storage import Storage

__all__ = ["CheckpointStatus", "VerifyReport", "verify_storage"]


@dataclass(frozen=True)
class CheckpointStatus:
    """One committed checkpoint as verification found it: ``ok``, or the ``error`` and the ``bad_file`` to blame."""

    step: int  # -1 only for a single checkpoint whose manifest cannot be read
    path: str
    ok: bool
    error: str | None = None
    bad_file: str | None = None  # the file found to be bad, when one is to blame
    nbytes: int = 0
    created: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    save_id: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`safepoint.verify` and ``CheckpointManager.verify()`` found: one status per committed
    checkpoint (``ok`` when all verified, ``bad`` for the others), and notes that are not failures."""

    path: str
    checkpoints: tuple[CheckpointStatus, ...]
    notes: tuple[str, ...] = ()  # not failures: e.g. leftovers of uncommitted saves

    @property
    def ok(self) -> bool:
        """True when every committed checkpoint verified."""
        return all(c.ok for c in self.checkpoints)

    @property
    def bad(self) -> tuple[CheckpointStatus, ...]:
        return tuple(c for c in self.checkpoints if not c.ok)


def verify_storage(
    storage: Storage,
    on_checkpoint: Callable[[CheckpointStatus], None] | None = None,
    *,
    location: Location | None = None,
) -> VerifyReport:
    """Verify a single committed checkpoint or every committed step of a manager directory (``location``: the
    root as :func:`~safepoint._resolve.resolve` found it, to spare looking again)."""
    found = location if location is not None else resolve(storage)
    targets = [(None, "")] if found.is_committed_checkpoint else [(s.step, s.path) for s in found.steps]
    statuses: list[CheckpointStatus] = []
    notes: list[str] = []
    for step, path in targets:
        attempts = attempt_ids(storage, path)
        if not is_committed(storage, path):
            if attempts:
                notes.append(f"{storage.describe(path)}: an uncommitted save left {len(attempts)} attempt(s); "
                             "`safepoint gc` removes them once their writer is gone")  # fmt: skip
            continue
        status = _verify_one(storage, path, step)
        if status is None:
            continue  # deleted (by retention elsewhere) while it was being verified: not a bad checkpoint
        # a checkpoint whose manifest cannot be read is reported as invalid; its data is not a "leftover"
        if status.save_id is not None and attempts - {status.save_id}:
            notes.append(f"{storage.describe(path)}: leftovers of another save attempt; `safepoint gc` removes them")
        statuses.append(status)
        if on_checkpoint is not None:
            on_checkpoint(status)
    return VerifyReport(storage.describe(""), tuple(statuses), tuple(notes))


def _verify_one(storage: Storage, path: str, step: int | None) -> CheckpointStatus | None:
    where = storage.describe(path)
    try:
        manifest = verify_checkpoint(storage, path, step=step)
    except SafepointError as err:
        if step is not None and not is_committed(storage, path):
            return None  # unpublished since the listing: retention in another process deleted it
        bad_file = getattr(err, "path", "") or None
        try:  # the manifest may be fine and a payload bad: then it still names the step and the save
            readable: Manifest | None = read_manifest(storage, path)
        except SafepointError:
            readable = None
        number = step if step is not None else readable.step if readable else -1
        save_id = readable.save_id if readable else None
        return CheckpointStatus(number, where, False, str(err), bad_file, save_id=save_id)
    return CheckpointStatus(
        manifest.step,
        where,
        True,
        nbytes=manifest.nbytes,
        created=manifest.created,
        metrics=dict(manifest.metrics),
        save_id=manifest.save_id,
    )
