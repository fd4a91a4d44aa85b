"""LocalStorage.range_files: ranged reads through one descriptor per file, held until closed, then none."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from safepoint._errors import StorageError, UnsafeCheckpointError
from safepoint._storage import LocalStorage
from tests.conftest import open_files


def _held(root: Path) -> list[str]:
    """The files below ``root`` this process holds open."""
    return sorted(
        os.path.relpath(target, root)
        for target in open_files()
        if target.startswith(str(root)) and os.path.isfile(target)
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "a.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "step" / "b.bin").write_bytes(b"b" * 100)
    return tmp_path


def _read(files: object, path: str, offset: int, size: int) -> bytes:
    buffer = bytearray(size)
    files.read_range(path, offset, memoryview(buffer))  # type: ignore[attr-defined]
    return bytes(buffer)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_each_file_is_opened_once_and_closed_at_the_end(root: Path) -> None:
    files = LocalStorage(str(root)).range_files()
    assert _read(files, "step/a.bin", 10, 4) == bytes([10, 11, 12, 13])
    assert _read(files, "step/a.bin", 256 + 255, 2) == bytes([255, 0])
    assert _read(files, "step/b.bin", 98, 2) == b"bb"
    assert _held(root) == ["step/a.bin", "step/b.bin"]  # one each, however many ranges were read
    files.close()
    assert _held(root) == []
    # a read after the close still reads, and holds nothing
    assert _read(files, "step/a.bin", 1, 1) == bytes([1])
    assert _held(root) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_failed_reads_hold_nothing_after_the_close(root: Path) -> None:
    files = LocalStorage(str(root)).range_files()
    with pytest.raises(FileNotFoundError):
        _read(files, "step/missing.bin", 0, 1)
    with pytest.raises(StorageError, match=r"b\.bin ended early at byte 100"):
        _read(files, "step/b.bin", 90, 20)
    files.close()
    assert _held(root) == []


def test_a_symlink_is_refused_as_by_every_other_read(root: Path) -> None:
    os.symlink(root / "step" / "b.bin", root / "step" / "link.bin")
    files = LocalStorage(str(root)).range_files()
    try:
        with pytest.raises(UnsafeCheckpointError, match="symlink"):
            _read(files, "step/link.bin", 0, 1)
    finally:
        files.close()


def _cached(path: Path, offset: int, size: int) -> bool:
    """Whether the file's bytes are all in the page cache: a read that may not wait for the device gets them all."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(size)], offset, os.RWF_NOWAIT) == size
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.skipif(
    not hasattr(os, "splice") or not hasattr(os, "RWF_NOWAIT") or not os.path.isdir("/proc/self/fd"),
    reason="needs Linux (splice, RWF_NOWAIT, /proc/self/fd)",
)
def test_a_prefetched_range_is_in_the_page_cache_and_the_prefetching_ends_with_the_files(tmp_path: Path) -> None:
    (tmp_path / "step").mkdir()
    data = os.urandom(3 << 20)
    target = tmp_path / "step" / "big.bin"
    target.write_bytes(data)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: nothing of it in the page cache
    finally:
        os.close(fd)
    before = set(os.listdir("/proc/self/fd"))
    files = LocalStorage(str(tmp_path)).range_files()
    files.prefetch_range("step/big.bin", 4096, 1 << 20)  # type: ignore[attr-defined]
    files.prefetch_range("step/missing.bin", 0, 10)  # type: ignore[attr-defined]  # a hint: no error
    files.prefetch_range("step/big.bin", (3 << 20) - 10, 1000)  # type: ignore[attr-defined]  # past the end
    assert _read(files, "step/big.bin", 4096 + 7, 100) == data[4096 + 7 : 4096 + 107]
    files.close()  # waits for the prefetching thread, which had the hints queued before
    assert _cached(target, 4096, 1 << 20)
    assert set(os.listdir("/proc/self/fd")) == before  # the file, the pipe and /dev/null are closed
    assert not any(t.name == "safepoint-prefetch" for t in threading.enumerate())
