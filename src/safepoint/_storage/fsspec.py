"""The fsspec backend: checkpoints on object stores (``s3://``, ``gs://``, ...) and in ``memory://``.

Atomicity without rename: payload objects go under the attempt's unique save id, where no reader looks, and a
checkpoint becomes visible when its manifest object is created with an *exclusive* write. On S3 that is a
``PutObject`` with ``If-None-Match: *`` (s3fs ``pipe_file(..., mode="create")``): the store refuses it when the
step is committed, which the caller turns into :class:`~safepoint._errors.CheckpointExistsError`. ``memory://``
(tests) is made exclusive by a process-wide lock, since its own check is not atomic. Other fsspec backends are
as exclusive as their ``pipe_file(mode="create")``.

Durability: an object exists only once its write completed, and then it is durable; there are no directories
to sync, so :meth:`FsspecStorage.sync_dir` does nothing. Directories are implicit: a prefix exists while an
object lies under it. Listings are never cached: several processes write the same prefix.

Liveness of a save attempt: object stores have no ``flock``. The writer creates its lock object exclusively and
rewrites it every quarter of the grace period while it lives; a lock older than the grace period belongs to a
writer that is gone, and the collector may remove that attempt. A writer stalled for longer than the grace
period (a suspended process) can lose its attempt; its publication then fails because its staged manifest is
gone. Ages are measured against this machine's clock: keep the grace period far above any clock skew.

Every error of the backend (OSError from fsspec, botocore and aiohttp errors that escape it) is mapped to
:class:`~safepoint._errors.StorageError` with the cause kept, except the ``FileExistsError`` and
``FileNotFoundError`` outcomes that the :class:`~safepoint._storage.Storage` protocol documents.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._checksum import Hasher
from .._errors import StorageError, UnsafeCheckpointError, mapped_errors

__all__ = ["DEFAULT_GRACE_PERIOD", "FsspecStorage"]

logger = logging.getLogger("safepoint")

#: Seconds an attempt's lock may go unrefreshed before the collector treats its writer as gone.
DEFAULT_GRACE_PERIOD = 3600.0
#: Object stores without directories; buckets (the first path component) are never created by safepoint.
_FLAT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
_NO_BUCKETS = frozenset({"memory"})
#: Backends whose open(mode="xb") refuses an existing name without a request of its own.
_EXCLUSIVE_OPEN = frozenset({"s3", "s3a", "memory"})
#: Payload objects are cut at about this size on object stores, so that the writer threads upload several at once
#: (one 256 MiB object is one sequential upload); measured with benchmarks/bench_s3.py.
OBJECT_SHARD_BYTES = 32 << 20
_READ_CHUNK = 64 << 20
_LOCK_REFRESH_MIN = 0.1
# memory:// checks for an existing file and then writes, two steps: this makes them one for every writer in the
# process, which is every writer a memory:// store can have.
_MEMORY_CREATE = threading.Lock()


def _mapped(operation: str, where: str, *passthrough: type[BaseException]) -> contextlib.AbstractContextManager[None]:
    """Whatever the backend library raises (not only OSError) becomes a StorageError."""
    return mapped_errors(operation, where, *passthrough, catch=Exception)


class _ObjectSink:
    """A payload object being uploaded; it is only completed by :meth:`finish`."""

    def __init__(self, fs: Any, path: str, where: str, mode: str) -> None:
        self.where = where
        self.path = path
        self.fs = fs
        # closing completes the object (one PUT when small, a multipart upload when large); discard() drops it
        self.file: Any = fs.open(path, mode)

    def write(self, data: memoryview) -> None:
        assert self.file is not None, "write after finish/abort"
        with _mapped("write", self.where):
            self.file.write(data.cast("B") if data.format != "B" or data.ndim != 1 else data)

    def finish(self) -> None:
        assert self.file is not None, "finish after finish/abort"
        file, self.file = self.file, None
        with _mapped("complete the upload of", self.where, FileExistsError):
            file.close()

    def abort(self) -> None:
        if self.file is None:
            return
        file, self.file = self.file, None
        with contextlib.suppress(Exception):
            file.discard()
            file.forced = True  # closing must not upload the buffered rest of a discarded file
            file.close()
        with contextlib.suppress(Exception):
            if self.fs.exists(self.path):  # backends that make the file visible when it is opened (memory://)
                self.fs.rm_file(self.path)


class _ObjectReader:
    """An object read front to back in ranged requests of at most ``_READ_CHUNK`` bytes."""

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage, self.path, self.where = storage, path, storage.describe(path)
        self.size, self.position = storage.size(path), 0

    def readinto(self, buffers: Sequence[memoryview]) -> None:
        views = [b.cast("B") if b.format != "B" else b for b in buffers if b.nbytes]
        end = self.position + sum(v.nbytes for v in views)
        if end > self.size:  # a ranged read past the end is an error of its own on S3: say what it means
            raise StorageError(f"{self.where} ended early at byte {self.size}", errno=errno.EIO, path=self.where)
        first, filled = 0, 0  # the buffer being filled, and how much of it is
        with _mapped("read", self.where, FileNotFoundError):
            while self.position < end:  # one ranged request covers many small buffers
                stop = min(end, self.position + _READ_CHUNK)
                data = memoryview(self.storage.fs.cat_file(self.storage.abs(self.path), start=self.position, end=stop))
                if not data:
                    at = self.position
                    raise StorageError(f"{self.where} ended early at byte {at}", errno=errno.EIO, path=self.where)
                data = data[: stop - self.position]
                self.position += data.nbytes
                while data.nbytes:
                    count = min(data.nbytes, views[first].nbytes - filled)
                    views[first][filled : filled + count] = data[:count]
                    data, filled = data[count:], filled + count
                    if filled == views[first].nbytes:
                        first, filled = first + 1, 0

    def close(self) -> None:
        pass


class _KnownSizes:
    """Ranged reads that ask each object's size once until :meth:`close`. On an object store the size is a request
    of its own (a ``HEAD``) in front of each ranged ``GET``, and a resharding restore reads many ranges of few
    objects: 200 ranges of 16 KiB took 2.0 s against moto on loopback, 0.9 s of them asking the size again.
    The size only words the error of a range past the end; the ranged reads themselves still fail on a missing
    object, and the checksums judge the bytes."""

    def __init__(self, storage: FsspecStorage) -> None:
        self._storage = storage
        self._sizes: dict[str, int] | None = {}  # None once closed
        self._lock = threading.Lock()

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        with self._lock:
            size = None if self._sizes is None else self._sizes.get(path)
        if size is None:
            size = self._storage.size(path)
            with self._lock:
                if self._sizes is not None:
                    self._sizes[path] = size
        self._storage.read_range_of(path, size, offset, buffer)

    def close(self) -> None:
        with self._lock:
            self._sizes = None


class _ObjectLock:
    """An attempt's lock object; the writer's copy keeps it fresh from a daemon thread until released."""

    def __init__(self, storage: FsspecStorage, path: str, *, refresh: float | None) -> None:
        self.storage = storage
        self.path = path
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if refresh is not None:
            self.thread = threading.Thread(target=self._keep_fresh, args=(refresh,), name="safepoint-lock", daemon=True)
            self.thread.start()

    def _keep_fresh(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.storage.fs.pipe_file(self.storage.abs(self.path), _lock_body())
            except Exception as err:  # the save itself reports the store's trouble; this only delays collection
                logger.warning("could not refresh the lock %s: %s", self.storage.describe(self.path), err)

    def release(self, *, remove: bool) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if remove:
            self.storage.remove_file(self.path)


def _lock_body() -> bytes:
    # for people looking at a bucket: who holds the attempt. Liveness is the object's age, not this content.
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "written": time.time()}).encode()


class FsspecStorage:
    """Checkpoints under a URL of any fsspec file system; ``storage_options`` go to the file system unchanged.

    ``grace_period`` (seconds): how long an attempt's lock may go unrefreshed before its writer counts as gone.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        grace_period: float = DEFAULT_GRACE_PERIOD,
    ) -> None:
        import fsspec.core

        options = dict(storage_options or {})
        options.setdefault("use_listings_cache", False)  # other processes write the same prefixes
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.root: str = root.rstrip("/")
        self.flat = self.protocol in _FLAT
        self.grace_period = float(grace_period)
        self.shard_bytes: int | None = OBJECT_SHARD_BYTES if self.flat else None

    def abs(self, path: str) -> str:
        return "/".join(part for part in (self.root, path) if part)

    def describe(self, path: str) -> str:
        location = self.abs(path)
        return str(self.fs.unstrip_protocol(location)) if location else f"{self.protocol}://"

    # -- writing ---------------------------------------------------------------------------------------------
    def ensure_dir(self, path: str) -> bool:
        if not self.flat:
            where = self.abs(path)
            with _mapped("create directory", self.describe(path)):
                created = not self.fs.isdir(where)
                self.fs.makedirs(where, exist_ok=True)
                return bool(created)
        if not path and self.protocol not in _NO_BUCKETS:
            self._check_bucket()
        return False  # a prefix exists once an object is written under it

    def _check_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        where = f"{self.protocol}://{bucket}"
        with _mapped("reach the bucket", where, FileNotFoundError):
            try:
                self.fs.info(bucket)  # not exists(): that answers False to a refused connection or bad credentials
            except FileNotFoundError as err:
                raise StorageError(
                    f"the bucket {where} does not exist; safepoint never creates buckets",
                    errno=errno.ENOENT,
                    path=where,
                ) from err

    def create(self, path: str) -> _ObjectSink:
        where = self.describe(path)
        with _mapped("create", where, FileExistsError):
            if self.protocol in _EXCLUSIVE_OPEN:  # S3 checks when the upload completes (If-None-Match)
                return _ObjectSink(self.fs, self.abs(path), where, "xb")
            if self.fs.exists(self.abs(path)):  # names are unique per attempt: this only catches misuse
                raise FileExistsError(errno.EEXIST, "exists", where)
            return _ObjectSink(self.fs, self.abs(path), where, "wb")

    def _create_exclusive(self, path: str, data: bytes) -> None:
        """Write a whole object that must not exist: FileExistsError if it does, atomically."""
        where = self.abs(path)
        if self.protocol == "memory":
            with _MEMORY_CREATE:
                if self.fs.exists(where):
                    raise FileExistsError(errno.EEXIST, "exists", self.describe(path))
                self.fs.pipe_file(where, data)
        else:
            self.fs.pipe_file(where, data, mode="create")

    def publish(self, source: str, target: str) -> None:
        where = self.describe(target)
        try:
            data = self.read_bytes(source, self.size(source))
        except FileNotFoundError as err:
            raise StorageError(
                f"cannot publish {where}: the staged manifest {self.describe(source)} is gone; a collector "
                f"removed this attempt (did the save take longer than the grace period of {self.grace_period}s?)",
                errno=errno.ENOENT,
                path=where,
            ) from err
        with _mapped("publish", where, FileExistsError):
            try:
                self._create_exclusive(target, data)
            except FileExistsError:
                # a request retried after a lost reply is refused by our own first write: that one counts
                with contextlib.suppress(FileNotFoundError):
                    if self.fs.cat_file(self.abs(target)) == data:
                        return
                raise

    def sync_dir(self, path: str) -> None:
        """Nothing to do: a completed object write is durable, and there are no directory entries to sync."""

    # -- reading ---------------------------------------------------------------------------------------------
    def _info(self, path: str) -> dict[str, Any]:
        with _mapped("stat", self.describe(path), FileNotFoundError):
            info: dict[str, Any] = self.fs.info(self.abs(path))
            return info

    def size(self, path: str) -> int:
        info = self._info(path)
        if info.get("type") != "file":
            where = self.describe(path)
            raise UnsafeCheckpointError(f"{where} is not a regular file", path=where)
        return int(info["size"])

    def read_into(self, path: str, buffer: memoryview, hasher: Hasher | None) -> None:
        where = self.describe(path)
        view = buffer.cast("B") if buffer.format != "B" else buffer
        offset, total = 0, view.nbytes
        size = self.size(path)
        if size < total:  # a ranged read past the end is an error of its own on S3: say what it means
            raise StorageError(f"{where} ended early at byte {size}", errno=errno.EIO, path=where)
        with _mapped("read", where, FileNotFoundError):
            while offset < total:
                end = min(total, offset + _READ_CHUNK)
                data = self.fs.cat_file(self.abs(path), start=offset, end=end)
                if not data:
                    raise StorageError(f"{where} ended early at byte {offset}", errno=errno.EIO, path=where)
                count = min(len(data), end - offset)
                view[offset : offset + count] = data[:count]
                if hasher is not None:
                    hasher.update(view[offset : offset + count])
                offset += count

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the object's bytes from ``offset`` (ranged GETs); StorageError if it ends first."""
        self.read_range_of(path, self.size(path), offset, buffer)

    def range_files(self) -> _KnownSizes:
        return _KnownSizes(self)

    def read_range_of(self, path: str, size: int, offset: int, buffer: memoryview) -> None:
        """:meth:`read_range` of an object whose size is known to be ``size``."""
        where = self.describe(path)
        view = buffer.cast("B") if buffer.format != "B" else buffer
        done, total = 0, view.nbytes
        if size < offset + total:  # a ranged read past the end is an error of its own on S3: say what it means
            raise StorageError(f"{where} ended early at byte {size}", errno=errno.EIO, path=where)
        with _mapped("read", where, FileNotFoundError):
            while done < total:
                end = min(total, done + _READ_CHUNK)
                data = self.fs.cat_file(self.abs(path), start=offset + done, end=offset + end)
                if not data:
                    raise StorageError(f"{where} ended early at byte {offset + done}", errno=errno.EIO, path=where)
                count = min(len(data), end - done)
                view[done : done + count] = data[:count]
                done += count

    def open_reader(self, path: str) -> _ObjectReader:
        return _ObjectReader(self, path)

    def read_bytes(self, path: str, limit: int) -> bytes:
        where = self.describe(path)
        size = self.size(path)
        if size > limit:
            raise UnsafeCheckpointError(f"{where} is {size} bytes, over the limit of {limit}", path=where)
        with _mapped("read", where, FileNotFoundError):
            data = bytes(self.fs.cat_file(self.abs(path), start=0, end=limit + 1))
        if len(data) > limit:  # it grew since it was measured
            raise UnsafeCheckpointError(f"{where} is over the limit of {limit} bytes", path=where)
        return data

    def listdir(self, path: str) -> list[str]:
        where = self.abs(path)
        with _mapped("list", self.describe(path), FileNotFoundError):
            entries = self.fs.ls(where, detail=True)
        names = set()
        for entry in entries:
            name = str(entry["name"]).rstrip("/")
            if name == where.rstrip("/"):
                if entry.get("type") == "file":
                    raise StorageError(f"{self.describe(path)} is not a directory", errno=errno.ENOTDIR, path=where)
                continue  # a directory marker object
            names.add(name.rsplit("/", 1)[-1])
        return sorted(names)

    def is_dir(self, path: str) -> bool:
        try:
            return self._info(path).get("type") == "directory"
        except FileNotFoundError:
            return False

    def exists(self, path: str) -> bool:
        try:
            self._info(path)
        except FileNotFoundError:
            return False
        return True

    def mtime(self, path: str) -> float:
        with _mapped("stat", self.describe(path), FileNotFoundError):
            return float(self.fs.modified(self.abs(path)).timestamp())

    # -- removing --------------------------------------------------------------------------------------------
    def remove_file(self, path: str) -> None:
        with _mapped("remove", self.describe(path)), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.abs(path))

    def remove_tree(self, path: str) -> None:
        if not self.exists(path):
            return
        with _mapped("remove", self.describe(path)), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.abs(path), recursive=True)

    def remove_empty_dir(self, path: str) -> bool:
        """Remove an empty directory where the store keeps them (memory://, file systems); an object-store prefix
        vanishes with its last object, so there this returns False."""
        try:
            if self.listdir(path):
                return False
        except FileNotFoundError:
            return False
        with _mapped("remove", self.describe(path)), contextlib.suppress(FileNotFoundError):
            self.fs.rmdir(self.abs(path))
            return True
        return False

    # -- liveness of save attempts ---------------------------------------------------------------------------
    def lock_attempt(self, path: str) -> _ObjectLock:
        with _mapped("create lock", self.describe(path), FileExistsError):
            self._create_exclusive(path, _lock_body())
        refresh = max(_LOCK_REFRESH_MIN, self.grace_period / 4) if self.grace_period > 0 else None
        return _ObjectLock(self, path, refresh=refresh)

    def try_lock_attempt(self, path: str) -> _ObjectLock | None:
        age = time.time() - self.mtime(path)  # FileNotFoundError: no such lock
        if age < self.grace_period:
            return None
        return _ObjectLock(self, path, refresh=None)
