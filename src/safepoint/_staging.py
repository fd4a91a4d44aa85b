"""Host staging buffers for background saves: a pool reused from save to save, held within a byte budget.

A background save copies every tensor into a staging buffer before ``save`` returns, so the training loop may
change its tensors at once. Fresh pages cost about twice a memcpy (the kernel zeroes and maps each one), so the
buffers are kept between saves and handed out again by exact size; a buffer of a size no longer asked for is
dropped only when the budget needs its room. For tensors on a GPU the buffers are pinned, so the device-to-host
copy can run asynchronously (``non_blocking=True``) while the next copies are queued.

The budget counts every byte the pool holds, lent or free. A request that does not fit waits until the writer
gives buffers back; one request larger than the whole budget is admitted alone, so a save never deadlocks on a
large tensor. The pool never touches storage, and never copies anything itself.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

from ._errors import StorageError
from ._validate import positive_int

__all__ = ["StagingPool", "check_staging_bytes"]


def check_staging_bytes(value: object) -> int | None:
    return positive_int("max_staging_bytes", value, allow_none=True)


class StagingPool:
    """Flat ``uint8`` CPU buffers by (size, pinned), within ``limit`` bytes (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0  # bytes the pool owns: lent + free
        self.lent = 0
        self.peak = 0
        self.allocations = 0  # buffers ever allocated: tests check that saves reuse them
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = defaultdict(list)
        self._condition = threading.Condition()

    def acquire(self, nbytes: int, *, pinned: bool = False, cancelled: threading.Event | None = None) -> torch.Tensor:
        """A buffer of exactly ``nbytes``; waits while the budget is full. Returns an empty tensor if
        ``cancelled`` is set while waiting (the save was abandoned)."""
        key = (nbytes, pinned)
        with self._condition:
            while True:
                if cancelled is not None and cancelled.is_set():
                    return torch.empty(0, dtype=torch.uint8)
                free = self._free.get(key)
                if free:
                    buffer = free.pop()
                    self.lent += nbytes
                    return buffer
                if self._fits(nbytes):
                    break
                if not self._evict_one():
                    self._condition.wait(timeout=0.1)  # re-checks ``cancelled`` even if nobody notifies
            self.held += nbytes
            self.lent += nbytes
            self.peak = max(self.peak, self.held)
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        except RuntimeError as err:
            self._forget(nbytes)
            raise StorageError(f"cannot allocate a staging buffer of {nbytes} bytes: {err}") from err
        self.allocations += 1
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Give a buffer back; kept for the next save unless the pool is over budget."""
        nbytes = buffer.numel()
        with self._condition:
            self.lent -= nbytes
            if self.limit is not None and self.held > self.limit:  # an oversized piece admitted alone
                self.held -= nbytes
            else:
                self._free[(nbytes, buffer.is_pinned())].append(buffer)
            self._condition.notify_all()

    def clear(self) -> None:
        """Drop every free buffer (lent ones are dropped as they come back only if over budget)."""
        with self._condition:
            for buffers in self._free.values():
                self.held -= sum(b.numel() for b in buffers)
            self._free.clear()
            self._condition.notify_all()

    def _fits(self, nbytes: int) -> bool:
        return self.limit is None or self.held + nbytes <= self.limit or self.held == 0

    def _evict_one(self) -> bool:
        for key, buffers in self._free.items():
            if buffers:
                buffers.pop()
                self.held -= key[0]
                return True
        return False

    def _forget(self, nbytes: int) -> None:
        with self._condition:
            self.held -= nbytes
            self.lent -= nbytes
            self._condition.notify_all()
