"""Backups of live tensors that a restore writes before it is complete, and putting them back.

A restore is total or nothing. Where it reads a checkpoint's bytes straight into a live tensor (no staging
buffer, no copy afterwards: a large plain tensor read from a local file, or a live DTensor's local shard), it first
keeps a copy of the tensor's bytes here. The copy is made slice by slice, in order, by one keeper thread that runs
ahead of the reads (the copy overlaps the reads' I/O), and a writer asks for the bytes it is about to overwrite
with :meth:`Backup.keep_to` or :meth:`Backup.ready`, which copy whatever the keeper has not reached yet: no byte is
written before it is kept. Until the restore is complete, any failure puts every written tensor back, bitwise,
before the error propagates (:meth:`TensorBackups.roll_back`); a success drops the backups
(:meth:`TensorBackups.discard`). This module only keeps and restores bytes: what may be written in place is
decided by the reader (:func:`safepoint._payload.direct_target`, :func:`writable`).
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd.graph import increment_version

from ._errors import RestoreError, StorageError, attach_note

__all__ = [
    "SLICE_BYTES",
    "SPILL_MIN_BYTES",
    "Backup",
    "InPlace",
    "Ready",
    "RunBackup",
    "Spill",
    "TensorBackups",
    "writable",
]

#: The keeper copies this many bytes at a time: a writer that overtakes it waits for at most one slice.
SLICE_BYTES = 4 << 20
#: Backups of tensors of at least this many bytes are kept in a memory file (:class:`Spill`) where the system has one.
SPILL_MIN_BYTES = 1 << 20

#: ``ready(region)``: returns once every byte of ``region`` (a view of a tensor being written) is kept.
Ready = Callable[[torch.Tensor], None]


def writable(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``tensor``'s memory can take a checkpoint's bytes of ``dtype`` as they are: a plain dense strided
    CPU tensor (or Parameter) of that dtype, contiguous, not a lazily conjugated or negated view, not empty."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.dtype == dtype
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.numel() > 0
    )


def _bytes_at(address: int, nbytes: int) -> memoryview:
    """The ``nbytes`` of memory at ``address`` (of a tensor the caller holds), as a writable byte view."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class Spill:
    """A memory file (``memfd_create``, Linux) holding the backups of one restore, each in its own page-aligned
    region. Writing a tensor's bytes into it costs about two thirds of copying them into fresh memory: a fresh
    allocation is zero-filled page by page on first touch (measured: 126 MiB in 0.090 s on this project's VM, 0.062 s
    into a memory file), and a restore keeps its live shards' bytes before reading into them, so this is per byte
    restored. The pages are freed when it is closed. ``available()`` is False where there is no ``memfd_create``:
    backups are then kept in fresh tensors."""

    def __init__(self) -> None:
        self.fd: int | None = os.memfd_create("safepoint-backup", os.MFD_CLOEXEC)
        self._end = 0
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return hasattr(os, "memfd_create")

    def reserve(self, nbytes: int) -> int:
        """The offset of a fresh region of ``nbytes`` (page aligned: no page is shared by two backups)."""
        with self._lock:
            at = self._end
            self._end += -(-nbytes // 4096) * 4096
        return at

    def write(self, at: int, address: int, nbytes: int, key: str) -> None:
        """Keep the ``nbytes`` at ``address`` at offset ``at``; StorageError if the system has no memory for them
        (nothing of the live tensor is written before its bytes are kept, so the restore can still roll back)."""
        fd = self.fd
        view = _bytes_at(address, nbytes)
        done = 0
        try:
            while done < nbytes:
                if fd is None:
                    raise OSError("the backup file is closed")
                done += os.pwrite(fd, view[done:], at + done)  # releases the interpreter
        except OSError as err:
            raise StorageError(f"cannot keep the bytes of {key!r} before reading into it: {err}") from err

    def read(self, at: int, address: int, nbytes: int) -> None:
        """Put ``nbytes`` kept at ``at`` back at ``address``."""
        if self.fd is None:
            raise RuntimeError("the backup file is closed")
        view = _bytes_at(address, nbytes)
        done = 0
        while done < nbytes:
            count = os.preadv(self.fd, [view[done:]], at + done)
            if count == 0:
                raise RuntimeError(f"the backup file ended at byte {at + done}")
            done += count

    def close(self) -> None:
        """Free the kept bytes."""
        with self._lock:
            fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class Backup:
    """The bytes of one live tensor from before the restore, copied aside in order up to :attr:`kept`: into
    ``spill`` where given, else into a tensor of its own."""

    def __init__(self, key: str, live: torch.Tensor, spill: Spill | None = None) -> None:
        self.key, self.live = key, live
        self.address, self.nbytes = live.data_ptr(), live.nbytes
        self._memory = live.detach().reshape(-1)  # holds the storage: the address stays valid while kept
        self._spill = spill
        self._at = spill.reserve(self.nbytes) if spill is not None else 0
        self.copy: torch.Tensor | None = None
        if spill is None:
            try:
                self.copy = torch.empty(self.nbytes, dtype=torch.uint8)
            except RuntimeError as err:
                raise StorageError(
                    f"cannot allocate {self.nbytes} bytes to keep {key!r} before reading into it"
                ) from err
        self.kept = 0
        self.overlapping: list[Backup] = []  # backups of other memory that shares bytes with this one's
        self._lock = threading.Lock()  # the keeper and a writer never copy the same bytes at once
        self._stopped = False

    def keep_to(self, end: int) -> None:
        """Before the live bytes up to ``end`` are written: copy them aside (at most the whole tensor), here and in
        every other backup of memory that overlaps them (a byte is kept by all its backups before it changes)."""
        self._keep(end)
        for other in self.overlapping:
            other._keep(self.address + end - other.address)

    def _keep(self, end: int) -> None:
        end = min(end, self.nbytes)
        if end <= self.kept:  # read without the lock: it only grows
            return
        with self._lock:
            if end > self.kept:  # ctypes.memmove and os.pwrite release the GIL, unlike a copy_ of a view of each part
                if self._spill is not None:
                    self._spill.write(self._at + self.kept, self.address + self.kept, end - self.kept, self.key)
                else:
                    assert self.copy is not None
                    ctypes.memmove(self.copy.data_ptr() + self.kept, self.address + self.kept, end - self.kept)
                self.kept = end

    def ready(self, region: torch.Tensor) -> None:
        """Keep every byte up to the end of ``region``, a view of the tensor that is about to be written."""
        if region.numel() == 0:
            return
        if region.untyped_storage().data_ptr() != self.live.untyped_storage().data_ptr():
            raise RestoreError(f"a restore wrote outside {self.key!r}, the tensor it kept (a bug in safepoint)")
        first = region.data_ptr() - self.address
        if first < 0:
            raise RestoreError(f"a restore wrote before {self.key!r}, the tensor it kept (a bug in safepoint)")
        last = sum((size - 1) * stride for size, stride in zip(region.shape, region.stride(), strict=True))
        self.keep_to(first + (last + 1) * region.element_size())

    def _keep_ahead(self) -> None:
        """The keeper's work: everything, a slice at a time, until done or stopped."""
        while self.kept < self.nbytes and not self._stopped:
            self._keep(self.kept + SLICE_BYTES)

    def put_back(self) -> None:
        """Write the kept bytes back; RuntimeError if the tensor no longer has the memory it had (resized, or its
        storage replaced), which is then left alone rather than written at an address it gave up."""
        with self._lock:
            self._stopped = True
            if self.live.data_ptr() != self.address or self.live.untyped_storage().nbytes() < self.nbytes:
                raise RuntimeError("the tensor's memory changed during the restore")
            if self.kept:
                if self._spill is not None:
                    self._spill.read(self._at, self.address, self.kept)
                else:
                    assert self.copy is not None
                    ctypes.memmove(self.address, self.copy.data_ptr(), self.kept)
                increment_version(self.live)  # as copy_ would: a graph that saved the value sees it changed


class RunBackup:
    """The bytes of several small live tensors from before the restore, all copied aside at once into one buffer
    (one allocation and one copy per tensor, no keeper: a run is at most a few MiB), before any of them is written.

    Only for tensors that are each the sole user of their storage (see :func:`safepoint._payload.direct_target`):
    no other tensor, and so no other backup, shares a byte with them, and the order they are put back in does not
    matter."""

    def __init__(self, items: list[tuple[str, torch.Tensor]]) -> None:
        self.key = items[0][0] if len(items) == 1 else f"{items[0][0]} .. {items[-1][0]}"
        self.parts = [(key, live, live.data_ptr(), live.nbytes) for key, live in items]
        self._memory = [live.detach() for _, live in items]  # hold the storages: the addresses stay valid
        total = sum(nbytes for *_, nbytes in self.parts)
        try:
            self.copy = torch.empty(total, dtype=torch.uint8)
        except RuntimeError as err:
            raise StorageError(f"cannot allocate {total} bytes to keep {self.key!r} before reading into them") from err
        at = self.copy.data_ptr()
        for _, _, address, nbytes in self.parts:  # ctypes.memmove releases the GIL
            ctypes.memmove(at, address, nbytes)
            at += nbytes

    def put_back(self) -> None:
        """Write every tensor's kept bytes back; RuntimeError naming those whose memory changed during the restore
        (resized, or storage replaced), which are left alone, once the others are back."""
        moved = []
        at = self.copy.data_ptr()
        for key, live, address, nbytes in self.parts:
            if live.data_ptr() != address or live.untyped_storage().nbytes() < nbytes:
                moved.append(key)
            else:
                ctypes.memmove(address, at, nbytes)
                increment_version(live)  # as copy_ would: a graph that saved the value sees it changed
            at += nbytes
        if moved:
            raise RuntimeError(f"the memory of {moved[:5]} changed during the restore")


class TensorBackups:
    """The previous bytes of every live tensor written in place by one restore, until it completes.

    :meth:`keep` is called before a tensor's first byte is written (from any reader thread) and returns its
    :class:`Backup`; :meth:`roll_back` puts every kept tensor back, newest first, and forgets them; :meth:`discard`
    forgets them once the restore is complete. The same memory kept twice (tied tensors) keeps its first backup;
    memory that overlaps another's is kept by every backup of it registered so far before any of their writers
    changes it (:meth:`Backup.keep_to`), so the oldest backup of a byte holds its value from before the restore,
    and it is put back last."""

    def __init__(self) -> None:
        self._kept: dict[tuple[int, int], Backup] = {}  # (address, nbytes) of live memory -> its backup
        self._runs: list[RunBackup] = []  # small tensors kept together (they share memory with nothing else)
        self._lock = threading.Lock()
        self._keeper: ThreadPoolExecutor | None = None
        self._spill: Spill | None = None  # the large backups' memory file, made at the first; closed when forgotten

    def __len__(self) -> int:
        return len(self._kept) + sum(len(run.parts) for run in self._runs)

    def keep(self, key: str, live: torch.Tensor, *, ahead: bool = True) -> Backup:
        """Register ``live`` (a contiguous CPU tensor, see :func:`writable`); StorageError if there is no memory
        for its copy. With ``ahead``, the keeper thread starts copying it aside; the writer still calls
        :meth:`Backup.keep_to` or :meth:`Backup.ready` before writing each part."""
        memory = (live.data_ptr(), live.nbytes)
        with self._lock:
            found = self._kept.get(memory)
        if found is not None:
            return found
        backup = Backup(key, live, self._spill_for(live.nbytes))
        with self._lock:
            found = self._kept.get(memory)
            if found is not None:
                return found
            for other in self._kept.values():
                if other.address < backup.address + backup.nbytes and backup.address < other.address + other.nbytes:
                    other.overlapping.append(backup)
                    backup.overlapping.append(other)
            self._kept[memory] = backup
            if ahead:
                if self._keeper is None:
                    self._keeper = ThreadPoolExecutor(1, thread_name_prefix="safepoint-keep")
                self._keeper.submit(backup._keep_ahead)
        return backup

    def _spill_for(self, nbytes: int) -> Spill | None:
        """The memory file for a backup of ``nbytes``: None for small ones, or where there is none (no
        ``memfd_create``, or it failed: the backup then takes a tensor of its own, as everywhere else)."""
        if nbytes < SPILL_MIN_BYTES or not Spill.available():
            return None
        with self._lock:
            if self._spill is None:
                with contextlib.suppress(OSError):
                    self._spill = Spill()
            return self._spill

    def keep_run(self, items: list[tuple[str, torch.Tensor]]) -> RunBackup:
        """Copy the bytes of several small ``(key, live tensor)`` aside now, in one buffer (see :class:`RunBackup`:
        each tensor the sole user of its storage, and in no other backup); StorageError if there is no memory."""
        run = RunBackup(items)
        with self._lock:
            self._runs.append(run)
        return run

    def roll_back(self, error: BaseException | None) -> None:
        """Put every kept tensor back as it was. A tensor that cannot be put back is named in a note on ``error``
        (the failure being handled, never replaced), or, without one, in a RestoreError raised once the others
        are back."""
        kept, spill = self._forget()
        failures = []
        try:
            for backup in reversed(kept):  # the runs share no byte with anything else: any order puts them back
                try:
                    backup.put_back()
                except Exception as failure:
                    failures.append(
                        f"safepoint: putting back {backup.key!r} after the failed restore also failed: {failure!r}; "
                        "that tensor may hold bytes of the checkpoint that were read but not verified: do not train "
                        "on it"
                    )
        finally:
            if spill is not None:
                spill.close()
        if failures and error is None:
            raise RestoreError("; ".join(failures))
        for note in failures:
            attach_note(error, note)  # type: ignore[arg-type]  # error is not None here

    def discard(self) -> None:
        """Forget the backups: the restore is complete and the writes stay. The keeper thread is stopped, then the
        kept bytes freed, on a thread of their own, off the caller's path: after a resharded restore (126 MiB kept
        per rank) waking the idle keeper to stop it took 1-10 ms, freeing the pages ~9 ms. The keeper is stopped
        first: it must not write into the memory file once its descriptor is closed (the number may be reused)."""
        _, keeper, spill = self._detach()
        if keeper is None and spill is None:
            return
        try:  # not threading.Thread: its start() waits until the new thread runs, 0.5-4 ms on a busy machine
            _thread.start_new_thread(_stop_and_free, (keeper, spill))
        except RuntimeError:  # no thread to be had: a complete restore must not fail for its cleanup
            _stop_and_free(keeper, spill)

    def _forget(self) -> tuple[list[Backup | RunBackup], Spill | None]:
        kept, keeper, spill = self._detach()
        if keeper is not None:
            keeper.shutdown(wait=True)  # nothing reads a live tensor into a backup any more
        return kept, spill

    def _detach(self) -> tuple[list[Backup | RunBackup], ThreadPoolExecutor | None, Spill | None]:
        """Every backup (each told to stop), the keeper and the memory file, no longer this object's."""
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
            runs, self._runs = self._runs, []
            keeper, self._keeper = self._keeper, None
            spill, self._spill = self._spill, None
        for backup in kept:
            backup._stopped = True
        return [*runs, *kept], keeper, spill

    @contextlib.contextmanager
    def until_complete(self) -> Iterator[TensorBackups]:
        """Roll back if anything escapes the block; forget the backups when it ends normally."""
        try:
            yield self
        except BaseException as error:
            self.roll_back(error)
            raise
        self.discard()


def _stop_and_free(keeper: ThreadPoolExecutor | None, spill: Spill | None) -> None:
    if keeper is not None:
        keeper.shutdown(wait=True)
    if spill is not None:
        spill.close()


class InPlace:
    """Writes into live tensors, registered while a restore is matched and run together once it all matched, each
    behind its backup in ``backups`` (the restore's: one rollback puts back everything it wrote in place)."""

    def __init__(self, backups: TensorBackups | None = None) -> None:
        self.backups = backups if backups is not None else TensorBackups()
        self._writes: list[tuple[str, torch.Tensor, Callable[[Ready], None]]] = []

    def __len__(self) -> int:
        return len(self._writes)

    def add(self, key: str, tensor: torch.Tensor, write: Callable[[Ready], None]) -> None:
        """Register ``tensor`` (:func:`writable`), to be filled by ``write(ready)`` when :meth:`run` runs;
        ``write`` calls ``ready(region)`` before it writes into each region (a view of ``tensor``)."""
        self._writes.append((key, tensor.detach(), write))

    def run(self) -> None:
        """Keep and write every registered tensor, in order; on any error, everything kept is put back before
        the error propagates."""
        writes, self._writes = self._writes, []
        try:
            kept = [self.backups.keep(key, tensor) for key, tensor, _ in writes]
            for (_, _, write), backup in zip(writes, kept, strict=True):
                write(backup.ready)
        except BaseException as err:
            self.backups.roll_back(err)
            raise
