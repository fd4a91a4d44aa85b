"""Backups of live tensors that a restore writes before it is complete, and putting them back.

A restore is total or nothing. Where it reads a file's bytes straight into a live tensor (no staging buffer, no
copy afterwards), it first keeps a copy of the tensor's bytes here; until the restore is complete, any failure
puts every written tensor back, bitwise, before the error propagates. This module only keeps and restores bytes:
what may be written in place is decided by the reader (:func:`safepoint._payload.direct_target`).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import torch

from ._errors import StorageError, attach_note

__all__ = ["TensorBackups"]


class TensorBackups:
    """The previous bytes of every live tensor written in place by one restore, until it completes.

    :meth:`keep` is called before a tensor's first byte is written (from any reader thread); :meth:`roll_back`
    puts every kept tensor back (newest first) and forgets them; :meth:`discard` forgets them once the restore
    is complete. A tensor kept twice keeps its first backup: the bytes from before the restore began."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}  # id(live) -> (key, live, backup)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, key: str, live: torch.Tensor) -> None:
        """Copy the bytes of ``live`` (a contiguous CPU tensor) aside; StorageError if there is no memory for it."""
        with self._lock:
            if id(live) in self._kept:
                return
        try:
            backup = torch.empty(live.shape, dtype=live.dtype)
        except RuntimeError as err:
            raise StorageError(f"cannot allocate {live.nbytes} bytes to keep {key!r} before reading into it") from err
        if live.nbytes:
            ctypes.memmove(backup.data_ptr(), live.data_ptr(), live.nbytes)  # releases the GIL, unlike copy_
        with self._lock:
            self._kept.setdefault(id(live), (key, live, backup))

    def roll_back(self, error: BaseException) -> None:
        """Put every kept tensor back as it was; a tensor that cannot be put back is named in a note on
        ``error`` (never replacing it), and the others are still put back."""
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
        for key, live, backup in reversed(kept):
            try:
                with torch.no_grad():
                    live.copy_(backup)
            except Exception as failure:
                attach_note(
                    error,
                    f"safepoint: putting back {key!r} after the failed restore also failed: {failure!r}; that "
                    "tensor may hold bytes of the checkpoint that were read but not verified: do not train on it",
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
