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
same calls. Saves run through :mod:`safepoint.pipeline` and restores through :mod:`safepoint.restoring`, the same
code for one process (the one-rank case) and for many ranks; this class only holds the configuration and the
lifecycle. Retention and garbage collection run on rank 0 only.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, overload

from .distributed import DEFAULT_TIMEOUT, check_timeout, default_coordinator
from .errors import CheckpointNotFoundError, ConfigError, ManagerClosedError, SafepointError, StorageError, attach_note
from .gc import GcReport, collect, step_dirs
from .layout import MANIFEST_NAME, join, step_dir
from .migrations import Migrations
from .pipeline import CheckpointInfo, Saver, apply_retention, save_to
from .reader import read_manifest
from .restore import RestoreReport
from .restoring import load_newest, restore_newest
from .retention import RetentionPolicy
from .staging import check_staging_bytes
from .storage import Storage, open_storage
from .verify import VerifyReport, verify_storage
from .writer import BackgroundWriter, SaveHandle, check_in_flight

__all__ = ["CheckpointInfo", "CheckpointManager", "check_migrations", "check_state_version", "save_to"]

logger = logging.getLogger("safepoint")


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


class CheckpointManager:
    """Numbered, verified checkpoints in ``directory``; see the module docstring for the guarantees.

    ``directory`` is a local path or a URL (``s3://bucket/prefix``, ``memory://...``, any fsspec protocol) opened
    with ``storage_options``; on object stores ``grace_period`` (seconds, default one hour) is how long a save
    attempt may go without a sign of life before the collector treats its writer as gone. ``timeout`` matters only
    with a torch.distributed process group: the seconds each rank waits for the others at each step of a save or
    restore before raising CoordinationError (default 600); give it more than the slowest rank takes to write.

    >>> with CheckpointManager("runs/exp1", keep_last=3) as manager:   # doctest: +SKIP
    ...     report = manager.restore(state)        # None when there is nothing to resume from
    ...     for step in range(report.step + 1 if report else 0, total_steps):
    ...         manager.save(step, state, metrics={"loss": loss})
    """

    _closed = True  # class default: close() works even if __init__ failed before setting anything

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
        policy = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        background = BackgroundWriter(check_staging_bytes(max_staging_bytes), check_in_flight(max_in_flight))
        self._state_version = check_state_version(state_version)
        self._migrations = check_migrations(migrations, self._state_version)
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
        self._saver = Saver(
            self._storage, self._coordinator, state_version=self._state_version, background=background,
            retain=lambda step: apply_retention(self._storage, policy, step),
        )  # fmt: skip
        self._closed = False
        if self._coordinator.rank == 0:
            self._collect_dead_staging()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the background saves in flight and release the manager. Idempotent; safe whatever failed before.
        A background failure nobody has seen yet is raised here, once, after every save has finished."""
        if self._closed:
            return
        self._closed = True
        self._saver.background.wait_all()
        self._saver.background.pool.clear()
        self._saver.background.raise_failures()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> CheckpointManager:
        self._check_open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        try:
            self.close()
        except BaseException as cleanup:
            if exc is None:
                raise
            attach_note(exc, f"safepoint: closing the manager also failed: {cleanup!r}")

    def __repr__(self) -> str:
        return f"CheckpointManager({getattr(self, 'directory', '?')!r}, {'closed' if self._closed else 'open'})"

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"{self!r} is closed")

    # -- saving ----------------------------------------------------------------------------------------------
    @overload
    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None,
             blocking: Literal[True] = True) -> CheckpointInfo: ...  # fmt: skip
    @overload
    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None,
             blocking: Literal[False]) -> SaveHandle[CheckpointInfo]: ...  # fmt: skip
    @overload
    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None,
             blocking: bool) -> CheckpointInfo | SaveHandle[CheckpointInfo]: ...  # fmt: skip
    def save(
        self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None, blocking: bool = True
    ) -> CheckpointInfo | SaveHandle[CheckpointInfo]:
        """Commit ``state`` as ``step``; returns once it is durable, then retention runs. CheckpointExistsError
        if the step is committed (untouched, verified); InvalidStateError before writing if a value cannot be
        checkpointed; StorageError (with its errno) if writing fails, leaving nothing visible.

        ``blocking=False`` returns a :class:`SaveHandle` once the state is copied into staging buffers (at most
        ``max_staging_bytes``); writing, commit and retention run in the background, and a failure is raised
        once, as BackgroundSaveError, by the next ``save``, ``wait()`` or ``close()`` (or ``result()``). With a
        process group every rank calls it with the same step and gets the same outcome; a rank that does not
        arrive within ``timeout`` is a CoordinationError naming it, on every other rank (in the background
        too: the commit waits until every rank's files are durable)."""
        self._check_open()
        return self._saver.save(step, state, metrics, blocking=blocking)

    def wait(self) -> None:
        """Wait until every background save is durable (or failed); raise a failure not reported yet, once."""
        self._saver.background.wait_all()
        self._saver.background.raise_failures()

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
        """Apply a checkpoint to ``state`` in place, verified, totally or not at all: the newest that verifies
        (None if nothing is committed), or exactly ``step`` (an error, never a fallback). ``strict=False``
        reports missing and unexpected entries instead of raising; mismatches always raise RestoreError with the
        live state unchanged. ``cast_dtypes=True`` casts floating-point tensors to the live dtype (``report.cast``).
        An older ``state_version`` is upgraded by ``migrations``; a newer one raises StateVersionError."""
        self._check_open()
        _check_step(step)
        return restore_newest(
            self._storage, self._coordinator, state, step=step, committed=self.steps, step_path=step_dir,
            strict=strict, state_version=self._state_version, migrations=self._migrations, cast_dtypes=cast_dtypes,
        )  # fmt: skip

    def load(
        self, step: int | None = None, *, mmap: bool = False, allow_pickle: Iterable[str] | bool = False
    ) -> tuple[dict[str, Any], RestoreReport]:
        """``values, report = manager.load()``: the checkpoint :meth:`restore` would pick, as plain values
        (see :func:`safepoint.load`); CheckpointNotFoundError if nothing is committed. Entries saved with
        :class:`safepoint.Pickled` are unpickled only where ``allow_pickle`` says. Each rank reads on its own."""
        self._check_open()
        _check_step(step)
        if not isinstance(mmap, bool):
            raise ConfigError(f"mmap must be True or False, not {mmap!r}")
        found = load_newest(
            self._storage, step=step, committed=self.steps, step_path=step_dir, mmap=mmap,
            state_version=self._state_version, migrations=self._migrations, allow_pickle=allow_pickle,
        )  # fmt: skip
        if found is None:
            raise CheckpointNotFoundError(f"nothing is committed in {self.directory}: there is no checkpoint to load")
        return found

    # -- maintenance -----------------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every byte of every committed checkpoint."""
        self._check_open()
        return verify_storage(self._storage)

    def gc(self) -> GcReport:
        """Remove what failed or crashed saves left behind, where their writer is certainly gone. With a process
        group, only rank 0 collects; the others return an empty report."""
        self._check_open()
        return collect(self._storage) if self._coordinator.rank == 0 else GcReport((), ())

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
