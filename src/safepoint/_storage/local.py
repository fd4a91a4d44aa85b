"""The local file-system backend: the fast path, with every fsync the commit protocol needs.

Atomicity: a checkpoint is published by ``link()``-ing its fully written and fsynced manifest to the final name,
which fails with ``EEXIST`` if the step is already committed (plain ``rename()`` would silently replace), and then
fsyncing the directory. On file systems without hard links, publication falls back to an exclusive create
(``O_CREAT|O_EXCL``) of the final name followed by a copy and fsync: a crash during that copy leaves a manifest
whose embedded checksum fails, which readers report and skip, never use.

Reads never follow symlinks below the root: every component is opened with ``O_NOFOLLOW`` relative to its parent.
Liveness of a save attempt is an ``flock`` on its lock file, which the kernel releases when the writer dies, even
by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Sequence

from .._checksum import Hasher
from .._errors import SafepointError, StorageError, UnsafeCheckpointError, mapped_errors

__all__ = ["LocalStorage"]

_READ_CHUNK = 64 << 20
#: Buffers per readv call (POSIX guarantees 16; Linux takes 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16
_LINKLESS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _mapped(operation: str, where: str, *passthrough: type[OSError]) -> contextlib.AbstractContextManager[None]:
    """OSError becomes StorageError; ELOOP (an O_NOFOLLOW open met a symlink) an UnsafeCheckpointError."""
    return mapped_errors(operation, where, *passthrough, refuse_symlinks=True)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux, or no such symbol
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
#: Writeback of a file's dirty pages is started after every this many bytes, so that the final fsync
#: finds most of the file already on its way to the disk instead of flushing all of it at once.
_WRITEBACK_BYTES = 32 << 20


class _LocalSink:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.written = 0
        self.flushed = 0  # bytes whose writeback has been started

    def write(self, data: memoryview) -> None:
        assert self.fd is not None, "write after finish/abort"
        with _mapped("write", self.path):
            view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
            while view.nbytes:
                written = os.write(self.fd, view)
                view = view[written:]
                self.written += written
        if _sync_file_range is not None and self.written - self.flushed >= _WRITEBACK_BYTES:
            # only a hint to start writing back: its errors surface, authoritatively, at fsync
            _sync_file_range(self.fd, self.flushed, self.written - self.flushed, _SYNC_FILE_RANGE_WRITE)
            self.flushed = self.written

    def finish(self) -> None:
        assert self.fd is not None, "finish after finish/abort"
        fd, self.fd = self.fd, None
        try:
            with _mapped("fsync", self.path):
                os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


class _LocalReader:
    """A file below the root, read front to back with ``readv`` straight into the caller's buffers."""

    def __init__(self, fd: int, where: str) -> None:
        self.fd, self.where, self.position = fd, where, 0
        if hasattr(os, "posix_fadvise"):  # a larger readahead window for the one sequential pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def readinto(self, buffers: Sequence[memoryview]) -> None:
        views = [b.cast("B") if b.format != "B" else b for b in buffers if b.nbytes]
        total, first = sum(v.nbytes for v in views), 0
        with _mapped("read", self.where):
            while first < len(views):
                count = os.readv(self.fd, views[first : first + _IOV_MAX])
                if count == 0:
                    at = self.position + total - sum(v.nbytes for v in views[first:])
                    raise StorageError(f"{self.where} ended early at byte {at}", errno=errno.EIO, path=self.where)
                while first < len(views) and count >= views[first].nbytes:  # skip the buffers now full
                    count -= views[first].nbytes
                    first += 1
                if count:
                    views[first] = views[first][count:]
        self.position += total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pread(fd: int, where: str, offset: int, buffer: memoryview) -> None:
    with _mapped("read", where):
        view = buffer.cast("B") if buffer.format != "B" else buffer
        done, total = 0, view.nbytes
        while done < total:
            count = os.preadv(fd, [view[done : min(total, done + _READ_CHUNK)]], offset + done)
            if count == 0:
                raise StorageError(f"{where} ended early at byte {offset + done}", errno=errno.EIO, path=where)
            done += count


class _Warming:
    """A thread that moves file ranges into the page cache, in the order given, through a pipe into /dev/null
    (``splice``: the kernel's readahead of a sequential read, which keeps this VM's disk busier than
    ``posix_fadvise(WILLNEED)``, and no copy to user memory). Measured in docs/performance.md (resharded load,
    round 4). Errors end the range they met, silently: this is a hint."""

    def __init__(self) -> None:
        self._ranges: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="safepoint-prefetch", daemon=True)
        self._thread.start()

    def put(self, fd: int, offset: int, nbytes: int) -> None:
        self._ranges.put((fd, offset, nbytes))

    def _run(self) -> None:
        try:
            source, sink = os.pipe()
        except OSError:
            source = sink = -1
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC) if source >= 0 else -1
        except OSError:
            null = -1
        try:
            while (item := self._ranges.get()) is not None:
                if null >= 0:  # else no pipe: the hints are taken and dropped until the stop
                    _splice_away(item, (source, sink, null))
        finally:
            for fd in (null, source, sink):
                if fd >= 0:
                    os.close(fd)

    def close(self) -> None:
        self._ranges.put(None)
        self._thread.join()


def _splice_away(hint: tuple[int, int, int], through: tuple[int, int, int]) -> None:
    """Read the range ``hint`` (descriptor, offset, bytes) into the page cache through a pipe (``through``: its
    read end, its write end, and /dev/null, where the bytes go); stops at the end of the file or at an error."""
    fd, offset, nbytes = hint
    source, sink, null = through
    with contextlib.suppress(OSError):
        end = offset + nbytes
        while offset < end:
            moved = os.splice(fd, sink, min(end - offset, _PIPE_BYTES), offset_src=offset)
            if moved <= 0:
                return
            offset += moved
            while moved:
                moved -= os.splice(source, null, moved)


_PIPE_BYTES = 64 << 10  # a pipe's default capacity: a splice moves at most this much


class _HeldFiles:
    """Files below the root held open for ranged reads until :meth:`close`: a resharding restore reads many
    ranges of few files, and walking from the root to each file again for every range (an ``openat`` per path
    component) cost ~0.016 s of a 0.2 s restore (252 MiB, 4 -> 2 ranks: 252 opens per rank instead of 12)."""

    def __init__(
        self, open_below_root: Callable[[str], contextlib.AbstractContextManager[int]], describe: Callable[[str], str]
    ) -> None:
        self._open, self._describe = open_below_root, describe
        self._fds: dict[str, tuple[int, str]] | None = {}  # path -> (descriptor, its description); None once closed
        self._lock = threading.Lock()
        self._warming: _Warming | None = None  # started by the first prefetch_range

    def _held(self, path: str) -> tuple[int, str] | None:
        """The file's descriptor and description, opened at its first use; None once closed."""
        with self._lock:
            held = None if self._fds is None else self._fds.get(path)
            if held is None and self._fds is not None:
                where = self._describe(path)  # once per file, not per range
                with self._open(path) as opened, _mapped("open", where):
                    held = self._fds[path] = (os.dup(opened), where)  # the walk's descriptors close, the copy stays
            return held

    def prefetch_range(self, path: str, offset: int, nbytes: int) -> None:
        """Start the device on the range: the warming thread moves it from the file into the page cache (and
        drops it), so that the kernel's readahead runs while the caller is busy, and the caller's read of the
        range finds it there. A hint only: a file that cannot be opened, or a range past its end, is left for
        the read to report. Linux (``splice``); elsewhere nothing."""
        if not hasattr(os, "splice"):
            return
        with contextlib.suppress(OSError, SafepointError):
            held = self._held(path)
            with self._lock:
                if held is None or self._fds is None:
                    return
                if self._warming is None:
                    self._warming = _Warming()
                self._warming.put(held[0], offset, nbytes)

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        held = self._held(path)
        if held is None:  # closed: a read after the restore opens the file for this read only, holding nothing
            with self._open(path) as opened:
                _pread(opened, self._describe(path), offset, buffer)
            return
        _pread(*held, offset, buffer)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = [fd for fd, _ in (self._fds or {}).values()], None
            warming, self._warming = self._warming, None
        if warming is not None:  # stopped first: it must not use a descriptor after it is closed
            warming.close()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class _LocalLock:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    def release(self, *, remove: bool) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            # the check that the file is still ours is mapped too: an EIO from its stat was a raw traceback
            with _mapped("remove", self.path), contextlib.suppress(FileNotFoundError):
                if remove and _same_file(fd, self.path):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


class LocalStorage:
    """Checkpoints in a directory of a local (or locally mounted) file system."""

    shard_bytes: int | None = None

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def describe(self, path: str) -> str:
        return self._abs(path)

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, *path.split("/")) if path else self.root

    # -- writing ---------------------------------------------------------------------------------------------
    def ensure_dir(self, path: str) -> bool:
        target = self._abs(path)
        missing: list[str] = []
        probe = target
        while not os.path.isdir(probe):
            missing.append(probe)
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        for directory in reversed(missing):
            with _mapped("create directory", directory):
                try:
                    os.mkdir(directory, 0o755)
                except FileExistsError:
                    if not os.path.isdir(directory):
                        raise StorageError(
                            f"{directory} exists and is not a directory", errno=errno.ENOTDIR, path=directory
                        ) from None
                    continue
                self._sync_abs_dir(os.path.dirname(directory))
        return bool(missing)

    def create(self, path: str) -> _LocalSink:
        where = self._abs(path)
        with _mapped("create", where, FileExistsError):
            return _LocalSink(where)

    def publish(self, source: str, target: str) -> None:
        src, dst = self._abs(source), self._abs(target)
        with _mapped("publish", dst, FileExistsError):
            try:
                os.link(src, dst, follow_symlinks=False)
                return
            except OSError as err:
                if err.errno not in _LINKLESS:
                    raise
            data = self.read_bytes(source, os.path.getsize(src))
            sink = _LocalSink(dst)  # O_EXCL: FileExistsError if the step is committed
            try:
                sink.write(memoryview(data))
                sink.finish()
            except BaseException:
                sink.abort()
                raise

    def sync_dir(self, path: str) -> None:
        self._sync_abs_dir(self._abs(path))

    def _sync_abs_dir(self, directory: str) -> None:
        with _mapped("fsync directory", directory):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- reading ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _open_below_root(self, path: str) -> Iterator[int]:
        """Open a regular file below the root without following any symlink on the way."""
        parts = path.split("/")
        where = self._abs(path)
        with _mapped("open", where, FileNotFoundError):
            fds = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
            try:
                for part in parts[:-1]:
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                    fds.append(_open_at(part, flags, fds[-1], where))
                # O_NONBLOCK: a FIFO or device in place of a file must be refused below, not block the open
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                fd = _open_at(parts[-1], flags, fds[-1], where)
                fds.append(fd)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UnsafeCheckpointError(f"{where} is not a regular file", path=where)
                yield fd
            finally:
                for fd in reversed(fds):
                    os.close(fd)

    def size(self, path: str) -> int:
        with self._open_below_root(path) as fd:
            return os.fstat(fd).st_size

    def read_into(self, path: str, buffer: memoryview, hasher: Hasher | None) -> None:
        where = self._abs(path)
        with self._open_below_root(path) as fd, _mapped("read", where):
            view = buffer.cast("B") if buffer.format != "B" else buffer
            offset, total = 0, view.nbytes
            while offset < total:
                chunk = view[offset : min(total, offset + _READ_CHUNK)]
                count = os.readv(fd, [chunk])
                if count == 0:
                    raise StorageError(f"{where} ended early at byte {offset}", errno=errno.EIO, path=where)
                if hasher is not None:
                    hasher.update(chunk[:count])
                offset += count

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset`` (``pread``); StorageError if it ends first."""
        with self._open_below_root(path) as fd:
            _pread(fd, self._abs(path), offset, buffer)

    def range_files(self) -> _HeldFiles:
        return _HeldFiles(self._open_below_root, self._abs)

    def open_reader(self, path: str) -> _LocalReader:
        where = self._abs(path)
        with self._open_below_root(path) as fd, _mapped("open", where):
            return _LocalReader(os.dup(fd), where)  # the walk's descriptors close here, the file's copy stays open

    def prefetch(self, path: str) -> None:
        """``posix_fadvise(WILLNEED)``: the kernel starts reading the file into the page cache in the background.
        A hint only: a file that cannot be opened here is left for the read itself to report."""
        if not hasattr(os, "posix_fadvise"):
            return
        with contextlib.suppress(OSError, SafepointError), self._open_below_root(path) as fd:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def map_file(self, path: str) -> mmap.mmap:
        """A private (copy-on-write) memory map of a file below the root: writes to it never reach the file.
        Pages are read from disk when first touched."""
        where = self._abs(path)
        with self._open_below_root(path) as fd, _mapped("map", where):
            return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)

    def read_bytes(self, path: str, limit: int) -> bytes:
        where = self._abs(path)
        with self._open_below_root(path) as fd, _mapped("read", where):
            size = os.fstat(fd).st_size
            if size > limit:
                raise UnsafeCheckpointError(f"{where} is {size} bytes, over the limit of {limit}", path=where)
            data = bytearray(size)
            self_view = memoryview(data)
            offset = 0
            while offset < size:
                count = os.readv(fd, [self_view[offset:]])
                if count == 0:
                    break
                offset += count
            return bytes(data[:offset])

    def listdir(self, path: str) -> list[str]:
        where = self._abs(path)
        with _mapped("list", where, FileNotFoundError):
            return sorted(os.listdir(where))

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self._abs(path)).st_mode)
        except OSError:
            return False

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._abs(path))

    def mtime(self, path: str) -> float:
        where = self._abs(path)
        with _mapped("stat", where, FileNotFoundError):
            return os.lstat(where).st_mtime

    # -- removing --------------------------------------------------------------------------------------------
    def remove_file(self, path: str) -> None:
        where = self._abs(path)
        with _mapped("remove", where), contextlib.suppress(FileNotFoundError):
            os.unlink(where)

    def remove_tree(self, path: str) -> None:
        where = self._abs(path)
        with _mapped("remove", where):
            try:
                mode = os.lstat(where).st_mode
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(mode):
                os.unlink(where)
                return
            _remove_tree(where)

    def remove_empty_dir(self, path: str) -> bool:
        where = self._abs(path)
        try:
            os.rmdir(where)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                return False
            with _mapped("remove", where):
                raise
        return True

    # -- liveness of save attempts ---------------------------------------------------------------------------
    def lock_attempt(self, path: str) -> _LocalLock:
        where = self._abs(path)
        with _mapped("create lock", where, FileExistsError, FileNotFoundError):
            for _ in range(100):
                fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                # a collector may have reaped the file between create and flock: then make a new one
                if _same_file(fd, where):
                    return _LocalLock(where, fd)
                os.close(fd)
            raise StorageError(f"cannot hold the lock {where}", errno=errno.EAGAIN, path=where)

    def try_lock_attempt(self, path: str) -> _LocalLock | None:
        where = self._abs(path)
        with _mapped("open lock", where, FileNotFoundError):
            fd = os.open(where, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if not _same_file(fd, where):
                os.close(fd)
                return None
            return _LocalLock(where, fd)


def _open_at(name: str, flags: int, dir_fd: int, where: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeCheckpointError(
                f"refusing to follow a symlink or non-directory at {where}", path=where
            ) from err
        raise


def _remove_tree(top: str) -> None:
    """Remove a directory tree bottom-up without following links; entries removed concurrently are fine."""
    for directory, subdirs, files in os.walk(top, topdown=False, followlinks=False):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
        for name in subdirs:
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path) if os.path.islink(path) else os.rmdir(path)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(top)
