"""Writing a checkpoint's bytes straight into live tensors, behind backups: total or nothing, without staging.

A restore may change nothing live until every rank has verified what it read (invariant 4). Reading into a fresh
staging tensor and copying it into the live one at apply time keeps that, at the price of a second copy and of the
page faults of first touching the staging memory. :class:`InPlace` reads into the live memory instead, after
copying what is there to a backup: the backups are taken by one background thread, slice by slice, ahead of the
reads (a read waits only for the slices of the region it overwrites), so the copies overlap the reads' I/O.

If anything fails (a read, a checksum, another rank's verdict, a later apply step), :meth:`InPlace.restore` puts
every backed-up slice back, newest backup first, so a byte covered by several backups (aliased tensors) ends
with the value of the first one, taken before anything was written to it. On success :meth:`InPlace.release`
drops the backups. Only plain, dense, contiguous CPU tensors are written in place (see :func:`writable`); the
caller keeps its staging path for every other tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from ._errors import RestoreError, attach_note

__all__ = ["InPlace", "Ready", "writable"]

#: Backups are taken in slices of this many bytes: a read waits only for the slices it overwrites.
SLICE_BYTES = 1 << 20

#: ``ready(region)``: returns once every byte of ``region`` (a view of a target) is backed up.
Ready = Callable[[torch.Tensor], None]


def writable(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``tensor``'s memory can take a checkpoint's bytes of ``dtype`` as they are: a plain dense strided
    CPU tensor of that dtype, contiguous, not a lazily conjugated or negated view."""
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


@dataclass
class _Target:
    tensor: torch.Tensor  # the live tensor, detached (the same memory)
    write: Callable[[Ready], None]  # fills it, calling ready(region) before writing each region
    bytes: torch.Tensor = field(init=False)  # its memory as flat bytes
    backup: torch.Tensor | None = None
    slices: list[Future[object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bytes = self.tensor.reshape(-1).view(torch.uint8)


class InPlace:
    """Live tensors to be written in place, each behind a backup (see the module's docstring)."""

    def __init__(self) -> None:
        self._targets: list[_Target] = []

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, tensor: torch.Tensor, write: Callable[[Ready], None]) -> None:
        """Register ``tensor`` (:func:`writable`), to be filled by ``write(ready)`` when :meth:`run` runs;
        ``write`` calls ``ready(region)`` before it writes into each region (a view of ``tensor``)."""
        self._targets.append(_Target(tensor.detach(), write))

    def run(self) -> None:
        """Back up and write every target, in order; on any error, every target is restored before it propagates."""
        if not self._targets:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="safepoint-backup")
        try:
            for target in self._targets:
                target.backup = torch.empty_like(target.bytes)
                for start in range(0, target.bytes.numel(), SLICE_BYTES):
                    end = start + SLICE_BYTES
                    target.slices.append(pool.submit(target.backup[start:end].copy_, target.bytes[start:end]))
            for target in self._targets:
                target.write(_ready(target))
        except BaseException as err:
            pool.shutdown(wait=True)  # no backup is still being taken while backups are put back
            self.restore(err)
            raise
        finally:
            pool.shutdown(wait=True)

    def restore(self, error: BaseException | None = None) -> None:
        """Put every backed-up slice back, newest first, then drop the backups. A failure here is attached as a
        note to ``error`` (the failure being handled, never masked), or raised as a RestoreError without one."""
        wait([future for target in self._targets for future in target.slices])
        failures: list[str] = []
        for target in reversed(self._targets):
            if target.backup is None:
                continue
            for index in reversed(range(len(target.slices))):
                if target.slices[index].exception() is not None:
                    continue  # never taken, so nothing was written over it (a read waits for its slices)
                start = index * SLICE_BYTES
                try:
                    target.bytes[start : start + SLICE_BYTES].copy_(target.backup[start : start + SLICE_BYTES])
                except Exception as failure:  # pragma: no cover - a copy between two CPU buffers
                    failures.append(repr(failure))
        self.release()
        if not failures:
            return
        message = f"putting the live tensors back after a failed restore also failed: {failures[0]}"
        if error is None:
            raise RestoreError(f"{message}; the live state is partly changed: restore again before training on")
        attach_note(error, f"safepoint: {message}; the live state is partly changed")

    def release(self) -> None:
        """Drop the backups (the writes stay)."""
        for target in self._targets:
            target.backup = None
            target.slices.clear()
        self._targets.clear()


def _ready(target: _Target) -> Ready:
    base = target.tensor.storage_offset()
    element = target.tensor.element_size()

    def ready(region: torch.Tensor) -> None:
        if region.numel() == 0:
            return
        first = region.storage_offset() - base
        last = first + sum((size - 1) * stride for size, stride in zip(region.shape, region.stride(), strict=True))
        if region.untyped_storage().data_ptr() != target.tensor.untyped_storage().data_ptr() or first < 0:
            raise RestoreError("a restore wrote outside the tensor it backed up (a bug in safepoint)")
        end = (last + 1) * element  # the region's bytes are [first * element, end) of the target's
        for future in target.slices[first * element // SLICE_BYTES : (end - 1) // SLICE_BYTES + 1]:
            future.result()  # raises if that backup failed: nothing is written over it

    return ready
