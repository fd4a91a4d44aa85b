"""Backups of live tensors that a restore writes before it is complete, and putting them back.

A restore is total or nothing. Where it reads a file's bytes straight into a live tensor (no staging buffer, no
copy afterwards), it first keeps a copy of the tensor's bytes here, slice by slice just ahead of the read; until
the restore is complete, any failure puts every written tensor back, bitwise, before the error propagates. This
module only keeps and restores bytes: what may be written in place is decided by the reader
(:func:`safepoint._payload.direct_target`).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import torch
from torch.autograd.graph import increment_version

from ._errors import StorageError, attach_note

__all__ = ["Backup", "TensorBackups"]


class Backup:
    """The bytes of one live tensor from before the restore, copied aside up to :attr:`kept` (the caller writes
    no byte of the tensor before it is kept)."""

    def __init__(self, key: str, live: torch.Tensor) -> None:
        self.key, self.live = key, live
        self.address, self.nbytes = live.data_ptr(), live.nbytes
        try:
            self.copy = torch.empty(self.nbytes, dtype=torch.uint8)
        except RuntimeError as err:
            raise StorageError(f"cannot allocate {self.nbytes} bytes to keep {key!r} before reading into it") from err
        self.kept = 0

    def keep_to(self, end: int) -> None:
        """Copy the live bytes up to ``end`` aside (at most the whole tensor)."""
        end = min(end, self.nbytes)
        if end > self.kept:  # ctypes.memmove releases the GIL, unlike a copy_ of a view of each part
            ctypes.memmove(self.copy.data_ptr() + self.kept, self.address + self.kept, end - self.kept)
            self.kept = end

    def put_back(self) -> None:
        """Write the kept bytes back; RuntimeError if the tensor no longer has the memory it had (resized, or its
        storage replaced), which is then left alone rather than written at an address it gave up."""
        if self.live.data_ptr() != self.address or self.live.untyped_storage().nbytes() < self.nbytes:
            raise RuntimeError("the tensor's memory changed during the restore")
        if self.kept:
            ctypes.memmove(self.address, self.copy.data_ptr(), self.kept)
            increment_version(self.live)  # as copy_ would: a graph that saved the value sees it changed


class TensorBackups:
    """The previous bytes of every live tensor written in place by one restore, until it completes.

    :meth:`keep` is called before a tensor's first byte is written (from any reader thread) and returns its
    :class:`Backup`; :meth:`roll_back` puts every kept tensor back (newest first) and forgets them; :meth:`discard`
    forgets them once the restore is complete. A tensor kept twice keeps its first backup: the bytes from before
    the restore began."""

    def __init__(self) -> None:
        self._kept: dict[int, Backup] = {}  # id(live) -> its backup
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, key: str, live: torch.Tensor) -> Backup:
        """Register ``live`` (a contiguous CPU tensor); StorageError if there is no memory for its copy. Its
        bytes are copied aside as the caller asks (:meth:`Backup.keep_to`), always before they are written."""
        with self._lock:
            found = self._kept.get(id(live))
            if found is not None and found.live is live:
                return found
        backup = Backup(key, live)
        with self._lock:
            return self._kept.setdefault(id(live), backup)

    def roll_back(self, error: BaseException) -> None:
        """Put every kept tensor back as it was; a tensor that cannot be put back is named in a note on
        ``error`` (never replacing it), and the others are still put back."""
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
        for backup in reversed(kept):
            try:
                backup.put_back()
            except Exception as failure:
                attach_note(
                    error,
                    f"safepoint: putting back {backup.key!r} after the failed restore also failed: {failure!r}; "
                    "that tensor may hold bytes of the checkpoint that were read but not verified: do not train on it",
                )

    def discard(self) -> None:
        with self._lock:
            self._kept = {}

    @contextlib.contextmanager
    def until_complete(self) -> Iterator[TensorBackups]:
        """Roll back if anything escapes the block; forget the backups when it ends normally."""
        try:
            yield self
        except BaseException as error:
            self.roll_back(error)
            raise
        self.discard()
