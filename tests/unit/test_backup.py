"""InPlace and TensorBackups: live tensors written in place behind backups, put back bitwise on any failure
(safepoint._backup)."""

from __future__ import annotations

import _thread
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from safepoint._backup import SLICE_BYTES, SPILL_MIN_BYTES, InPlace, Ready, Spill, TensorBackups, writable
from safepoint._errors import RestoreError, StorageError
from tests.conftest import open_files

needs_spill = pytest.mark.skipif(
    not Spill.available() or not os.path.isdir("/proc/self/fd"), reason="needs memfd_create and /proc/self/fd"
)


def _fill(tensor: torch.Tensor, value: float, *, fail: BaseException | None = None) -> Callable[[Ready], None]:
    """A write that fills ``tensor`` region by region (first half, then second half), then raises ``fail``."""

    def write(ready: Ready) -> None:
        flat = tensor.view(-1)
        for region in (flat[: flat.numel() // 2], flat[flat.numel() // 2 :]):
            ready(region)
            region.fill_(value)
        if fail is not None:
            raise fail

    return write


def test_a_failed_write_puts_every_target_back_bitwise_and_the_error_propagates() -> None:
    first = torch.randn(3 * SLICE_BYTES // 4 + 5)  # several backup slices, the last partial
    second = torch.randn(17, 3)
    originals = (first.clone(), second.clone())
    writes = InPlace()
    writes.add("first", first, _fill(first, 1.0))
    writes.add("second", second, _fill(second, 2.0, fail=ValueError("corrupt box")))
    with pytest.raises(ValueError, match="corrupt box"):
        writes.run()
    assert torch.equal(first.view(torch.int32), originals[0].view(torch.int32))
    assert torch.equal(second.view(torch.int32), originals[1].view(torch.int32))
    assert len(writes.backups) == 0  # the backups are dropped


def test_restore_after_a_successful_run_puts_the_values_back_and_release_keeps_them() -> None:
    kept, undone = torch.arange(10.0), torch.arange(10.0)
    for tensor, keep in ((kept, True), (undone, False)):
        writes = InPlace()
        writes.add("tensor", tensor, _fill(tensor, 7.0))
        writes.run()
        assert torch.equal(tensor, torch.full((10,), 7.0))  # written in place
        if keep:
            writes.backups.discard()
        else:
            writes.backups.roll_back(None)  # another rank failed: put back
        writes.backups.roll_back(None)  # nothing left to put back: a no-op
    assert torch.equal(kept, torch.full((10,), 7.0))
    assert torch.equal(undone, torch.arange(10.0))


def test_a_tensor_written_twice_comes_back_with_its_first_values() -> None:
    tensor = torch.randn(2 * SLICE_BYTES // 4)
    original = tensor.clone()
    writes = InPlace()
    writes.add("tensor", tensor, _fill(tensor, 1.0))
    writes.add("tensor", tensor, _fill(tensor, 2.0, fail=ValueError("later")))  # the same memory (tied weights)
    with pytest.raises(ValueError, match="later"):
        writes.run()
    assert torch.equal(tensor.view(torch.int32), original.view(torch.int32))


def test_a_failure_to_put_back_is_a_note_on_the_original_error_never_instead_of_it() -> None:
    tensor = torch.randn(64)

    def write(ready: Ready) -> None:
        ready(tensor)
        tensor.fill_(3.0)
        tensor.untyped_storage().resize_(0)  # the memory is gone: copying the backup back must fail
        raise ValueError("the original failure")

    writes = InPlace()
    writes.add("tensor", tensor, write)
    with pytest.raises(ValueError, match="the original failure") as caught:
        writes.run()
    notes = getattr(caught.value, "__notes__", [])
    assert any("putting back 'tensor'" in note and "do not train on it" in note for note in notes), notes


def test_a_failure_to_put_back_without_an_error_is_a_restore_error() -> None:
    tensor = torch.randn(64)
    writes = InPlace()
    writes.add("tensor", tensor, _fill(tensor, 5.0))
    writes.run()
    tensor.untyped_storage().resize_(0)
    with pytest.raises(RestoreError, match="putting back 'tensor'"):
        writes.backups.roll_back(None)


def test_only_plain_dense_contiguous_cpu_tensors_of_the_saved_dtype_are_written_in_place() -> None:
    plain = torch.zeros(4, 3)
    assert writable(plain, torch.float32)
    assert writable(torch.nn.Parameter(plain), torch.float32)
    assert not writable(plain, torch.float64)  # a cast: through a staging tensor
    assert not writable(plain.t(), torch.float32)  # not contiguous
    assert not writable(torch.zeros(0, 3), torch.float32)
    assert not writable(torch.zeros(4, 3, dtype=torch.complex64).conj(), torch.complex64)
    assert not writable(plain.to_sparse(), torch.float32)


def test_memory_two_backups_share_is_kept_by_both_before_either_writes_it() -> None:
    """Two live tensors over overlapping memory: a write through one must not reach the other's backup before that
    backup has kept those bytes, even when its keeper runs late (here: after the write)."""
    base = torch.arange(64, dtype=torch.int32)
    first, second = base[:48], base[16:]  # bytes 64..192 belong to both
    backups = TensorBackups()
    early = backups.keep("first", first, ahead=False)
    late = backups.keep("second", second, ahead=False)
    early.keep_to(32)
    first[:8] = -1  # the first tensor's writer wrote only its first 8 values
    late.keep_to(late.nbytes)
    second.fill_(-2)  # the second's writer wrote all of it, over bytes the first's keeper had not reached
    early._keep_ahead()  # the first's keeper, late
    backups.roll_back(RuntimeError("a later failure"))
    assert base.tolist() == list(range(64))


def test_a_backup_kept_by_the_keeper_thread_is_put_back_bitwise() -> None:
    tensor = torch.randn(3 * SLICE_BYTES // 4)
    original = tensor.clone()
    backups = TensorBackups()
    backup = backups.keep("t", tensor)  # ahead: the keeper copies it while nothing waits
    backup.keep_to(SLICE_BYTES)
    tensor.view(-1)[: SLICE_BYTES // 4].fill_(3.0)
    backups.roll_back(RuntimeError("x"))
    assert torch.equal(tensor.view(torch.int32), original.view(torch.int32))
    assert len(backups) == 0


def _spills() -> list[str]:
    """The backup memory files this process holds open."""
    return [target for target in open_files() if "safepoint-backup" in target]


@needs_spill
def test_large_backups_share_one_memory_file_which_is_closed_with_them() -> None:
    tensors = [torch.randn(SPILL_MIN_BYTES // 4 + 7 * i) for i in range(3)]  # three large, of odd sizes
    small = torch.randn(100)  # below SPILL_MIN_BYTES: a tensor of its own
    originals = [t.clone() for t in [*tensors, small]]
    seen: list[list[str]] = []

    def check(ready: Ready) -> None:
        ready(small)
        seen.append(_spills())
        raise ValueError("a later box is corrupt")

    writes = InPlace()
    for index, tensor in enumerate(tensors):
        writes.add(f"t{index}", tensor, _fill(tensor, float(index)))
    writes.add("small", small, check)
    with pytest.raises(ValueError, match="later box"):
        writes.run()
    assert len(seen[0]) == 1  # one memory file for all three, while they are kept
    assert _spills() == []  # closed once they are put back
    for tensor, original in zip([*tensors, small], originals, strict=True):
        assert torch.equal(tensor.view(torch.int32), original.view(torch.int32))
    tensor = tensors[0]
    writes = InPlace()
    writes.add("t0", tensor, _fill(tensor, 9.0))
    writes.run()
    writes.backups.discard()  # a complete restore: the writes stay, the file goes (closed on a thread of its own)
    deadline = time.monotonic() + 5
    while _spills() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _spills() == []
    assert torch.equal(tensor, torch.full_like(tensor, 9.0))


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int], None]]:
    """Sets RLIMIT_FSIZE (a write past it fails with EFBIG, SIGXFSZ ignored) until the test ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@needs_spill
def test_bytes_the_system_cannot_keep_are_a_storage_error_before_anything_is_written(
    file_size_limit: Callable[[int], None],
) -> None:
    """The memory file refuses the backup's bytes past 2 MiB (a real failed write, EFBIG, standing for a system
    out of memory): the write that needs them fails with StorageError before it writes them, and every tensor
    is put back."""
    first = torch.randn(SPILL_MIN_BYTES // 4)  # fits below the limit
    second = torch.randn(3 * SPILL_MIN_BYTES // 4)  # the limit falls inside it
    originals = (first.clone(), second.clone())
    writes = InPlace()
    writes.add("first", first, _fill(first, 1.0))
    writes.add("second", second, _fill(second, 2.0))
    file_size_limit(2 * SPILL_MIN_BYTES)
    with pytest.raises(StorageError, match="cannot keep the bytes of 'second'"):
        writes.run()
    assert torch.equal(first.view(torch.int32), originals[0].view(torch.int32))
    assert torch.equal(second.view(torch.int32), originals[1].view(torch.int32))
    assert _spills() == []


def test_discard_returns_at_once_and_the_keeper_stops_then_the_memory_goes_on_a_thread() -> None:
    """A complete restore's caller does not wait for the keeper thread to stop (waking it took 1-10 ms of a 0.15 s
    restore): here the keeper is held before it reaches a backup, and discard returns all the same; once let go,
    the keeper skips that backup (it is stopped), and only then is the backups' memory file closed (never while
    the keeper may still write into it)."""
    gate = threading.Event()
    backups = TensorBackups()
    backups.keep("first", torch.ones(SPILL_MIN_BYTES // 4))  # starts the keeper
    assert backups._keeper is not None
    backups._keeper.submit(gate.wait, 10)  # the keeper is held here, before it reaches the next backup
    backup = backups.keep("t", torch.ones(4 * SLICE_BYTES // 4))
    try:
        discarding = threading.Thread(target=backups.discard)
        discarding.start()
        discarding.join(timeout=1.0)
        assert not discarding.is_alive()
        assert any(t.name.startswith("safepoint-keep") for t in threading.enumerate())  # still held
        if Spill.available():
            assert len(_spills()) == 1  # not closed under a keeper that may still write into it
    finally:
        gate.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        _spills() or any(t.name.startswith("safepoint-keep") for t in threading.enumerate())
    ):
        time.sleep(0.01)
    assert _spills() == []
    assert not any(t.name.startswith("safepoint-keep") for t in threading.enumerate())
    assert backup.kept == 0  # stopped before it began: nothing copied for a restore that is complete


def test_discard_without_a_thread_to_be_had_stops_and_frees_on_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no thread can be started (a process at its thread limit), the restore is still complete: the keeper
    is stopped and the memory freed on the caller's thread, and discard raises nothing."""

    def no_thread(*args: object) -> int:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_thread, "start_new_thread", no_thread)
    backups = TensorBackups()
    backups.keep("t", torch.ones(2 * SPILL_MIN_BYTES // 4))
    backups.discard()
    assert _spills() == []
    assert not any(t.name.startswith("safepoint-keep") for t in threading.enumerate())
