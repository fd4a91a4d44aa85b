"""A memory budget in bytes for staging copies: a limiter that admits work and always releases it.

Writers that must copy a tensor before writing it (it lives on a GPU, or is not dense) take its size from the
budget first and give it back once the bytes are written, so parallel writers never hold more than the budget in
copies. One piece larger than the whole budget is admitted alone, so a save never deadlocks on a large tensor.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["ByteBudget"]


class ByteBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget must be positive, not {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._condition = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Wait until ``nbytes`` fit (or nothing else is held), hold them for the block, then release."""
        with self._condition:
            self._condition.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._condition:
                self.used -= nbytes
                self._condition.notify_all()
