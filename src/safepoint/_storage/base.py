"""The Storage protocol: the few operations the commit protocol and the readers need, and nothing more.

Paths are relative to the storage root, ``/``-separated, and always produced by safepoint itself or validated
by :func:`safepoint._manifest.check_relative_path` before they reach a backend. Backends map their own errors to
:class:`~safepoint._errors.StorageError` (keeping the cause), except ``FileExistsError`` from
:meth:`Storage.publish` and ``FileNotFoundError`` where a method documents it: those are outcomes the caller
decides on.

Atomicity is the backend's to provide, each explained in its own docstring:

- local file systems publish with ``link()``, which fails if the name exists, and fsync files and directories;
- object stores publish with a conditional create (``If-None-Match: *``) of the target, and have no
  directories to sync: there, directories are implicit (a prefix exists while an object lies under it),
  :meth:`Storage.ensure_dir` and :meth:`Storage.sync_dir` do nothing, and a dead writer's attempt lock is
  recognised by its age (the live writer refreshes it) instead of by ``flock``.

``tests/storage/test_conformance.py`` is the executable form of this contract: every backend passes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .._checksum import Hasher

__all__ = [
    "AttemptLock",
    "FileReader",
    "FileSink",
    "Prefetch",
    "PrefetchRanges",
    "RangeReads",
    "SequentialReads",
    "Storage",
]


class FileSink(Protocol):
    """A file being written. Nothing is visible under its final name until the caller publishes it."""

    def write(self, data: memoryview, /) -> None: ...

    def finish(self) -> None:
        """Make the bytes durable (fsync) and close. A failure here is an error, never retried."""

    def abort(self) -> None:
        """Close without making anything durable; safe to call after a failure, and more than once."""


class FileReader(Protocol):
    """A file opened for reading front to back. Only the read path uses it, through :class:`SequentialReads`."""

    def readinto(self, buffers: Sequence[memoryview], /) -> None:
        """Fill each buffer in turn with the file's next bytes (a scatter read: many small tensors take one system
        call); StorageError (EIO) if the file ends first."""

    def close(self) -> None: ...


@runtime_checkable
class SequentialReads(Protocol):
    """Optional for a backend: reading one file front to back into many buffers, so that each tensor is read
    straight into its own memory. The payload reader uses it when the storage has it; any other backend is read
    with one :meth:`Storage.read_into` of the whole file, then copied out (twice the memory for a moment)."""

    def open_reader(self, path: str) -> FileReader:
        """Open a regular file for reading; ``FileNotFoundError`` if absent."""


@runtime_checkable
class RangeReads(Protocol):
    """Optional for a backend: reading a byte range of a file (``pread``; a ranged GET on object stores), so that a
    resharding restore reads only the parts of a sharded tensor's boxes it needs. Without it, the reader reads the
    whole file for each range (correct, not economical)."""

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset``; ``FileNotFoundError`` if absent, StorageError
        (EIO) if the file ends first."""


class RangeFiles(Protocol):
    """Ranged reads that keep each file they read open until :meth:`close` (see :class:`HeldRangeReads`)."""

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        """As :meth:`RangeReads.read_range`."""

    def close(self) -> None:
        """Close every file opened; a read after this opens its file for that read only."""


@runtime_checkable
class HeldRangeReads(Protocol):
    """Optional for a backend with :class:`RangeReads`: ranged reads through files held open, so that a resharding
    restore, which reads many ranges of few files, opens each file once instead of once per range (locally: one
    descriptor per file; on object stores: one size request per object)."""

    def range_files(self) -> RangeFiles:
        """An empty set of held files; the caller closes it, also on errors."""


@runtime_checkable
class PrefetchRanges(Protocol):
    """Optional for :class:`RangeFiles`: a hint that a byte range of a file will be read soon, so the device can
    fetch it while the caller does other work (a resharding restore matches the rest of its state meanwhile).
    Never required, never an error, and nothing fetched is used as it is: the range is read and verified as any
    other."""

    def prefetch_range(self, path: str, offset: int, nbytes: int) -> None: ...


@runtime_checkable
class Prefetch(Protocol):
    """Optional for a backend: a hint that a file will be read soon, so the device can start on it while the
    caller does other work (a restore parses a large manifest meanwhile). Never required, never an error."""

    def prefetch(self, path: str) -> None: ...


class AttemptLock(Protocol):
    """Held by a live save attempt. Whoever can take it knows the attempt's writer is gone (on object stores:
    has not refreshed it within the grace period)."""

    def release(self, *, remove: bool) -> None: ...


@runtime_checkable
class Storage(Protocol):
    root: str
    #: The payload file size this backend prefers, or None for the planner's default. Object stores want
    #: smaller files: each is one upload, and the writer threads upload several at once.
    shard_bytes: int | None

    def describe(self, path: str) -> str:
        """A human-readable location for messages (an absolute path or URL)."""

    def ensure_dir(self, path: str) -> bool:
        """Create the directory (and parents) durably; return whether it was created."""

    def create(self, path: str) -> FileSink:
        """Create a new file exclusively; ``FileExistsError`` if it exists, raised here or, on object stores that
        check when the upload completes, by :meth:`FileSink.finish`."""

    def publish(self, source: str, target: str) -> None:
        """Give the durable file ``source`` the name ``target``, failing with ``FileExistsError`` if it exists."""

    def sync_dir(self, path: str) -> None:
        """Make the directory's entries durable."""

    def size(self, path: str) -> int:
        """The size of a regular file; ``FileNotFoundError`` if absent; symlinks are refused."""

    def read_into(self, path: str, buffer: memoryview, hasher: Hasher | None) -> None:
        """Fill ``buffer`` with the file's first ``len(buffer)`` bytes, feeding them to ``hasher``."""

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file, refusing files larger than ``limit`` before reading; ``FileNotFoundError`` if absent."""

    def listdir(self, path: str) -> list[str]:
        """Names in a directory; ``FileNotFoundError`` if it does not exist."""

    def is_dir(self, path: str) -> bool: ...

    def exists(self, path: str) -> bool: ...

    def mtime(self, path: str) -> float: ...

    def remove_file(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    def remove_tree(self, path: str) -> None:
        """Remove a directory and everything in it, never following links; missing is not an error."""

    def remove_empty_dir(self, path: str) -> bool:
        """Remove a directory if it is empty; return whether it was removed."""

    def lock_attempt(self, path: str) -> AttemptLock:
        """Create and hold the lock file of a save attempt (exclusive: ``FileExistsError`` if it exists)."""

    def try_lock_attempt(self, path: str) -> AttemptLock | None:
        """Take an attempt's lock if its writer is gone; None while the writer is alive.
        ``FileNotFoundError`` if there is no such lock file."""
