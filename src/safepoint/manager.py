"""CheckpointManager: numbered checkpoints in one directory, verified resume, retention, and a safe lifecycle.

Lifecycle: the manager is a context manager. ``close()`` is idempotent and safe from any state, including a
constructor that failed half-way; ``__exit__`` never replaces the exception of the ``with`` body (a cleanup error
is attached to it as a note). There is no ``__del__``: nothing can raise at garbage collection.

Resume: ``restore(state)`` walks from the newest committed step down to the first one that verifies and fits,
and reports every step it passed over with the reason. Nothing to restore returns ``None``. Committed
checkpoints that all fail verification raise: starting from scratch over them would be the silent failure this
library exists to prevent. ``load()`` finds its checkpoint the same way and returns the values as plain data.

Retention runs only after a save is durable, works from what is on disk (so it survives restarts), never
removes the newest committed step or the one just saved, and never touches names it does not own.

Many processes: with a torch.distributed default process group, every rank constructs the manager and makes the
same calls; :mod:`safepoint.collective` runs them as one save or restore across the ranks. Retention and garbage
collection run on rank 0 only. Without a process group, and without :class:`~safepoint.PerRank` entries, the
single-process path below is all there is.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import torch

from .codec import encode_state
from .collective import has_per_rank, restore_ranks, save_ranks
from .commit import SHARD_BYTES, SavePlan, execute_save, plan_save
from .distributed import DEFAULT_TIMEOUT, LocalCoordinator, check_timeout, default_coordinator
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    ManagerClosedError,
    SafepointError,
    StorageError,
    attach_note,
)
from .gc import GcReport, collect, remove_checkpoint, step_dirs
from .layout import MANIFEST_NAME, join, step_dir
from .manifest import Manifest
from .migrations import Migrations
from .reader import LoadedCheckpoint, read_checkpoint, read_manifest, verify_checkpoint
from .restore import RestoreReport, SkippedCheckpoint, apply_checkpoint, load_values, none_verifies
from .retention import RetentionPolicy, steps_to_keep
from .staging import check_staging_bytes
from .storage import Storage, open_storage
from .structure import StructureCache
from .verify import VerifyReport, verify_storage
from .writer import BackgroundWriter, SaveHandle, check_in_flight

__all__ = ["CheckpointInfo", "CheckpointManager", "check_migrations", "check_state_version", "commit_plan", "save_to"]

logger = logging.getLogger("safepoint")
_T = TypeVar("_T")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its manifest describes it."""

    step: int
    path: str
    save_id: str
    nbytes: int
    created: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest, path: str) -> CheckpointInfo:
        return cls(manifest.step, path, manifest.save_id, manifest.nbytes, manifest.created, dict(manifest.metrics))


def check_state_version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"state_version must be a non-negative integer, not {value!r}")
    return value


def check_migrations(migrations: object, state_version: int) -> Migrations | None:
    """The chain must be whole and end at ``state_version`` before any checkpoint is read."""
    if migrations is None:
        return None
    if not isinstance(migrations, Migrations):
        raise ConfigError(f"migrations must be a safepoint.Migrations, not {type(migrations).__name__}")
    migrations.check(state_version)
    return migrations


def save_to(
    storage: Storage,
    checkpoint: str,
    step: int,
    state: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None,
    state_version: int,
    structures: StructureCache | None = None,
) -> CheckpointInfo:
    """Encode, write and commit ``state`` as ``checkpoint``. On a step already committed, verify it and say so.
    ``structures`` answers the encoding when the state has the structure saved last."""
    with _gc_paused():
        encoded = structures.encode(state) if structures is not None else encode_state(state)
        plan = plan_save(
            encoded,
            checkpoint=checkpoint,
            step=step,
            metrics=metrics,
            state_version=state_version,
            shard_bytes=storage.shard_bytes or SHARD_BYTES,
        )
        return commit_plan(storage, plan, [leaf.tensor for leaf in encoded.leaves])


def commit_plan(
    storage: Storage,
    plan: SavePlan,
    leaves: Sequence[torch.Tensor],
    written: Callable[[int], None] | None = None,
) -> CheckpointInfo:
    """Write and commit a planned save; on a step already committed, verify it and say so."""
    try:
        manifest = execute_save(storage, plan, leaves, written=written)
    except CheckpointExistsError as err:
        raise _existing(storage, plan.checkpoint, plan.step, err) from err
    return CheckpointInfo.of(manifest, storage.describe(plan.checkpoint))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """A save allocates a few objects per tensor; in a training process with millions of live objects, the
    collections those allocations trigger would scan all of them, so the collector waits until the save ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _existing(storage: Storage, checkpoint: str, step: int, err: CheckpointExistsError) -> CheckpointExistsError:
    """The error of a save that found ``checkpoint`` committed (``err``): which step is there, whether another
    writer committed it while this save was writing, and whether it verifies.

    In a manager directory the step directory names the step; a single checkpoint directory may hold any step,
    so the step is the one its manifest names (None when the manifest does not read)."""
    where = storage.describe(checkpoint)
    try:
        there: int | None = read_manifest(storage, checkpoint).step
    except SafepointError:
        there = step if checkpoint else None
    raced = isinstance(err.__cause__, FileExistsError)  # the publication lost: see commit.finish_save
    if there == step:
        headline = (
            f"step {step} was committed by another writer at {where} while this save was writing"
            if raced
            else f"step {step} is already committed at {where}"
        )
    elif there is None:
        headline = f"{where} already holds a committed checkpoint (this save was of step {step})"
    else:
        headline = f"{where} already holds the committed checkpoint of step {there}, not of step {step}"
    try:
        # a step directory holding another step's manifest is corrupt: read_manifest says so
        manifest = verify_checkpoint(storage, checkpoint, step=step if checkpoint else None)
    except SafepointError as problem:
        return CheckpointExistsError(
            f"{headline}; it does NOT verify ({problem}). It was left untouched: inspect it, remove it by hand, "
            "or save under another step",
            step=there,
            path=where,
            verified=False,
        )
    if there != step:
        return CheckpointExistsError(
            f"{headline}; it verifies (save id {manifest.save_id}) and was left untouched. A directory holds one "
            f"checkpoint: save step {step} to another directory, or use a CheckpointManager for numbered steps",
            step=there,
            path=where,
            verified=True,
        )
    return CheckpointExistsError(
        f"{headline}; it verifies (save id {manifest.save_id}, {manifest.nbytes} bytes), so a retry after an "
        "ambiguous commit can treat the step as saved",
        step=step,
        path=where,
        verified=True,
    )


class CheckpointManager:
    """Numbered, verified checkpoints in ``directory``; see the module docstring for the guarantees.

    ``directory`` is a local path or a URL: ``s3://bucket/prefix``, ``memory://...`` or any fsspec protocol,
    opened with ``storage_options`` (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3). On object
    stores ``grace_period`` (seconds, default one hour) is how long a save attempt may go without a sign of
    life before the collector treats its writer as gone.

    ``timeout`` matters only with a torch.distributed process group: the seconds each rank waits for the others
    at each step of a save or restore before raising CoordinationError (default 600). Give it more than the
    slowest rank takes to write its share of a save.

    >>> with CheckpointManager("runs/exp1", keep_last=3) as manager:   # doctest: +SKIP
    ...     report = manager.restore(state)        # None when there is nothing to resume from
    ...     start = report.step + 1 if report else 0
    ...     for step in range(start, total_steps):
    ...         manager.save(step, state, metrics={"loss": loss})
    """

    _closed = True  # class default: close() and __del__ work even if __init__ failed before setting anything

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_every: int | None = None,
        state_version: int = 1,
        migrations: Migrations | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        storage_options: Mapping[str, Any] | None = None,
        grace_period: float | None = None,
        max_staging_bytes: int | None = None,
        max_in_flight: int = 1,
    ) -> None:
        self._policy = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        self._writer = BackgroundWriter(check_staging_bytes(max_staging_bytes), check_in_flight(max_in_flight))
        self._state_version = check_state_version(state_version)
        self._migrations = check_migrations(migrations, self._state_version)
        # with a process group: seconds each rank waits for the others at each step of a save or restore
        self._coordinator = default_coordinator(check_timeout(timeout))
        if not isinstance(directory, (str, os.PathLike, Storage)):
            raise ConfigError(f"directory must be a path, a URL or a Storage, not {type(directory).__name__}")
        self._storage = open_storage(directory, storage_options, grace_period=grace_period)
        self.directory = self._storage.describe("")
        if self._storage.exists("") and not self._storage.is_dir(""):
            raise StorageError(f"{self.directory} exists and is not a directory", path=self.directory)
        if self._storage.exists(MANIFEST_NAME):
            raise ConfigError(
                f"{self.directory} is a single checkpoint, not a manager directory; "
                "use safepoint.restore() or safepoint.load() on it"
            )
        self._storage.ensure_dir("")
        self._closed = False
        if self._coordinator.rank == 0:
            self._collect_dead_staging()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the background saves in flight and release the manager. Idempotent; safe whatever failed before.

        A background failure nobody has seen yet is raised here (once), after every save has finished: nothing
        is left half-written, and the staging buffers are given back."""
        if self._closed:
            return
        self._closed = True
        self._writer.wait_all()
        self._writer.pool.clear()
        self._writer.raise_failures()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> CheckpointManager:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as cleanup:
            note = f"safepoint: closing the manager also failed: {cleanup!r}"
            attach_note(exc, note)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"CheckpointManager({getattr(self, 'directory', '?')!r}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"{self!r} is closed")

    # -- saving ----------------------------------------------------------------------------------------------
    @overload
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        blocking: Literal[True] = True,
    ) -> CheckpointInfo: ...

    @overload
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        blocking: Literal[False],
    ) -> SaveHandle[CheckpointInfo]: ...

    @overload
    def save(
        self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None, blocking: bool
    ) -> CheckpointInfo | SaveHandle[CheckpointInfo]: ...

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        blocking: bool = True,
    ) -> CheckpointInfo | SaveHandle[CheckpointInfo]:
        """Commit ``state`` as ``step``; returns once it is durable. Retention runs after that.

        Raises CheckpointExistsError if the step is committed (the committed one is untouched and verified),
        InvalidStateError before writing anything if a value cannot be checkpointed, StorageError (with the
        operating system's errno, e.g. ENOSPC) if writing fails, leaving nothing visible.

        ``blocking=False`` returns a :class:`SaveHandle` as soon as the state is copied into host staging
        buffers (at most ``max_staging_bytes``; the call waits only while the writer frees room): the caller may
        change its tensors at once. Writing, checksums, commit and then retention run in the background;
        ``latest_step()`` shows the step once it is durable. With ``max_in_flight`` saves already in flight,
        the call first waits for the oldest. A background failure is raised once, as BackgroundSaveError, by the
        next ``save``, ``wait()`` or ``close()`` (or by the handle's ``result()``).

        With a process group, every rank calls it with the same step; every rank gets the same outcome, and a
        rank that does not arrive within ``timeout`` is a CoordinationError naming it, on every other rank.
        """
        self._check_open()
        if self._is_distributed(state):
            if not blocking:
                raise ConfigError(
                    "blocking=False is not supported with a torch.distributed process group or PerRank entries yet: "
                    "every rank saves with blocking=True"
                )
            return self._save_ranks(step, state, metrics)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a non-negative integer, not {step!r}")
        if any(handle.step == step for handle in self._writer.in_flight()):
            raise CheckpointExistsError(f"step {step} is already being saved in the background", step=step)
        if blocking:
            self._writer.wait_all()  # earlier steps commit (and retain) first
        else:
            self._writer.wait_for_room()
        self._writer.raise_failures()
        if not blocking:
            return self._save_in_background(step, state, metrics)
        info = save_to(self._storage, step_dir(step), step, state, metrics=metrics, state_version=self._state_version,
                       structures=self._writer.structures)  # fmt: skip
        self._retain(step)
        return info

    def wait(self) -> None:
        """Wait until every background save is durable (or failed); raise a failure not reported yet, once."""
        self._writer.wait_all()
        self._writer.raise_failures()

    def _save_in_background(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None
    ) -> SaveHandle[CheckpointInfo]:
        path = step_dir(step)

        def commit(plan: SavePlan, leaves: Sequence[torch.Tensor], written: Callable[[int], None]) -> CheckpointInfo:
            info = commit_plan(self._storage, plan, leaves, written)
            self._retain(step)
            return info

        return self._writer.submit(
            state,
            checkpoint=path,
            step=step,
            metrics=metrics,
            state_version=self._state_version,
            commit=commit,
            shard_bytes=self._storage.shard_bytes or SHARD_BYTES,
        )

    def _retain(self, step: int) -> None:
        try:
            self._apply_retention(step)
        except SafepointError as err:
            logger.warning("step %s is saved, but retention failed (it runs again after the next save): %s", step, err)

    def _is_distributed(self, state: object) -> bool:
        return not isinstance(self._coordinator, LocalCoordinator) or has_per_rank(state)

    def _save_ranks(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None) -> CheckpointInfo:
        with _gc_paused():
            summary = save_ranks(
                self._storage,
                self._coordinator,
                step_dir(step) if isinstance(step, int) else "",
                step,
                state,
                metrics=metrics,
                state_version=self._state_version,
                existing=lambda err: _existing(self._storage, step_dir(step), step, err),
                after_commit=self._retain,  # on rank 0, before the other ranks learn the outcome
            )
        path = self._storage.describe(step_dir(step))
        return CheckpointInfo(step, path, summary["save_id"], summary["nbytes"], summary["created"], summary["metrics"])

    def _apply_retention(self, just_saved: int) -> None:
        if self._policy.keeps_everything:
            return
        metrics: dict[int, Mapping[str, float]] = {}
        for step, path in step_dirs(self._storage):
            try:
                metrics[step] = read_manifest(self._storage, path).metrics
            except CheckpointNotFoundError:
                continue
            except SafepointError as err:  # unreadable: neither counted nor deleted; verify reports it
                logger.warning("retention leaves %s alone: %s", self._storage.describe(path), err)
        keep = steps_to_keep(self._policy, metrics, protect=(just_saved,))
        for step in sorted(set(metrics) - keep):
            # unpublish first (the checkpoint disappears atomically and durably), then collect its data;
            # reaches the fault points retention.unpublish.after and retention.delete.after
            remove_checkpoint(self._storage, step_dir(step), fault_prefix="retention")

    # -- listing ---------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending. A committed step has a published manifest; restore() verifies it."""
        self._check_open()
        return [step for step, path in step_dirs(self._storage) if self._storage.exists(join(path, MANIFEST_NAME))]

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint whose manifest reads, ascending by step (see :meth:`verify` for the rest)."""
        self._check_open()
        infos = []
        for _, path in step_dirs(self._storage):
            try:
                infos.append(CheckpointInfo.of(read_manifest(self._storage, path), self._storage.describe(path)))
            except CheckpointNotFoundError:
                continue
            except SafepointError as err:  # one bad manifest must not hide the others; verify() reports it
                logger.warning("leaving out %s: %s", self._storage.describe(path), err)
        return infos

    # -- restoring -------------------------------------------------------------------------------------------
    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        strict: bool = True,
        cast_dtypes: bool = False,
    ) -> RestoreReport | None:
        """Apply a checkpoint to ``state`` in place, verified, totally or not at all.

        With ``step=None``: the newest checkpoint that verifies; returns None if nothing is committed. With a
        step: exactly that one (CheckpointNotFoundError or CorruptCheckpointError, never a fallback).
        ``strict=False`` reports missing and unexpected entries instead of raising; shape, dtype and type
        mismatches always raise RestoreError, with the live state unchanged. ``cast_dtypes=True`` casts
        floating-point tensors saved in another floating-point dtype to the live one (e.g. an fp32 checkpoint
        into a bf16 model) and lists each cast in ``report.cast``. A checkpoint of an older
        ``state_version`` is upgraded by the manager's ``migrations`` before matching (the report lists them);
        a newer one raises StateVersionError: falling back to an older step would silently lose progress.
        """
        self._check_open()
        _check_step(step)
        if self._is_distributed(state):
            return restore_ranks(
                self._storage,
                self._coordinator,
                state,
                step=step,
                strict=strict,
                committed=self.steps,
                step_path=step_dir,
                state_version=self._state_version,
                migrations=self._migrations,
                cast_dtypes=cast_dtypes,
            )

        def apply(loaded: LoadedCheckpoint, where: str, skipped: tuple[SkippedCheckpoint, ...]) -> RestoreReport:
            return apply_checkpoint(
                loaded, state, strict=strict, path=where, skipped=skipped, state_version=self._state_version,
                migrations=self._migrations, cast_dtypes=cast_dtypes,
            )  # fmt: skip

        return self._newest_valid(step, apply)

    def load(
        self, step: int | None = None, *, mmap: bool = False, allow_pickle: Iterable[str] | bool = False
    ) -> tuple[dict[str, Any], RestoreReport]:
        """The newest checkpoint that verifies (or exactly ``step``) as plain values, and its report.

        ``values, report = manager.load()``: objects' state_dicts come back as dicts, tensors as tensors that
        own their memory (with ``mmap=True``, see :func:`safepoint.load`). It finds the checkpoint as
        :meth:`restore` does: newer checkpoints that do not verify are skipped and listed in
        ``report.skipped``; committed checkpoints none of which verifies raise CorruptCheckpointError; a
        ``step`` is that step or an error, never a fallback. The manager's ``migrations`` upgrade an older
        ``state_version`` (listed in ``report.migrations``); ``report.restored`` is every top-level entry.
        Entries saved with :class:`safepoint.Pickled` are unpickled only where ``allow_pickle`` says.

        Nothing committed raises CheckpointNotFoundError (where :meth:`restore` returns None): there are no
        values to return, and a None would only fail later, at the unpacking.

        With a process group, each rank that calls it reads the checkpoint on its own: no collective runs.
        """
        self._check_open()
        _check_step(step)
        if not isinstance(mmap, bool):
            raise ConfigError(f"mmap must be True or False, not {mmap!r}")

        def values(
            loaded: LoadedCheckpoint, where: str, skipped: tuple[SkippedCheckpoint, ...]
        ) -> tuple[dict[str, Any], RestoreReport]:
            return load_values(
                loaded, path=where, skipped=skipped, state_version=self._state_version,
                migrations=self._migrations, allow_pickle=allow_pickle,
            )  # fmt: skip

        found = self._newest_valid(step, values, mmap=mmap)
        if found is None:
            raise CheckpointNotFoundError(f"nothing is committed in {self.directory}: there is no checkpoint to load")
        return found

    def _newest_valid(
        self,
        step: int | None,
        use: Callable[[LoadedCheckpoint, str, tuple[SkippedCheckpoint, ...]], _T],
        *,
        mmap: bool = False,
    ) -> _T | None:
        """``use`` the checkpoint of ``step``, or the newest one that verifies; None when nothing is committed."""
        if step is not None:
            return use(self._read_step(step, mmap), self._storage.describe(step_dir(step)), ())
        skipped: list[SkippedCheckpoint] = []
        for candidate in reversed(self.steps()):
            path = step_dir(candidate)
            try:
                loaded = read_checkpoint(self._storage, path, step=candidate, mmap=mmap)
            except FormatVersionError:
                raise  # a newer safepoint wrote it: falling back would silently lose progress
            except (CorruptCheckpointError, StorageError) as err:
                if not self._storage.exists(join(path, MANIFEST_NAME)):
                    continue  # unpublished while it was read: retention in another process deleted it
                logger.warning("skipping step %s: %s", candidate, err)
                skipped.append(SkippedCheckpoint(candidate, self._storage.describe(path), str(err)))
                continue
            except CheckpointNotFoundError:
                continue  # deleted by retention elsewhere since the listing
            # a newer state_version or a failing migration raises from here: no fallback to an older step
            return use(loaded, self._storage.describe(path), tuple(skipped))
        if skipped:
            raise none_verifies(self.directory, skipped)
        return None

    def _read_step(self, step: int, mmap: bool) -> LoadedCheckpoint:
        try:
            return read_checkpoint(self._storage, step_dir(step), step=step, mmap=mmap)
        except CheckpointNotFoundError:
            available = self.steps()
            raise CheckpointNotFoundError(
                f"step {step} is not committed in {self.directory} (committed: {_summary(available)})"
            ) from None

    # -- maintenance -----------------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every byte of every committed checkpoint."""
        self._check_open()
        return verify_storage(self._storage)

    def gc(self) -> GcReport:
        """Remove what failed or crashed saves left behind, where their writer is certainly gone. With a process
        group, only rank 0 collects; the others return an empty report."""
        self._check_open()
        if self._coordinator.rank != 0:
            return GcReport((), ())
        return collect(self._storage)

    def _collect_dead_staging(self) -> None:
        try:
            report = collect(self._storage)
        except SafepointError as err:
            logger.warning("could not collect leftovers of crashed saves in %s: %s", self.directory, err)
            return
        if report.removed:
            logger.info("removed %d leftover(s) of crashed saves in %s", len(report.removed), self.directory)


def _check_step(step: object) -> None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ConfigError(f"step must be None or a non-negative integer, not {step!r}")


def _summary(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-3:]))} ({len(steps)} in all)"
