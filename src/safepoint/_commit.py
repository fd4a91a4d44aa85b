"""The commit protocol: a pure plan of what to write, and the executor that writes it in a crash-safe order.

Order of a save (each step a named fault point, see :mod:`safepoint._faults`)::

    mkdir checkpoint dir (fsync parent)  ->  take the attempt lock  ->  mkdir <save_id>/ (fsync)
    for each payload file: write + hash in one pass, fsync
    fsync <save_id>/  ->  write <save_id>/manifest.json, fsync
    PUBLISH: link(<save_id>/manifest.json, manifest.json)   fails if the step is committed: CheckpointExistsError
    fsync checkpoint dir                                    an error here is an AmbiguousCommitError
    remove the staging name of the manifest and the lock

Before publication a failure removes the attempt's files and re-raises the original error (cleanup errors are
attached as notes, never raised instead). After it, the checkpoint is visible and complete; only its durability
can be in doubt, and a retry of the step finds and verifies it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from . import _faults as faults
from ._budget import ByteBudget
from ._codec import Encoded
from ._errors import (
    AmbiguousCommitError,
    CheckpointExistsError,
    ConfigError,
    SafepointError,
    StorageError,
    attach_note,
)
from ._layout import MANIFEST_NAME, join, lock_name, new_save_id
from ._manifest import EntryRecord, FileRecord, Manifest
from ._payload import PlannedFile, plan_file, write_file
from ._storage import AttemptLock, Storage
from ._validate import non_negative_int

__all__ = [
    "SHARD_BYTES",
    "SavePlan",
    "abort_attempt",
    "begin_attempt",
    "check_metrics",
    "finish_save",
    "plan_save",
    "write_files",
    "write_manifest",
    "writer_version",
]

logger = logging.getLogger("safepoint")

#: Payload files are cut at about this size, so large states are spread over files written in parallel.
SHARD_BYTES = 256 << 20
#: Files written at once. Two already overlap one file's fsync with the next file's writing.
WRITER_THREADS = max(2, min(4, os.cpu_count() or 1))
#: Tensors copied before writing (GPU, not dense) are held within this many bytes across the writer threads.
COPY_BUDGET_BYTES = 256 << 20
_SPLIT_BYTES = 64 << 20


@dataclass(frozen=True)
class SavePlan:
    checkpoint: str  # the checkpoint directory, relative to the storage root ("" when it is the root)
    step: int
    save_id: str
    files: tuple[PlannedFile, ...]  # paths relative to the checkpoint directory
    entries: tuple[EntryRecord, ...]
    tree: dict[str, object]
    metrics: dict[str, float]
    state_version: int

    @property
    def staging(self) -> str:
        return join(self.checkpoint, self.save_id)


def writer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"safepoint {version('safepoint')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "safepoint"


def plan_save(
    encoded: Encoded,
    *,
    checkpoint: str,
    step: int,
    metrics: Mapping[str, float] | None = None,
    state_version: int = 1,
    shard_bytes: int = SHARD_BYTES,
    save_id: str | None = None,
    file_prefix: str = "",
) -> SavePlan:
    """Decide names, files and offsets for a save. Touches no storage. ``file_prefix`` starts every payload file
    name (a distributed save names the writing rank there)."""
    non_negative_int("step", step)
    save_id = save_id or new_save_id()
    layout = _cached_layout(encoded, shard_bytes, file_prefix)
    files = tuple(PlannedFile(f"{save_id}/{planned.path}", planned.header, planned.tensors) for planned in layout[0])
    entries = layout[1]
    return SavePlan(
        checkpoint=checkpoint,
        step=step,
        save_id=save_id,
        files=files,
        entries=entries,
        tree=encoded.tree,
        metrics=check_metrics(metrics or {}),
        state_version=state_version,
    )


_Layout = tuple[tuple[PlannedFile, ...], tuple[EntryRecord, ...]]


def _cached_layout(encoded: Encoded, shard_bytes: int, file_prefix: str) -> _Layout:
    """The files (paths relative to the attempt directory) and entries of ``encoded``: computed once per
    structure and shard size when the encoding came from a :class:`~safepoint._structure.StructureCache` (the
    layout depends only on the leaves' keys, kinds, dtypes and shapes, which the structure fixes)."""
    plans = getattr(encoded.structure, "plans", None)
    if plans is None:
        return _layout(encoded, shard_bytes, file_prefix)
    key = (shard_bytes, file_prefix)
    layout: _Layout | None = plans.get(key)
    if layout is None:
        layout = plans[key] = _layout(encoded, shard_bytes, file_prefix)
    return layout


def _layout(encoded: Encoded, shard_bytes: int, file_prefix: str) -> _Layout:
    names = _unique_names([leaf.key for leaf in encoded.leaves])
    # A new file starts at a new top-level entry once the current file is sizeable, so that each file's read
    # buffer backs one object's tensors after a restore (an optimizer keeps views of its own file, not the
    # model's), and at shard_bytes within an entry.
    groups: list[list[int]] = [[]]
    filled, top = 0, None
    for index, leaf in enumerate(encoded.leaves):
        nbytes = leaf.tensor.numel() * leaf.tensor.element_size()
        entry = leaf.key.split("/", 1)[0]
        if groups[-1] and (filled + nbytes > shard_bytes or (entry != top and filled >= _SPLIT_BYTES)):
            groups.append([])
            filled = 0
        groups[-1].append(index)
        filled += nbytes
        top = entry
    files: list[PlannedFile] = []
    entries: list[EntryRecord | None] = [None] * len(encoded.leaves)
    for file_index, group in enumerate(g for g in groups if g):
        items = [(i, names[i], encoded.leaves[i].tensor) for i in group]
        planned = plan_file(f"{file_prefix}{file_index:05d}.safetensors", items)
        files.append(planned)
        for item in planned.tensors:
            leaf = encoded.leaves[item.leaf]
            entries[item.leaf] = EntryRecord(
                leaf.key, leaf.kind, item.dtype, item.shape, file_index, item.name, leaf.scalar
            )
    return tuple(files), tuple(e for e in entries if e is not None)


def _unique_names(keys: list[str]) -> list[str]:
    seen: set[str] = set()
    names = []
    for index, key in enumerate(keys):
        name = key if key not in seen and key != "__metadata__" else f"{key}#{index}"
        seen.add(name)
        names.append(name)
    return names


def check_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ConfigError(f"metric names must be strings, not {name!r}")
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(number, bool) or not isinstance(number, (int, float, np.number)):
            raise ConfigError(f"metric {name!r} must be a number, not {type(value).__name__}")
        checked[name] = int(number) if isinstance(number, (int, np.integer)) else float(number)
    return checked


def finish_save(storage: Storage, plan: SavePlan, lock: AttemptLock, write: Callable[[], Manifest]) -> Manifest:
    """Run ``write`` (the attempt's data and staged manifest), publish, make it durable and clean up. Before
    publication any failure removes the attempt's files (every rank's, in a distributed save) and re-raises."""
    committed = join(plan.checkpoint, MANIFEST_NAME)
    try:
        manifest = write()
        faults.point("commit.publish.before")
        try:
            storage.publish(join(plan.staging, MANIFEST_NAME), committed)
        except FileExistsError as err:
            # which step was committed is not known here (a single checkpoint directory may hold any): the
            # caller reads it from the committed manifest, and tells a lost race by this FileExistsError cause
            raise CheckpointExistsError(
                f"another writer committed a checkpoint at {storage.describe(plan.checkpoint)} while this save "
                f"was writing (of step {plan.step}); the committed checkpoint is untouched",
                path=storage.describe(plan.checkpoint),
            ) from err
    except BaseException as err:
        abort_attempt(storage, plan, lock, err)
        raise
    # Published: from here on the attempt's files are the committed checkpoint's data, and an error must never
    # remove them (the abort path above would leave a visible manifest naming deleted files).
    try:
        faults.point("commit.publish.after")
        storage.sync_dir(plan.checkpoint)
        faults.point("commit.dirsync.after")
    except (OSError, SafepointError) as err:
        lock.release(remove=False)  # leave it to the collector: the attempt dir may be the committed data
        raise AmbiguousCommitError(
            f"step {plan.step} was published at {storage.describe(plan.checkpoint)} but could not be made durable "
            f"({err}); it may or may not survive a crash. Saving step {plan.step} again is safe: it verifies "
            "the committed checkpoint and reports it",
            errno=getattr(err, "errno", None),
            path=storage.describe(plan.checkpoint),
        ) from err
    _finish_attempt(storage, plan, lock)
    return manifest


def begin_attempt(storage: Storage, plan: SavePlan) -> AttemptLock:
    """Make the checkpoint directory and take this attempt's lock; CheckpointExistsError if a checkpoint is
    committed there (its ``step`` is left None: the directory of a single checkpoint may hold any step)."""
    committed = join(plan.checkpoint, MANIFEST_NAME)
    for _ in range(10):
        storage.ensure_dir(plan.checkpoint)
        if storage.exists(committed):
            raise CheckpointExistsError(
                f"a checkpoint is already committed at {storage.describe(plan.checkpoint)}; this save of step "
                f"{plan.step} wrote nothing",
                path=storage.describe(plan.checkpoint),
            )
        try:
            return storage.lock_attempt(join(plan.checkpoint, lock_name(plan.save_id)))
        except FileNotFoundError:
            continue  # a collector removed the empty checkpoint dir between mkdir and lock: make it again
    raise StorageError(f"cannot start a save in {storage.describe(plan.checkpoint)}: it keeps disappearing")


def write_manifest(storage: Storage, plan: SavePlan, manifest: Manifest) -> None:
    """Write the attempt's manifest under its staging name, durably; publication is finish_save's. The save
    attempt that drives these steps, in this order, is :class:`safepoint._pipeline.SaveAttempt`."""
    faults.point("manifest.write.before")
    sink = storage.create(join(plan.staging, MANIFEST_NAME))
    try:
        sink.write(memoryview(manifest.to_json()))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    faults.point("manifest.fsync.after")


def write_files(
    storage: Storage,
    plan: SavePlan,
    leaves: Sequence[torch.Tensor],
    written: Callable[[int], None] | None = None,
    *,
    chunk_sums: dict[int, str] | None = None,
) -> list[FileRecord]:
    """Write every payload file, several at once: while one thread waits in write() or fsync(), which release the
    interpreter, another hashes and copies, and the disk flushes one file while the next is being written.
    ``chunk_sums``: see :func:`~safepoint._payload.write_file`."""
    workers = min(len(plan.files), WRITER_THREADS)
    budget = ByteBudget(COPY_BUDGET_BYTES)

    def write_one(planned: PlannedFile) -> FileRecord:
        # sized to what this file coalesces: a file of large tensors needs only its header buffered
        buffer = bytearray(planned.buffer_bytes)
        return _write_one(
            storage, plan, planned, leaves=leaves, buffer=buffer, budget=budget, written=written, sums=chunk_sums
        )

    if workers <= 1:
        return [write_one(planned) for planned in plan.files]
    with ThreadPoolExecutor(workers, thread_name_prefix="safepoint-write") as pool:
        futures = [pool.submit(write_one, planned) for planned in plan.files]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()  # files not started yet: the save has failed
    # leaving the pool waited for the files in flight, so nothing writes into the attempt during its cleanup
    for future in futures:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            raise error
    return [future.result() for future in futures]


def _write_one(
    storage: Storage,
    plan: SavePlan,
    planned: PlannedFile,
    *,
    leaves: Sequence[torch.Tensor],
    buffer: bytearray,
    budget: ByteBudget,
    written: Callable[[int], None] | None,
    sums: dict[int, str] | None = None,
) -> FileRecord:
    faults.point("data.write.before")
    sink = storage.create(join(plan.checkpoint, planned.path))
    try:
        checksum = write_file(sink, planned, leaves, buffer, budget, written=written, chunk_sums=sums)
        faults.point("data.write.after")
        faults.point("data.fsync.before")
        sink.finish()
        faults.point("data.fsync.after")
    except BaseException:
        sink.abort()
        raise
    return FileRecord(planned.path, planned.size, checksum)


def abort_attempt(storage: Storage, plan: SavePlan, lock: AttemptLock, error: BaseException) -> None:
    """Remove what this attempt wrote. Never raises: a cleanup failure is attached to ``error`` as a note."""
    try:
        storage.remove_tree(plan.staging)
        lock.release(remove=True)
        if plan.checkpoint:  # a step directory; never the root the caller named
            storage.remove_empty_dir(plan.checkpoint)
    except BaseException as cleanup:
        lock.release(remove=False)
        note = f"safepoint: cleaning up the failed save of step {plan.step} also failed: {cleanup!r}"
        attach_note(error, note)


def _finish_attempt(storage: Storage, plan: SavePlan, lock: AttemptLock) -> None:
    """Drop the staging name of the manifest and the lock. The save is already durable: failures only log."""
    try:
        storage.remove_file(join(plan.staging, MANIFEST_NAME))
        lock.release(remove=True)
        faults.point("commit.cleanup.after")
    except (OSError, SafepointError) as err:
        lock.release(remove=False)
        logger.warning("step %s is committed, but removing its staging leftovers failed: %s", plan.step, err)
