"""The one exception tree of safepoint.

Every error safepoint raises on purpose is a :class:`SafepointError`. Errors from the operating system or a
dependency are mapped at the boundary where they happen, with ``raise ... from err`` so the cause is kept::

    SafepointError
    ├── ConfigError (also ValueError)        invalid arguments, caught at construction
    ├── InvalidStateError (also TypeError)   a value in the state that cannot be checkpointed
    ├── StorageError (also OSError)          an I/O failure; ``errno`` is the operating system's
    │   └── AmbiguousCommitError             failed after the point of publication: it may be committed
    ├── CheckpointExistsError                that step is already committed; the committed one is untouched
    ├── CheckpointNotFoundError              no committed checkpoint where one was asked for
    ├── CorruptCheckpointError               checksums, sizes or structure do not match the manifest
    │   ├── FormatVersionError               written by a newer format, or an unknown field
    │   └── UnsafeCheckpointError            a path escaping the root, a symlink, pickle without opt-in
    ├── RestoreError                         the checkpoint does not fit the live state; nothing was changed
    ├── MigrationError                       a user-state migration failed; names the function and its version
    │   ├── StateVersionError                newer than the code's state_version, or no migration path to it
    │   └── KeyPathError                     a key-path helper met a path that is not there
    ├── ConversionError                      import/export: unknown source format, a value the target format
    │                                        cannot hold, or a destination that already exists
    ├── CoordinationError                    ranks of a distributed job did not arrive, or disagree; ``ranks``
    ├── BackgroundSaveError                  a ``blocking=False`` save failed after ``save`` returned; the
    │                                        failure is its ``__cause__``, raised once
    └── ManagerClosedError                   the manager was used after ``close()``

This module must never import anything from the rest of the package.
"""

from __future__ import annotations

import contextlib as _contextlib
import errno as _errno
import logging as _logging
from collections.abc import Iterator as _Iterator

__all__ = [
    "AmbiguousCommitError",
    "BackgroundSaveError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConversionError",
    "CoordinationError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "InvalidStateError",
    "KeyPathError",
    "ManagerClosedError",
    "MigrationError",
    "RestoreError",
    "SafepointError",
    "StateVersionError",
    "StorageError",
    "UnsafeCheckpointError",
    "attach_note",
    "mapped_errors",
]


class SafepointError(Exception):
    """The root of every error safepoint raises."""


class ConfigError(SafepointError, ValueError):
    """An argument is invalid. Raised before anything is read or written."""


class InvalidStateError(SafepointError, TypeError):
    """A value in the state cannot be checkpointed. ``key`` names where it is, e.g. ``optimizer/state/0``."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class StorageError(SafepointError, OSError):
    """An I/O operation failed. ``errno`` carries the operating system's code (e.g. ``errno.ENOSPC``)."""

    def __init__(self, message: str, *, errno: int | None = None, path: str = "") -> None:
        super().__init__(message)
        # OSError's own constructor would reinterpret our arguments, so the attributes are set explicitly.
        self.errno = errno
        self.filename = path
        self.path = path

    def __str__(self) -> str:
        text = str(self.args[0]) if self.args else ""
        if self.errno is not None:
            name = _errno.errorcode.get(self.errno, str(self.errno))
            return f"{text} [{name}]"
        return text


class AmbiguousCommitError(StorageError):
    """The save failed after its commit record was published.

    The checkpoint may or may not be durable. Saving the same step again is safe: the retry finds the committed
    checkpoint, verifies it and reports it with :class:`CheckpointExistsError`.
    """


class CheckpointExistsError(SafepointError):
    """The step is already committed. The committed checkpoint was not modified."""

    def __init__(self, message: str, *, step: int | None = None, path: str = "", verified: bool | None = None):
        super().__init__(message)
        self.step = step
        self.path = path
        self.verified = verified


class CheckpointNotFoundError(SafepointError):
    """There is no committed checkpoint where one was asked for."""


class CorruptCheckpointError(SafepointError):
    """A checkpoint does not match its manifest: a checksum, a size, a missing file or a malformed record.

    ``path`` names the file found to be bad.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class FormatVersionError(CorruptCheckpointError):
    """The checkpoint was written by a newer format than this code knows, or carries fields it does not know."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """The checkpoint asks for something unsafe: a path outside its root, a symlink, or pickle without opt-in."""


class RestoreError(SafepointError):
    """The checkpoint does not fit the live state. Live objects were left unchanged.

    ``missing`` lists entries the live state has and the checkpoint lacks; ``unexpected`` entries the checkpoint
    has and the live state lacks; ``mismatched`` entries whose shape, dtype or type differ, each with the reason.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class MigrationError(SafepointError):
    """A user-state migration could not be applied. Nothing was applied to live objects.

    ``function`` names the migration (empty when none ran), ``from_version`` the version it upgrades from; the
    migration's own exception is the ``__cause__``.
    """

    def __init__(self, message: str, *, function: str = "", from_version: int | None = None) -> None:
        super().__init__(message)
        self.function = function
        self.from_version = from_version


class StateVersionError(MigrationError):
    """The saved state's version cannot be brought to the code's: it is newer, or no migration chain reaches it.

    ``saved_version`` is the checkpoint's (or the dict's) ``state_version``, ``expected_version`` the code's.
    """

    def __init__(self, message: str, *, saved_version: int, expected_version: int, path: str = "") -> None:
        super().__init__(message, from_version=saved_version)
        self.saved_version = saved_version
        self.expected_version = expected_version
        self.path = path


class KeyPathError(MigrationError):
    """A key-path helper (``rename_key``, ``move_key``, ...) met a path that is not there. ``key`` is the full path."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class ConversionError(SafepointError):
    """Import or export failed before anything was published: an unknown source format, a value the target
    format cannot hold, or a destination that already exists. ``path`` names the file or directory."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CoordinationError(SafepointError):
    """The ranks of a distributed save or restore could not act together: a rank did not arrive within the
    timeout (crashed, stopped, or skipped the call), ranks disagree (on the step, on the operation), or a rank
    failed with an error that is not a SafepointError. ``ranks`` names the ranks at fault. Nothing was committed.
    """

    def __init__(self, message: str, *, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


class BackgroundSaveError(SafepointError):
    """A save made with ``blocking=False`` failed in the background. Nothing of it is visible.

    Raised once, by the next ``save``, ``wait()`` or ``close()`` of the manager (or by the handle's ``result()``,
    which raises the failure itself). ``step`` is the step that failed; ``errno`` the operating system's code when
    the cause was an I/O error; the original error is the ``__cause__``.
    """

    def __init__(self, message: str, *, step: int, errno: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.errno = errno


class ManagerClosedError(SafepointError):
    """The manager was used after ``close()``."""


def attach_note(error: BaseException, note: str) -> None:
    """Attach a secondary failure (a cleanup, a rollback) to the error that is propagating, never replacing it.
    Python 3.10 has no exception notes: there the note is logged instead."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        _logging.getLogger("safepoint").error(note)


@_contextlib.contextmanager
def mapped_errors(
    operation: str,
    where: str,
    *passthrough: type[BaseException],
    catch: type[BaseException] | tuple[type[BaseException], ...] = OSError,
    refuse_symlinks: bool = False,
) -> _Iterator[None]:
    """Map an error of the operating system or a storage backend, raised while doing ``operation`` on ``where``,
    to ``StorageError("cannot <operation> <where>: <reason>")`` with its errno and the cause kept.

    What goes through unchanged: SafepointErrors (already mapped), and the ``passthrough`` types (outcomes the
    caller decides on, such as ``FileExistsError`` from an exclusive create). ``catch`` is what is mapped: the OS's
    ``OSError`` by default; a backend whose library raises anything passes ``Exception``. With
    ``refuse_symlinks``, ``ELOOP`` (an ``O_NOFOLLOW`` open met a symlink) is an UnsafeCheckpointError instead.
    """
    try:
        yield
    except passthrough:
        raise
    except SafepointError:
        raise
    except catch as err:
        code = err.errno if isinstance(err, OSError) and isinstance(err.errno, int) else None
        if refuse_symlinks and code == _errno.ELOOP:
            raise UnsafeCheckpointError(f"refusing to follow a symlink at {where}", path=where) from err
        if code is None and isinstance(err, FileNotFoundError):
            code = _errno.ENOENT  # a backend's "no such key" without an errno
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err) or type(err).__name__
        raise StorageError(f"cannot {operation} {where}: {reason}", errno=code, path=where) from err
