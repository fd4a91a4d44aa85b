"""The Storage protocol, as every backend must implement it: local, memory:// and S3 (moto on loopback).

Where backends legitimately differ (directories are real locally and implicit on object stores; a dead writer's
lock is free at once locally and after the grace period on object stores), the test says which behaviour it
expects of which kind, and checks both.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import xxhash

from safepoint._errors import StorageError, UnsafeCheckpointError
from safepoint._storage import Storage, open_storage
from safepoint._storage.base import HeldRangeReads, RangeReads, SequentialReads

from .conftest import Backend, S3Server


def put(storage: Storage, path: str, data: bytes) -> None:
    parent = path.rpartition("/")[0]
    storage.ensure_dir(parent)
    sink = storage.create(path)
    sink.write(memoryview(data))
    sink.finish()


class _Hasher:
    def __init__(self) -> None:
        self.state = xxhash.xxh3_64()

    def update(self, data: memoryview) -> None:
        self.state.update(data)


# -- writing -----------------------------------------------------------------------------------------------------
def test_create_writes_the_bytes_and_refuses_an_existing_name(backend: Backend) -> None:
    storage = backend.open()
    data = bytes(range(256)) * 1000
    put(storage, "a/b/file.bin", data)
    assert storage.read_bytes("a/b/file.bin", len(data)) == data
    assert storage.size("a/b/file.bin") == len(data)
    with pytest.raises(FileExistsError):  # refused when created, or at the latest when the upload completes
        sink = storage.create("a/b/file.bin")
        sink.write(memoryview(b"other"))
        try:
            sink.finish()
        finally:
            sink.abort()
    assert storage.read_bytes("a/b/file.bin", len(data)) == data


def test_a_sink_written_in_many_pieces_keeps_their_order(backend: Backend) -> None:
    storage = backend.open()
    storage.ensure_dir("d")
    sink = storage.create("d/pieces")
    pieces = [bytes([i]) * (i * 1000 + 1) for i in range(20)]
    for piece in pieces:
        sink.write(memoryview(piece))
    sink.finish()
    assert storage.read_bytes("d/pieces", 1 << 20) == b"".join(pieces)


def test_an_aborted_sink_publishes_nothing_and_can_be_aborted_twice(backend: Backend) -> None:
    storage = backend.open()
    storage.ensure_dir("d")
    sink = storage.create("d/partial")
    sink.write(memoryview(b"x" * 1000))
    sink.abort()
    sink.abort()
    if backend.flat:  # object stores drop the upload; locally the file stays for the attempt's cleanup
        assert not storage.exists("d/partial")


def test_publish_gives_the_target_the_source_bytes_and_refuses_an_existing_target(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "ckpt/attempt1/manifest.json", b"first")
    put(storage, "ckpt/attempt2/manifest.json", b"second")
    storage.publish("ckpt/attempt1/manifest.json", "ckpt/manifest.json")
    with pytest.raises(FileExistsError):
        storage.publish("ckpt/attempt2/manifest.json", "ckpt/manifest.json")
    assert storage.read_bytes("ckpt/manifest.json", 100) == b"first"


def race_to_publish(storage: Storage, prefix: str, writers: int) -> int:
    """Stage one manifest per writer, let them all publish to the same name at once; the winner's index."""
    for index in range(writers):
        put(storage, f"{prefix}/a{index}/manifest.json", f"writer {index}".encode())
    start = threading.Barrier(writers)
    outcomes: list[str] = [""] * writers

    def publish(index: int) -> None:
        start.wait()
        try:
            storage.publish(f"{prefix}/a{index}/manifest.json", f"{prefix}/manifest.json")
            outcomes[index] = "won"
        except FileExistsError:
            outcomes[index] = "refused"

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * (writers - 1) + ["won"]
    winner = outcomes.index("won")
    assert storage.read_bytes(f"{prefix}/manifest.json", 100) == f"writer {winner}".encode()
    return winner


def test_publish_is_exclusive_under_concurrent_writers(backend: Backend) -> None:
    storage = backend.open()
    winners = {race_to_publish(storage, f"c{rounds}", writers=8) for rounds in range(3)}
    assert winners <= set(range(8))


def test_publish_of_a_missing_source_is_an_error_and_publishes_nothing(backend: Backend) -> None:
    storage = backend.open()
    storage.ensure_dir("ckpt")
    with pytest.raises((FileNotFoundError, StorageError)):
        storage.publish("ckpt/gone/manifest.json", "ckpt/manifest.json")
    assert not storage.exists("ckpt/manifest.json")


# -- reading -----------------------------------------------------------------------------------------------------
def test_read_into_fills_the_buffer_and_feeds_the_hasher(backend: Backend) -> None:
    storage = backend.open()
    data = bytes(range(251)) * 4099
    put(storage, "f.bin", data)
    buffer = bytearray(len(data))
    hasher = _Hasher()
    storage.read_into("f.bin", memoryview(buffer), hasher)
    assert bytes(buffer) == data
    assert hasher.state.hexdigest() == xxhash.xxh3_64(data).hexdigest()
    prefix = bytearray(1000)
    storage.read_into("f.bin", memoryview(prefix), None)
    assert bytes(prefix) == data[:1000]


def test_read_into_a_buffer_longer_than_the_file_is_an_eio(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "short.bin", b"12345")
    with pytest.raises(StorageError) as caught:
        storage.read_into("short.bin", memoryview(bytearray(10)), None)
    assert caught.value.errno == errno.EIO
    assert "short.bin" in str(caught.value)


def test_read_range_reads_the_bytes_at_an_offset(backend: Backend) -> None:
    # what a resharding restore reads of a sharded tensor's box: a byte range, never the whole file
    storage = backend.open()
    assert isinstance(storage, RangeReads)
    data = bytes(range(251)) * 4099
    put(storage, "f.bin", data)
    for offset, size in [(0, 10), (12345, 100_000), (len(data) - 7, 7), (5, 0)]:
        buffer = bytearray(size)
        storage.read_range("f.bin", offset, memoryview(buffer))
        assert bytes(buffer) == data[offset : offset + size], (offset, size)
    with pytest.raises(StorageError) as caught:
        storage.read_range("f.bin", len(data) - 3, memoryview(bytearray(10)))
    assert caught.value.errno == errno.EIO
    assert "f.bin" in str(caught.value)


def test_a_reader_fills_many_buffers_in_turn(backend: Backend) -> None:
    # the payload reader's scatter read: each value straight into its own memory, in file order
    storage = backend.open()
    assert isinstance(storage, SequentialReads)
    data = bytes(range(251)) * 4099
    put(storage, "f.bin", data)
    sizes = [0, 1, 7, 4096, 100_000, 3]
    sizes.append(len(data) - sum(sizes) - 10)
    sizes.append(10)
    buffers = [bytearray(n) for n in sizes]
    reader = storage.open_reader("f.bin")
    try:
        reader.readinto([memoryview(b) for b in buffers[:3]])
        reader.readinto([memoryview(b) for b in buffers[3:]])
    finally:
        reader.close()
    assert b"".join(buffers) == data


def test_a_reader_past_the_end_is_an_eio(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "short.bin", b"12345")
    assert isinstance(storage, SequentialReads)
    reader = storage.open_reader("short.bin")
    try:
        with pytest.raises(StorageError) as caught:
            reader.readinto([memoryview(bytearray(3)), memoryview(bytearray(3))])
    finally:
        reader.close()
    assert caught.value.errno == errno.EIO
    assert "short.bin" in str(caught.value)


def test_a_reader_of_a_missing_name_is_a_file_not_found_error(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "present", b"p")
    assert isinstance(storage, SequentialReads)
    with pytest.raises(FileNotFoundError):
        storage.open_reader("absent")


def test_read_bytes_refuses_a_file_over_the_limit_before_reading_it(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "hundred", b"h" * 100)
    assert storage.read_bytes("hundred", 100) == b"h" * 100
    with pytest.raises(UnsafeCheckpointError, match="over the limit of 99"):
        storage.read_bytes("hundred", 99)


@pytest.mark.parametrize("operation", ["size", "read_bytes", "read_into", "listdir", "mtime", "try_lock_attempt"])
def test_a_missing_name_is_a_file_not_found_error(backend: Backend, operation: str) -> None:
    storage = backend.open()
    put(storage, "present", b"p")
    calls = {
        "size": lambda: storage.size("absent"),
        "read_bytes": lambda: storage.read_bytes("absent", 10),
        "read_into": lambda: storage.read_into("absent", memoryview(bytearray(1)), None),
        "listdir": lambda: storage.listdir("absent"),
        "mtime": lambda: storage.mtime("absent"),
        "try_lock_attempt": lambda: storage.try_lock_attempt("absent.lock"),
    }
    with pytest.raises(FileNotFoundError):
        calls[operation]()


def test_listdir_names_files_and_directories_once_sorted(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "d/b.txt", b"b")
    put(storage, "d/a.txt", b"a")
    put(storage, "d/sub/x", b"x")
    put(storage, "d/sub/y", b"y")
    put(storage, "dd/z", b"z")  # a sibling whose name extends "d"
    assert storage.listdir("d") == ["a.txt", "b.txt", "sub"]
    assert storage.listdir("d/sub") == ["x", "y"]
    assert storage.listdir("") == ["d", "dd"]


def test_listdir_of_a_file_is_a_storage_error(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "d/file", b"f")
    with pytest.raises(StorageError):
        storage.listdir("d/file")


def test_exists_and_is_dir_tell_files_directories_and_nothing_apart(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "d/file", b"f")
    assert storage.exists("d/file")
    assert not storage.is_dir("d/file")
    assert storage.exists("d")
    assert storage.is_dir("d")
    assert not storage.exists("d/none")
    assert not storage.is_dir("d/none")
    assert not storage.exists("d/fil")  # a prefix is not a name
    assert not storage.is_dir("d/fil")
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        storage.size("d")


def test_mtime_is_the_time_of_the_write(backend: Backend) -> None:
    storage = backend.open()
    before = time.time()
    put(storage, "stamped", b"s")
    # object stores may keep whole seconds only
    assert before - 1.5 <= storage.mtime("stamped") <= time.time() + 1.5


def test_describe_names_the_location(backend: Backend) -> None:
    storage = backend.open()
    where = storage.describe("d/file")
    assert where.endswith("/d/file")
    assert backend.location.split("://")[-1].strip("/") in where
    if backend.flat:
        assert where.startswith(f"{backend.kind}://")


# -- removing ----------------------------------------------------------------------------------------------------
def test_remove_file_removes_one_name_and_a_missing_one_is_fine(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "d/one", b"1")
    put(storage, "d/two", b"2")
    storage.remove_file("d/one")
    storage.remove_file("d/one")
    storage.remove_file("d/never")
    assert storage.listdir("d") == ["two"]


def test_remove_tree_removes_everything_below_and_nothing_beside(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "ckpt/abc/x", b"x")
    put(storage, "ckpt/abc/deep/y", b"y")
    put(storage, "ckpt/abcd/keep", b"k")  # shares the prefix "abc" as a string: must survive
    put(storage, "ckpt/abc.lock", b"l")
    storage.remove_tree("ckpt/abc")
    storage.remove_tree("ckpt/abc")
    storage.remove_tree("ckpt/never")
    assert storage.listdir("ckpt") == ["abc.lock", "abcd"]
    assert storage.read_bytes("ckpt/abcd/keep", 10) == b"k"


def test_remove_empty_dir_never_removes_content(backend: Backend) -> None:
    storage = backend.open()
    put(storage, "ckpt/file", b"f")
    assert storage.remove_empty_dir("ckpt") is False
    assert storage.read_bytes("ckpt/file", 10) == b"f"
    storage.remove_file("ckpt/file")
    removed = storage.remove_empty_dir("ckpt")
    assert not storage.exists("ckpt")
    # a directory is a thing of its own locally; on object stores the prefix went with its last object
    assert removed is (not backend.flat)
    assert storage.remove_empty_dir("ckpt") is False


# -- liveness of save attempts -----------------------------------------------------------------------------------
def test_an_attempt_lock_is_exclusive_and_live_while_held(backend: Backend) -> None:
    storage = backend.open()
    storage.ensure_dir("ckpt")
    lock = storage.lock_attempt("ckpt/a.lock")
    try:
        with pytest.raises(FileExistsError):
            storage.lock_attempt("ckpt/a.lock")
        assert storage.try_lock_attempt("ckpt/a.lock") is None
        assert storage.exists("ckpt/a.lock")
    finally:
        lock.release(remove=True)
    assert not storage.exists("ckpt/a.lock")
    with pytest.raises(FileNotFoundError):
        storage.try_lock_attempt("ckpt/a.lock")


def test_a_dead_writers_lock_is_free_locally_at_once_and_on_object_stores_after_the_grace_period(
    backend: Backend,
) -> None:
    writer = backend.open(grace_period=3600)
    writer.ensure_dir("ckpt")
    lock = writer.lock_attempt("ckpt/a.lock")
    lock.release(remove=False)  # what the writer's death leaves: the lock file, nobody refreshing or holding it
    patient = backend.open(grace_period=3600)
    if backend.flat:
        assert patient.try_lock_attempt("ckpt/a.lock") is None
        time.sleep(1.1)
        taken = backend.open(grace_period=1).try_lock_attempt("ckpt/a.lock")
    else:
        taken = patient.try_lock_attempt("ckpt/a.lock")
    assert taken is not None
    taken.release(remove=True)
    assert not writer.exists("ckpt/a.lock")


def test_a_live_writer_keeps_its_lock_fresh_past_the_grace_period(object_backend: Backend) -> None:
    grace = 3.0 if object_backend.kind == "s3" else 1.0  # S3 keeps whole seconds of LastModified
    storage = object_backend.open(grace_period=grace)
    lock = storage.lock_attempt("held.lock")
    try:
        deadline = time.monotonic() + grace * 1.7  # past the grace period: only refreshing keeps it live
        while time.monotonic() < deadline:
            assert storage.try_lock_attempt("held.lock") is None
            time.sleep(grace / 5)
    finally:
        lock.release(remove=True)
    assert not storage.exists("held.lock")


def test_range_files_read_what_read_range_reads(backend: Backend) -> None:
    # a resharding restore's reads: many ranges of few files, through files held until the restore ends
    storage = backend.open()
    assert isinstance(storage, HeldRangeReads)
    data = bytes(range(251)) * 4099
    put(storage, "f.bin", data)
    put(storage, "g.bin", b"g" * 100)
    files = storage.range_files()
    try:
        for path, content, offset, size in [("f.bin", data, 12345, 1000), ("g.bin", b"g" * 100, 98, 2),
                                            ("f.bin", data, len(data) - 7, 7), ("f.bin", data, 0, 0)]:  # fmt: skip
            buffer = bytearray(size)
            files.read_range(path, offset, memoryview(buffer))
            assert bytes(buffer) == content[offset : offset + size], (path, offset, size)
        with pytest.raises(StorageError) as caught:
            files.read_range("f.bin", len(data) - 3, memoryview(bytearray(10)))
        assert caught.value.errno == errno.EIO
        assert "f.bin" in str(caught.value)
        with pytest.raises(FileNotFoundError):
            files.read_range("missing.bin", 0, memoryview(bytearray(1)))
    finally:
        files.close()
    buffer = bytearray(3)  # a read after the close still reads
    files.read_range("f.bin", 251, memoryview(buffer))
    assert bytes(buffer) == bytes([0, 1, 2])


def test_range_files_on_s3_ask_each_objects_size_once(s3_server: S3Server, s3_url: Callable[[], str]) -> None:
    # each size is a HEAD request of its own in front of the ranged GET; counted on the real client's events
    storage = open_storage(s3_url(), s3_server.options)
    put(storage, "f.bin", bytes(range(256)) * 64)
    put(storage, "g.bin", bytes(100))
    heads: list[str] = []
    client = storage.fs.s3  # type: ignore[attr-defined]

    def count(**event: Any) -> None:
        heads.append(event["params"]["url_path"])

    client.meta.events.register("before-call.s3.HeadObject", count)
    files = storage.range_files()  # type: ignore[attr-defined]
    try:
        for offset in range(0, 16384, 1024):
            files.read_range("f.bin", offset, memoryview(bytearray(1024)))
        files.read_range("g.bin", 10, memoryview(bytearray(10)))
    finally:
        files.close()
    assert sorted(key.rpartition("/")[2] for key in heads) == ["f.bin", "g.bin"]
