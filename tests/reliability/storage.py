"""Storage wrappers for the reliability suite: a power-loss model and an I/O-error injector.

Both wrap a real backend (usually :class:`safepoint._storage.LocalStorage`) through the public ``Storage``
protocol and are handed to ``CheckpointManager`` as its storage; nothing private is patched.

``PowerLossStorage`` follows RocksDB's FaultInjectionTestFS: it records which file data was made durable
(``FileSink.finish``, the fsync) and which directory entries were made durable (``sync_dir`` of their parent,
or ``ensure_dir``, which the protocol documents as durable). At a crash it copies the root as it is and then
undoes, in the copy, everything a power cut could lose: entries created or removed since their directory was
last synced are removed or put back, and file bytes written since the file's last fsync are dropped
(``truncate``) or turned to garbage (``garbage``). The copy is what a machine would find after rebooting.

``FaultyStorage`` raises an injected ``OSError`` (as a backend's ``StorageError``, errno kept) at the N-th call
of one kind: ``create``, ``write``, ``fsync``, ``link`` (publish), ``mkdir``, ``unlink``.

``ForgetfulStorage`` is the deliberately broken variant: it drops every fsync (file and directory). The power-loss
harness must catch it, which shows that the harness can fail.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from safepoint._checksum import Hasher
from safepoint._errors import StorageError
from safepoint._storage import AttemptLock, FileSink, Storage

__all__ = [
    "KINDS",
    "FaultyStorage",
    "ForgetfulStorage",
    "PowerLossStorage",
    "SimulatedCrash",
]


class SimulatedCrash(BaseException):
    """The machine lost power here: every later storage call fails the same way, nothing more reaches the disk."""


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


@dataclass
class _FileData:
    size: int = 0
    synced: int = 0


@dataclass
class _Pending:
    """A directory entry change not yet made durable by a sync of ``directory``."""

    kind: str  # "create" or "remove"
    directory: str
    path: str
    backup: str | None  # for "remove": a hard-linked copy of what was removed (None: an empty directory)


class PowerLossStorage:
    """See the module docstring. ``crash_at``: crash right after the N-th mutating call (1-based)."""

    def __init__(self, inner: Storage, images: Path, *, mode: str = "truncate", crash_at: int | None = None) -> None:
        assert mode in ("truncate", "garbage")
        self.inner = inner
        self.root = inner.root
        self.shard_bytes = inner.shard_bytes
        self.mode = mode
        self.crash_at = crash_at
        self.calls = 0
        self.image: Path | None = None
        self._images = images
        self._backups = Path(tempfile.mkdtemp(prefix="backups-", dir=images))
        self._pending: list[_Pending] = []
        self._backup_count = 0
        self._data: dict[str, _FileData] = {}
        self._lock = threading.RLock()

    # -- the crash -------------------------------------------------------------------------------------------
    def crash(self) -> Path:
        """Take the after-reboot image now; from here on every call raises SimulatedCrash."""
        with self._lock:
            if self.image is None:
                self.image = self._take_image()
            raise SimulatedCrash(f"power lost after storage call {self.calls}")

    def _alive(self) -> None:
        if self.image is not None:
            raise SimulatedCrash("the machine is off")

    def _tick(self) -> None:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            self.crash()

    def _take_image(self) -> Path:
        image = Path(tempfile.mkdtemp(prefix="image-", dir=self._images)) / "root"
        shutil.copytree(self.inner.root, image, symlinks=True)
        for change in reversed(self._pending):
            target = image / change.path
            if change.kind == "create":
                _remove(target)
            elif not os.path.lexists(target):
                if change.backup is None:
                    target.mkdir()
                elif os.path.isdir(change.backup):
                    shutil.copytree(change.backup, target, symlinks=True)
                else:
                    shutil.copy2(change.backup, target)
        rng = random.Random(self.calls)
        for path, data in self._data.items():
            target = image / path
            if data.synced >= data.size or not target.is_file() or target.is_symlink():
                continue
            if self.mode == "truncate":
                os.truncate(target, data.synced)
            else:
                with open(target, "r+b") as handle:
                    handle.seek(data.synced)
                    handle.write(rng.randbytes(data.size - data.synced))
        return image

    # -- recording -------------------------------------------------------------------------------------------
    def _created(self, path: str) -> None:
        self._pending.append(_Pending("create", _parent(path), path, None))

    def _removing(self, path: str) -> None:
        where = Path(self.inner.describe(path))
        if not os.path.lexists(where):
            return
        self._backup_count += 1
        backup = self._backups / str(self._backup_count)
        if where.is_dir() and not where.is_symlink():
            shutil.copytree(where, backup, symlinks=True, copy_function=os.link)
            empty = not any(backup.iterdir())
            self._pending.append(_Pending("remove", _parent(path), path, None if empty else str(backup)))
        else:
            os.link(where, backup, follow_symlinks=False)
            self._pending.append(_Pending("remove", _parent(path), path, str(backup)))

    # -- the protocol ----------------------------------------------------------------------------------------
    def describe(self, path: str) -> str:
        return self.inner.describe(path)

    def ensure_dir(self, path: str) -> bool:
        with self._lock:
            self._alive()
            created = self.inner.ensure_dir(path)
            if created:
                self._tick()
            return created

    def create(self, path: str) -> FileSink:
        with self._lock:
            self._alive()
            sink = self.inner.create(path)
            data = self._data[path] = _FileData()
            self._created(path)
            self._tick()
            return _RecordingSink(self, sink, data)

    def publish(self, source: str, target: str) -> None:
        with self._lock:
            self._alive()
            self.inner.publish(source, target)
            self._data[target] = self._data.get(source) or _durable(self.inner, source)
            self._created(target)
            self._tick()

    def sync_dir(self, path: str) -> None:
        with self._lock:
            self._alive()
            self.inner.sync_dir(path)
            self._pending = [change for change in self._pending if change.directory != path]
            self._tick()

    def remove_file(self, path: str) -> None:
        with self._lock:
            self._alive()
            self._removing(path)
            self.inner.remove_file(path)
            self._tick()

    def remove_tree(self, path: str) -> None:
        with self._lock:
            self._alive()
            self._removing(path)
            self.inner.remove_tree(path)
            self._tick()

    def remove_empty_dir(self, path: str) -> bool:
        with self._lock:
            self._alive()
            removed = self.inner.remove_empty_dir(path)
            if removed:
                self._pending.append(_Pending("remove", _parent(path), path, None))
                self._tick()
            return removed

    def lock_attempt(self, path: str) -> AttemptLock:
        with self._lock:
            self._alive()
            lock = self.inner.lock_attempt(path)
            self._created(path)
            self._tick()
            return _RecordingLock(self, lock, path)

    def try_lock_attempt(self, path: str) -> AttemptLock | None:
        with self._lock:
            self._alive()
            lock = self.inner.try_lock_attempt(path)
            return None if lock is None else _RecordingLock(self, lock, path)

    # reads change nothing on disk
    def size(self, path: str) -> int:
        self._alive()
        return self.inner.size(path)

    def read_into(self, path: str, buffer: memoryview, hasher: Hasher | None) -> None:
        self._alive()
        self.inner.read_into(path, buffer, hasher)

    def read_bytes(self, path: str, limit: int) -> bytes:
        self._alive()
        return self.inner.read_bytes(path, limit)

    def listdir(self, path: str) -> list[str]:
        self._alive()
        return self.inner.listdir(path)

    def is_dir(self, path: str) -> bool:
        self._alive()
        return self.inner.is_dir(path)

    def exists(self, path: str) -> bool:
        self._alive()
        return self.inner.exists(path)

    def mtime(self, path: str) -> float:
        self._alive()
        return self.inner.mtime(path)


def _durable(storage: Storage, path: str) -> _FileData:
    size = storage.size(path)
    return _FileData(size, size)


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif os.path.lexists(target):
        target.unlink()


class _RecordingSink:
    def __init__(self, owner: PowerLossStorage, inner: FileSink, data: _FileData) -> None:
        self.owner, self.inner, self.data = owner, inner, data

    def write(self, data: memoryview, /) -> None:
        with self.owner._lock:
            self.owner._alive()
            self.inner.write(data)
            self.data.size += data.nbytes
            self.owner._tick()

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._alive()
            self.inner.finish()
            self.data.synced = self.data.size
            self.owner._tick()

    def abort(self) -> None:
        self.inner.abort()  # closing changes nothing on disk: allowed even after the crash


class _RecordingLock:
    def __init__(self, owner: PowerLossStorage, inner: AttemptLock, path: str) -> None:
        self.owner, self.inner, self.path = owner, inner, path

    def release(self, *, remove: bool) -> None:
        with self.owner._lock:
            if self.owner.image is not None:
                self.inner.release(remove=False)  # a dead machine removes nothing; it only drops its locks
                return
            if remove:
                self.owner._removing(self.path)
            self.inner.release(remove=remove)
            if remove:
                self.owner._tick()


# -- injected I/O errors ------------------------------------------------------------------------------------------
KINDS = ("create", "write", "fsync", "link", "mkdir", "unlink")


class FaultyStorage:
    """Raise ``OSError(code)`` (mapped to StorageError as a backend does) at the ``nth`` call of ``kind``."""

    def __init__(self, inner: Storage, kind: str | None = None, nth: int = 0, code: int = errno.EIO) -> None:
        assert kind is None or kind in KINDS
        self.inner, self.root, self.shard_bytes = inner, inner.root, inner.shard_bytes
        self.kind, self.nth, self.code = kind, nth, code
        self.counts = dict.fromkeys(KINDS, 0)
        self.fired = False
        self._lock = threading.Lock()

    def hit(self, kind: str, path: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            fire = kind == self.kind and self.counts[kind] == self.nth
            self.fired = self.fired or fire
        if fire:
            where = self.inner.describe(path)
            cause = OSError(self.code, f"{os.strerror(self.code)} (injected at {kind} #{self.nth})", where)
            raise StorageError(f"cannot {kind} {where}: {cause.strerror}", errno=self.code, path=where) from cause

    def describe(self, path: str) -> str:
        return self.inner.describe(path)

    def ensure_dir(self, path: str) -> bool:
        self.hit("mkdir", path)
        return self.inner.ensure_dir(path)

    def create(self, path: str) -> FileSink:
        self.hit("create", path)
        return _FaultySink(self, self.inner.create(path), path)

    def publish(self, source: str, target: str) -> None:
        self.hit("link", target)
        self.inner.publish(source, target)

    def sync_dir(self, path: str) -> None:
        self.hit("fsync", path)
        self.inner.sync_dir(path)

    def remove_file(self, path: str) -> None:
        self.hit("unlink", path)
        self.inner.remove_file(path)

    def remove_tree(self, path: str) -> None:
        self.hit("unlink", path)
        self.inner.remove_tree(path)

    def remove_empty_dir(self, path: str) -> bool:
        self.hit("unlink", path)
        return self.inner.remove_empty_dir(path)

    def lock_attempt(self, path: str) -> AttemptLock:
        self.hit("create", path)
        return _FaultyLock(self, self.inner.lock_attempt(path), path)

    def try_lock_attempt(self, path: str) -> AttemptLock | None:
        lock = self.inner.try_lock_attempt(path)
        return None if lock is None else _FaultyLock(self, lock, path)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def read_into(self, path: str, buffer: memoryview, hasher: Hasher | None) -> None:
        self.inner.read_into(path, buffer, hasher)

    def read_bytes(self, path: str, limit: int) -> bytes:
        return self.inner.read_bytes(path, limit)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def is_dir(self, path: str) -> bool:
        return self.inner.is_dir(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def mtime(self, path: str) -> float:
        return self.inner.mtime(path)


class _FaultySink:
    def __init__(self, owner: FaultyStorage, inner: FileSink, path: str) -> None:
        self.owner, self.inner, self.path = owner, inner, path

    def write(self, data: memoryview, /) -> None:
        self.owner.hit("write", self.path)
        self.inner.write(data)

    def finish(self) -> None:
        try:
            self.owner.hit("fsync", self.path)
        except BaseException:
            self.inner.abort()  # a failed fsync still closes the file, as close() after it would
            raise
        self.inner.finish()

    def abort(self) -> None:
        self.inner.abort()


class _FaultyLock:
    def __init__(self, owner: FaultyStorage, inner: AttemptLock, path: str) -> None:
        self.owner, self.inner, self.path = owner, inner, path

    def release(self, *, remove: bool) -> None:
        if remove:
            try:
                self.owner.hit("unlink", self.path)
            except BaseException:
                self.inner.release(remove=False)
                raise
        self.inner.release(remove=remove)


# -- the deliberately broken variant ----------------------------------------------------------------------------
class ForgetfulStorage(FaultyStorage):
    """Never fsyncs: files are closed without it and directory syncs are skipped (a backend that 'optimised' them
    away). Under the power-loss model, acknowledged checkpoints then vanish or tear."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)

    def create(self, path: str) -> FileSink:
        return _NoSyncSink(self.inner.create(path))

    def sync_dir(self, path: str) -> None:
        return None


class _NoSyncSink:
    def __init__(self, inner: FileSink) -> None:
        self.inner = inner

    def write(self, data: memoryview, /) -> None:
        self.inner.write(data)

    def finish(self) -> None:
        self.inner.abort()  # closes the file; its data stays in the page cache, not durable

    def abort(self) -> None:
        self.inner.abort()
