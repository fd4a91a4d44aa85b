"""CheckpointManager: numbered checkpoints in one directory, verified resume, retention, and a safe lifecycle.

Lifecycle: a context manager; ``close()`` is idempotent and safe from any state, including a constructor that
failed half-way; ``__exit__`` never replaces the ``with`` body's exception (a cleanup error becomes a note).

This class holds the configuration and the lifecycle, nothing more. The work is done by :mod:`safepoint._pipeline`
(saves, and retention after each one is durable) and :mod:`safepoint._restoring` (resume, load), the same code
for one process and for many ranks: with a torch.distributed process group every rank makes the same calls.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, overload

from ._distributed import DEFAULT_TIMEOUT, check_timeout, default_coordinator
from ._errors import ManagerClosedError, attach_note
from ._gc import GcReport
from ._migrations import Migrations, check_migrations, check_state_version
from ._pipeline import CheckpointInfo, open_saver
from ._restore import RestoreReport
from ._restoring import Restorer
from ._retention import RetentionPolicy
from ._storage import Storage
from ._verify import VerifyReport
from ._writer import BackgroundWriter, SaveHandle

__all__ = ["CheckpointInfo", "CheckpointManager"]


class CheckpointManager:
    """Numbered, verified checkpoints in ``directory``: a path or a URL (``s3://bucket/prefix``, any fsspec
    protocol, opened with ``storage_options``; ``grace_period``: seconds an object-store save may go without a
    sign of life before the collector treats it as dead). ``timeout``: with a process group, the seconds each
    rank waits for the others at each step of a save or restore before a CoordinationError (default 600).
    ``distributed=False``: this process saves and restores alone even in a torch.distributed group (for code that
    saves on one rank only, as Lightning does); two processes must then never save into the same directory.

    >>> with CheckpointManager("runs/exp1", keep_last=3) as manager:   # doctest: +SKIP
    ...     report = manager.restore(state)        # None when there is nothing to resume from
    ...     for step in range(report.step + 1 if report else 0, total_steps):
    ...         manager.save(step, state, metrics={"loss": loss})
    """

    _closed = True  # class default: close() works even if __init__ failed before setting anything

    def __init__(
        self, directory: str | os.PathLike[str] | Storage, *, keep_last: int | None = None,
        keep_best: int | None = None, best_metric: str | None = None, best_mode: str = "min",
        keep_every: int | None = None, state_version: int = 1, migrations: Migrations | None = None,
        timeout: float = DEFAULT_TIMEOUT, storage_options: Mapping[str, Any] | None = None,
        grace_period: float | None = None, max_staging_bytes: int | None = None, max_in_flight: int = 1,
        distributed: bool = True,
    ) -> None:  # fmt: skip
        policy = RetentionPolicy(keep_last, keep_best, best_metric, best_mode, keep_every)
        background = BackgroundWriter(max_staging_bytes, max_in_flight)
        version = check_state_version(state_version)
        migrations = check_migrations(migrations, version)
        self._coordinator = default_coordinator(check_timeout(timeout), distributed=distributed)
        self._saver = open_saver(
            directory, storage_options, grace_period, self._coordinator,
            policy=policy, background=background, state_version=version,
        )  # fmt: skip
        self._reads = Restorer(self._saver.storage, self._coordinator, version, migrations)
        self.directory = self._saver.storage.describe("")
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the background saves, then raise a failure nobody has seen yet, once. Idempotent; safe always."""
        if self._closed:
            return
        self._closed = True
        self._saver.close()

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
        """Commit ``state`` as ``step``, durably, then apply retention. CheckpointExistsError if the step is
        committed; InvalidStateError before writing; StorageError (errno kept) leaving nothing visible.
        ``blocking=False`` returns a :class:`SaveHandle` once the state is staged; a background failure is
        raised once (BackgroundSaveError) by the next ``save``, ``wait()`` or ``close()``. With a process group
        every rank calls it with the same step and gets the same outcome (see :mod:`safepoint._pipeline`)."""
        self._check_open()
        return self._saver.save(step, state, metrics, blocking=blocking)

    def wait(self) -> None:
        """Wait until every background save is durable (or failed); raise a failure not reported yet, once."""
        self._saver.wait()

    # -- listing ---------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending. A committed step has a published manifest; restore() verifies it."""
        self._check_open()
        return self._reads.steps()

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return max(self.steps(), default=None)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint whose manifest reads, ascending by step (see :meth:`verify` for the rest)."""
        self._check_open()
        return self._reads.checkpoints()

    # -- restoring -------------------------------------------------------------------------------------------
    def restore(
        self, state: MutableMapping[str, Any], *, step: int | None = None, strict: bool = True,
        cast_dtypes: bool = False,
    ) -> RestoreReport | None:  # fmt: skip
        """Apply the newest checkpoint that verifies (None if nothing is committed), or exactly ``step``, to
        ``state`` in place, verified, totally or not at all (see :mod:`safepoint._restoring`). ``strict=False``
        reports missing and unexpected entries; ``cast_dtypes=True`` casts floating-point tensors."""
        self._check_open()
        return self._reads.restore(state, step=step, strict=strict, cast_dtypes=cast_dtypes)

    def load(
        self, step: int | None = None, *, mmap: bool = False, allow_pickle: Iterable[str] | bool = False
    ) -> tuple[dict[str, Any], RestoreReport]:
        """``values, report = manager.load()``: the checkpoint :meth:`restore` would pick, as plain values
        (see :func:`safepoint.load`); CheckpointNotFoundError if nothing is committed. Entries saved with
        :class:`safepoint.Pickled` are unpickled only where ``allow_pickle`` says. Each rank reads on its own."""
        self._check_open()
        return self._reads.load(step, mmap=mmap, allow_pickle=allow_pickle)

    # -- maintenance -----------------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every byte of every committed checkpoint."""
        self._check_open()
        return self._saver.verify()

    def gc(self) -> GcReport:
        """Remove what failed or crashed saves left behind (their writer certainly gone); rank 0 only."""
        self._check_open()
        return self._saver.gc()
