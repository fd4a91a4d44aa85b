"""What is at a path: nothing, a file, one checkpoint, a manager directory, or a directory that is neither; and
which steps of a manager directory are committed.

Every entry point (the functions of :mod:`safepoint._api`, the manager, verify, gc, import/export and the CLI)
asks here, so they all agree on what a path is. The decision, from the strongest fact down:

- a published manifest at the root: one committed checkpoint (even if step directories lie beside it);
- canonical step directories (``step-000000000120``): a manager directory;
- attempt lock files at the root: one checkpoint whose save has not committed (or crashed);
- anything else: not ours (an empty directory included), and nothing here is taken for safepoint's data.

This module only looks: it never creates, removes or reads a manifest's contents. A committed checkpoint is one
whose manifest is published; whether its bytes verify is :mod:`safepoint._reader`'s question.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._layout import MANIFEST_NAME, join, parse_attempt, parse_step_dir
from ._storage import Storage

__all__ = ["Kind", "Location", "StepDir", "committed_steps", "is_committed", "resolve", "step_dirs"]


class Kind(enum.Enum):
    """What a path holds."""

    MISSING = "missing"  # nothing at all
    FILE = "file"  # something that is not a directory
    CHECKPOINT = "checkpoint"  # one checkpoint directory, committed or not (Location.committed)
    MANAGER = "manager"  # a directory of step directories (Location.steps)
    OTHER = "other"  # a directory that is neither: empty, or someone else's


@dataclass(frozen=True)
class StepDir:
    """A canonical step directory of a manager directory, committed or not."""

    step: int
    path: str  # relative to the storage root


@dataclass(frozen=True)
class Location:
    """The answer of :func:`resolve`."""

    kind: Kind
    #: CHECKPOINT only: whether its manifest is published.
    committed: bool = False
    #: MANAGER only: every step directory, committed or not, ascending by step.
    steps: tuple[StepDir, ...] = ()

    @property
    def is_ours(self) -> bool:
        """A checkpoint or a manager directory: somewhere safepoint may collect what its own saves left."""
        return self.kind in (Kind.CHECKPOINT, Kind.MANAGER)

    @property
    def is_committed_checkpoint(self) -> bool:
        """One checkpoint whose manifest is published: what restore, load and export read at the root."""
        return self.kind is Kind.CHECKPOINT and self.committed


def resolve(storage: Storage) -> Location:
    """What is at the root of ``storage``: one existence check, one manifest check and one listing."""
    if not storage.exists(""):
        return Location(Kind.MISSING)
    if not storage.is_dir(""):
        return Location(Kind.FILE)
    if storage.exists(MANIFEST_NAME):
        return Location(Kind.CHECKPOINT, committed=True)
    try:
        names = storage.listdir("")
    except FileNotFoundError:
        return Location(Kind.MISSING)  # removed since the check above
    steps = _steps(names, "")
    if steps:
        return Location(Kind.MANAGER, steps=tuple(steps))
    if any(attempt[1] for name in names if (attempt := parse_attempt(name)) is not None):
        return Location(Kind.CHECKPOINT, committed=False)
    return Location(Kind.OTHER)


def step_dirs(storage: Storage, base: str = "") -> list[StepDir]:
    """Every canonical step directory under ``base``, committed or not, ascending by step."""
    try:
        names = storage.listdir(base)
    except FileNotFoundError:
        return []
    return _steps(names, base)


def is_committed(storage: Storage, checkpoint: str) -> bool:
    """Whether the checkpoint directory's manifest (its commit record) is published."""
    return storage.exists(join(checkpoint, MANIFEST_NAME))


def committed_steps(storage: Storage, location: Location | None = None) -> list[int]:
    """The committed steps of a manager directory, ascending; empty for anything else. Pass the ``location``
    already resolved to spare a second listing."""
    steps = location.steps if location is not None else tuple(step_dirs(storage))
    return [found.step for found in steps if is_committed(storage, found.path)]


def _steps(names: list[str], base: str) -> list[StepDir]:
    found = [StepDir(step, join(base, name)) for name in names if (step := parse_step_dir(name)) is not None]
    return sorted(found, key=lambda found: found.step)
