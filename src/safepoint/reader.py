"""Reading committed checkpoints: the manifest first, then every payload file verified against it.

Nothing read here reaches a live object: callers get verified plain values and decide what to apply.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .layout import MANIFEST_NAME, join
from .manifest import MAX_MANIFEST_BYTES, EntryRecord, Manifest
from .payload import read_file
from .storage import Storage

__all__ = ["LoadedCheckpoint", "read_checkpoint", "read_leaves", "read_manifest", "verify_checkpoint"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    checkpoint: str  # relative to the storage root
    manifest: Manifest
    leaves: list[Any]  # entry index -> verified value (tensor, ndarray, PickledPayload)


def read_manifest(storage: Storage, checkpoint: str, *, step: int | None = None) -> Manifest:
    """The parsed manifest of a committed checkpoint; CheckpointNotFoundError if it is not committed.

    With ``step``, a manifest for another step (moved or copied from another checkpoint) is corrupt, and is
    reported as the bad file before any payload is read."""
    path = join(checkpoint, MANIFEST_NAME)
    where = storage.describe(path)
    try:
        data = storage.read_bytes(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.describe(checkpoint)}") from err
    manifest = Manifest.from_json(data, where)
    if step is not None and manifest.step != step:
        raise CorruptCheckpointError(
            f"{where} is the manifest of step {manifest.step}, not of step {step} (a file was moved or copied)",
            path=where,
        )
    return manifest


def _by_file(manifest: Manifest) -> dict[int, list[tuple[int, EntryRecord]]]:
    grouped: dict[int, list[tuple[int, EntryRecord]]] = defaultdict(list)
    for index, entry in enumerate(manifest.entries):
        grouped[entry.file].append((index, entry))
    return grouped


def read_checkpoint(storage: Storage, checkpoint: str, *, step: int | None = None) -> LoadedCheckpoint:
    """Read and verify every byte of a checkpoint; raise CorruptCheckpointError naming the first bad file."""
    manifest = read_manifest(storage, checkpoint, step=step)
    return LoadedCheckpoint(checkpoint, manifest, read_leaves(storage, checkpoint, manifest))


def read_leaves(
    storage: Storage, checkpoint: str, manifest: Manifest, only: Collection[int] | None = None
) -> list[Any]:
    """The verified value of every entry (of the entries in ``only``; the others stay None). A file holding none
    of the wanted entries is not read at all."""
    leaves: list[Any] = [None] * len(manifest.entries)
    grouped = _by_file(manifest)
    for file_index, record in enumerate(manifest.files):
        entries = grouped.get(file_index, [])
        if only is not None and not any(index in only for index, _ in entries):
            continue
        for index, value in read_file(storage, checkpoint, record, entries).items():
            leaves[index] = value
    wanted = range(len(leaves)) if only is None else only
    # the parser guarantees every entry has a file
    if any(leaves[index] is None for index in wanted):  # pragma: no cover
        raise CorruptCheckpointError(f"{storage.describe(checkpoint)}: an entry has no data")
    return leaves


def verify_checkpoint(storage: Storage, checkpoint: str, *, step: int | None = None) -> Manifest:
    """Check every byte of a checkpoint, one file at a time (memory bounded by the largest file)."""
    manifest = read_manifest(storage, checkpoint, step=step)
    grouped = _by_file(manifest)
    for file_index, record in enumerate(manifest.files):
        read_file(storage, checkpoint, record, grouped.get(file_index, []))
    return manifest
