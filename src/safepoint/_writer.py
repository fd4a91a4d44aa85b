"""Background saves: a snapshot into host staging buffers, then writing, checksums and commit on a thread.

``submit`` encodes the state and copies every tensor into a staging buffer (:mod:`safepoint._staging`) before it
returns, so the caller may change its tensors at once and the checkpoint holds the values of the moment of the
call. A background thread then runs the ordinary commit protocol on the copies: nothing it writes is visible
until the manifest is published, exactly as in a synchronous save.

When the staging budget is smaller than the state, the writer starts at once and the snapshot is copied in the
order the writer consumes it: each staging buffer goes back to the pool as soon as its bytes are written, and
``submit`` waits only for the room it needs. When the state fits, the writer starts only after the snapshot is
complete, so the copy has the CPU and the memory bandwidth to itself and the stall is as short as it can be.

Errors: a failure in the background is kept on the :class:`SaveHandle` and raised exactly once, by the
handle's ``result()`` or else by the owner's next ``raise_failures()`` as :class:`BackgroundSaveError` with the
failure as its cause. At interpreter exit, saves still in flight are finished (a hook that runs before
``concurrent.futures`` refuses new work), and a warning says that nobody waited for them.

Threads: the writers run on threads kept from one save to the next (:class:`_Worker`, one per save in flight at
the same time, shared by every manager of the process), because starting a thread per save made the caller wait
until the new thread had run. They end at interpreter exit, after the saves (a save started later, by a thread the
interpreter still waits for, gets a thread of its own that is waited for too); a forked child has none of them and
none of its parent's saves (a DataLoader worker forked while a save is in flight exits at once).

This module never decides what is written, retained or what a step is called: the caller passes the ``job``
(:mod:`safepoint._pipeline`'s save attempt).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import operator
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar, overload

import torch

from ._codec import Leaf
from ._errors import BackgroundSaveError, SafepointError, attach_note
from ._staging import StagingPool, check_staging_bytes
from ._validate import positive_int

__all__ = ["BackgroundWriter", "Job", "SaveHandle", "check_in_flight"]

logger = logging.getLogger("safepoint")

T = TypeVar("T")

#: A background save's work on its thread: write and commit the staged leaves (``leaves[i]`` waits until leaf
#: ``i`` is copied), calling ``written(i)`` as each leaf's memory is free again.
Job = Callable[[Sequence[torch.Tensor], Callable[[int], None]], T]


def check_in_flight(value: object) -> int:
    return positive_int("max_in_flight", value)


class SaveHandle(Generic[T]):
    """A background save. ``result()`` returns its :class:`~safepoint.CheckpointInfo` once durable."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._future: Future[T] = Future()
        self._reported = False
        self._lock = threading.Lock()

    def done(self) -> bool:
        """True once the save is durable or has failed."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """Wait (at most ``timeout`` seconds, then ``TimeoutError``) for the save to be durable.

        A failure is raised here as the original error; it then counts as reported, and the manager does not
        raise it again."""
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException:
            self._mark_reported()
            raise

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"SaveHandle(step={self.step}, {state})"

    def _mark_reported(self) -> None:
        with self._lock:
            self._reported = True

    def _wait(self) -> None:
        self._future.exception()  # waits; never raises the save's own error

    def _quiet(self) -> bool:
        """Done, with no failure left to report."""
        if not self._future.done():
            return False
        with self._lock:
            return self._reported or self._future.exception() is None

    def _take_error(self) -> BaseException | None:
        """The failure, if any and not reported yet; marks it reported."""
        if not self._future.done():
            return None
        error = self._future.exception()
        with self._lock:
            if error is None or self._reported:
                return None
            self._reported = True
        return error


#: Staging buffers hold runs of consecutive tensors up to this size (one tensor larger than it gets its own), so
#: ten thousand small tensors cost a few pool requests, and a writer can free memory before a save is written.
SEGMENT_BYTES = 64 << 20
_ALIGN = 64  # every tensor starts at a multiple of this in its segment: any dtype can view it


class _Segment:
    __slots__ = ("buffer", "event", "remaining")

    def __init__(self, buffer: torch.Tensor, remaining: int, event: torch.cuda.Event | None) -> None:
        self.buffer, self.remaining, self.event = buffer, remaining, event


class _Staged(Sequence[torch.Tensor]):
    """The snapshot's leaves as the writer sees them: ``[i]`` waits until leaf ``i`` is copied, then returns a
    view of its staging segment. Only dtypes and shapes of the live leaves are kept, never the live tensors."""

    def __init__(
        self,
        leaves: Sequence[Leaf],
        pool: StagingPool,
        plan: _CopyPlan,
        specs: Sequence[tuple[torch.dtype, torch.Size]] | None = None,
    ) -> None:
        self._specs = specs if specs is not None else [(leaf.tensor.dtype, leaf.tensor.shape) for leaf in leaves]
        # which segment of the plan, at which offset, each leaf is copied into: fixed by the plan, so adding a
        # segment costs nothing per leaf (for many small tensors a per-leaf cost is a measurable part of the stall)
        self._segment_of, self._offset = plan.segment_of, plan.offset_of
        self._direct: dict[int, torch.Tensor] = {}
        self._segments: list[_Segment] = []
        self._pool = pool
        self._condition = threading.Condition()
        self.cancelled = threading.Event()  # the writer failed: stop copying
        self._staging_done = threading.Event()
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        return len(self._specs)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(index, slice):
            raise TypeError("staged leaves are read one at a time")
        with self._condition:
            self._condition.wait_for(lambda: self._ready(index) or self._failure is not None)
            if not self._ready(index):
                raise SafepointError("the snapshot of this save was abandoned") from self._failure
            direct = self._direct.get(index)
            if direct is not None:
                return direct
            segment = self._segments[self._segment_of[index]]
        if segment.event is not None:
            segment.event.synchronize()  # the device-to-host copies into this pinned buffer have landed
        dtype, shape = self._specs[index]
        start = self._offset[index]
        nbytes = shape.numel() * dtype.itemsize
        return segment.buffer[start : start + nbytes].view(dtype).view(shape)

    def _ready(self, index: int) -> bool:
        return index in self._direct or self._segment_of[index] < len(self._segments)

    def put(self, index: int, value: torch.Tensor) -> None:
        """Leaf ``index`` needs no staging buffer (a private copy already, or empty)."""
        with self._condition:
            self._direct[index] = value
            self._condition.notify_all()

    def add_segment(self, buffer: torch.Tensor, leaves: int, stream: torch.cuda.Stream | None) -> None:
        """The plan's next segment (``leaves`` leaves) is copied into ``buffer``; with ``stream``, the copies were
        queued there and land once an event recorded now says so."""
        event = None
        if stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        with self._condition:
            self._segments.append(_Segment(buffer, leaves, event))
            self._condition.notify_all()

    def synchronize(self) -> None:
        """Wait for every device-to-host copy queued so far: the snapshot is then complete."""
        with self._condition:
            events = [segment.event for segment in self._segments if segment.event is not None]
        for event in events:
            event.synchronize()

    def written(self, index: int) -> None:
        """Leaf ``index`` is in the file: its segment goes back to the pool once all its leaves are."""
        with self._condition:
            number = self._segment_of[index]
            if number >= len(self._segments):
                return
            segment = self._segments[number]
            if segment.remaining == 0:
                return
            segment.remaining -= 1
            if segment.remaining:
                return
        self._pool.release(segment.buffer)

    def abandon(self, failure: BaseException) -> None:
        with self._condition:
            self._failure = failure
            self.cancelled.set()
            self._condition.notify_all()

    def staging_finished(self) -> None:
        self._staging_done.set()

    def release_all(self) -> None:
        """After the writer and the copier are both done: every segment still lent goes back to the pool."""
        self._staging_done.wait()
        with self._condition:
            held = [segment for segment in self._segments if segment.remaining]
            for segment in held:
                segment.remaining = 0
        for segment in held:
            self._pool.release(segment.buffer)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BackgroundWriter:
    """Background saves of one manager: the staging pool, the saves in flight, and their failures."""

    def __init__(self, max_staging_bytes: object, max_in_flight: object) -> None:
        """ConfigError naming the option unless ``max_staging_bytes`` is None or a positive number of bytes and
        ``max_in_flight`` a positive count."""
        self.pool = StagingPool(check_staging_bytes(max_staging_bytes))
        self.max_in_flight = check_in_flight(max_in_flight)
        self._pending: list[SaveHandle[Any]] = []
        self._copy_plan: _CopyPlan | None = None  # the last save's (see submit's ``structure``)
        self._pid = os.getpid()

    def in_flight(self) -> list[SaveHandle[Any]]:
        return [handle for handle in self._saves() if not handle.done()]

    def _saves(self) -> list[SaveHandle[Any]]:
        """This process's saves not yet reported. A child forked while saves were in flight has none: they are
        its parent's, and no thread of the child will finish them (waiting for room for the child's own save
        waited forever). The child gets a pool of its own too: a parent's thread may have held its lock at the
        fork, and its buffers are lent to the parent's saves."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._pending = []
            self._copy_plan = None
            self.pool = StagingPool(self.pool.limit)
        return self._pending

    def wait_for_room(self) -> None:
        """Wait until fewer than ``max_in_flight`` saves are in flight, oldest first."""
        while len(self.in_flight()) >= self.max_in_flight:
            self.in_flight()[0]._wait()

    def wait_all(self) -> None:
        for handle in list(self._saves()):
            handle._wait()

    def raise_failures(self) -> None:
        """Raise the first failure nobody has seen yet (later ones attached as notes), once; forget finished saves."""
        finished = [handle for handle in self._saves() if handle.done()]
        self._pending = [handle for handle in self._pending if not handle.done()]
        _forget(finished)
        failures = [(handle.step, error) for handle in finished if (error := handle._take_error()) is not None]
        if not failures:
            return
        step, cause = failures[0]
        error = BackgroundSaveError(
            f"the background save of step {step} failed; nothing of it is visible: {cause}",
            step=step,
            errno=getattr(cause, "errno", None),
        )
        for other_step, other in failures[1:]:
            attach_note(error, f"safepoint: the background save of step {other_step} failed too: {other!r}")
        raise error from cause

    def submit(
        self,
        step: int,
        leaves: list[Leaf],
        job: Job[T],
        order: Callable[[], list[int]],
        *,
        specs: Sequence[tuple[torch.dtype, torch.Size]] | None = None,
        structure: tuple[object, ...] | None = None,
        pointers: Sequence[int] | None = None,
    ) -> SaveHandle[T]:
        """Copy ``leaves`` into staging buffers and start ``job`` on them on a thread; returns once the copy is
        complete. ``order`` is the order in which ``job`` reads the leaves (asked only when the staging budget
        is smaller than the state, so that the copy can follow the writer). ``specs``: each leaf's dtype and
        shape, where the caller knows them already. ``structure``: objects that are the same (``is``) only when
        the leaves' kinds, dtypes, shapes and devices are those of the last save with them (the structure cache's
        entries), so that the copy's plan is reused; None: plan the copy afresh. ``pointers``: each leaf's
        ``data_ptr()``, read at this call, where every leaf is dense (contiguous, no conj/neg bit): the host
        copies then read nothing more of the tensors."""
        handle: SaveHandle[T] = SaveHandle(step)
        self._saves()  # a forked child's own pool and plan (see there)
        plan = self._copy_plan
        if plan is None or not plan.serves(structure, self.pool.limit):
            plan = self._copy_plan = self._plan_copy(leaves, order, structure)
        staged = _Staged(leaves, self.pool, plan, specs)
        streaming = plan.streaming
        unviewed: list[tuple[_Run, Sequence[int]]] = []  # filled by the copy, viewed by the writer (see _views)
        task = functools.partial(_run, handle, staged, job, unviewed)
        if streaming:
            _start(handle, task)
        try:
            _copy(leaves, plan, staged, self.pool, pointers, unviewed=unviewed)
        except BaseException as err:
            staged.abandon(err)
            staged.staging_finished()
            if streaming:
                handle._wait()  # the writer removes what it wrote: nothing half-written outlives the error
            else:
                staged.release_all()
            handle._mark_reported()
            raise
        staged.staging_finished()
        if staged.cancelled.is_set():  # the writer failed while the snapshot was copied: it is this call's error
            handle._wait()
            handle._mark_reported()
            raise handle._future.exception() or SafepointError(f"the background save of step {step} failed")
        if not streaming:
            _start(handle, task)
        self._pending.append(handle)
        return handle

    def _plan_copy(
        self, leaves: Sequence[Leaf], order: Callable[[], list[int]], structure: tuple[object, ...] | None
    ) -> _CopyPlan:
        limit = self.pool.limit
        streaming = limit is not None and sum(_nbytes(leaf.tensor) for leaf in leaves) > limit
        plan = _CopyPlan(structure, limit, streaming, len(leaves))
        if streaming:  # the writer starts now, and the copy follows the order in which it writes
            return _plan_copy(leaves, order(), max(1, min(SEGMENT_BYTES, (limit or 0) // 4)), plan)
        # the writer starts after the copy, and plans from the copy (planning is not the caller's time)
        return _plan_copy(leaves, range(len(leaves)), SEGMENT_BYTES, plan)


def _run(
    handle: SaveHandle[T], staged: _Staged, job: Job[T], unviewed: list[tuple[_Run, Sequence[int]]]
) -> Callable[[], None]:
    """Run one save's ``job``; returns what sets its outcome on ``handle``, which the worker calls once it is
    idle again (so that a save that waited for this one finds the thread free)."""
    try:
        result = job(staged, staged.written)
    except BaseException as err:
        staged.abandon(err)
        staged.release_all()
        return functools.partial(handle._future.set_exception, err)
    staged.release_all()  # also waits for the end of the copy: ``unviewed`` is complete
    with contextlib.suppress(Exception):  # views only make later copies cheaper: never a reason to fail a save
        _views(unviewed)  # before the result: a save that waited for this one finds them
    return functools.partial(handle._future.set_result, result)


#: The background writer's nice value (Linux: per thread, and inherited by the file writers it starts), so the
#: training loop keeps the CPU it needs and the save uses what is left. Measured on 2 cores with a CPU-bound
#: training loop (docs/performance.md): at 0 the steps ran 3.4x slower during a save, at 10 +24 %, at 15 no
#: measurable slowdown while the save took ~9 s instead of 0.5 s; at 19 it starved (~27 s).
BACKGROUND_NICENESS = 15


def _yield_cpu() -> None:
    if sys.platform != "linux":  # elsewhere PRIO_PROCESS with a thread id would re-nice the whole process
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


class _Run:
    """One staging buffer's worth of the copy: its size, its device (None: host memory), its leaves, and where
    each lies in it."""

    __slots__ = ("_pick", "device", "host", "indices", "offsets", "size", "sizes", "slices", "views")

    def __init__(self, device: torch.device | None, members: list[tuple[int, int]], sizes: list[int], host: bool):
        self.device, self.sizes, self.host = device, sizes, host
        self.indices = [index for index, _ in members]
        self.offsets = [offset for _, offset in members]
        self.size = members[-1][1] + -(-sizes[-1] // _ALIGN) * _ALIGN
        self._pick = operator.itemgetter(*self.indices)
        # each leaf's place in the buffer, and (see _views) the source addresses of a past copy with a view of
        # each source's planned extent: a copy from the same addresses again goes through them
        self.slices = list(map(slice, self.offsets, map(operator.add, self.offsets, sizes)))
        self.views: tuple[Sequence[int], list[memoryview]] | None = None

    def sources(self, pointers: Sequence[int]) -> Sequence[int]:
        """This segment's entries of ``pointers`` (one per leaf of the snapshot), in one C call."""
        picked = self._pick(pointers)
        return picked if len(self.indices) > 1 else (picked,)


class _CopyPlan:
    """How a snapshot is copied: the leaves staged without a buffer, then the segments in copy order. A function
    of the leaves' kinds, dtypes, shapes and devices, the copy order and the segment limit only: for a state of
    the structure saved last (the same ``structure`` key), the plan of the last save is the plan of this one."""

    __slots__ = ("direct", "key", "limit", "offset_of", "segment_of", "segments", "streaming")

    def __init__(self, key: tuple[object, ...] | None, limit: int | None, streaming: bool, leaves: int) -> None:
        self.key, self.limit, self.streaming = key, limit, streaming
        self.direct: list[int] = []
        self.segments: list[_Run] = []
        self.segment_of = [sys.maxsize] * leaves  # each leaf's segment (its index in ``segments``); direct: none
        self.offset_of = [0] * leaves  # where in it

    def serves(self, key: tuple[object, ...] | None, limit: int | None) -> bool:
        return (
            key is not None and self.key is not None and self.limit == limit and len(key) == len(self.key)
            and all(a is b for a, b in zip(key, self.key, strict=True))
        )  # fmt: skip


def _plan_copy(leaves: Sequence[Leaf], order: Sequence[int], limit: int, plan: _CopyPlan) -> _CopyPlan:
    """Group the leaves, in ``order``, into segments of at most ``limit`` bytes (or one larger leaf), each on one
    device; pickled and empty leaves need no buffer."""
    members: list[tuple[int, int]] = []
    sizes: list[int] = []
    size, device, host = 0, None, True
    for index in order:
        leaf = leaves[index]
        source = leaf.tensor
        nbytes = source.nbytes
        if leaf.kind == "pickle" or nbytes == 0:  # a private copy already, or nothing
            plan.direct.append(index)
            continue
        where = source.device if source.is_cuda else None  # other devices: plain memory
        if members and (size + nbytes > limit or where != device):
            plan.segments.append(_Run(device, members, sizes, host))
            members, sizes, size, host = [], [], 0, True
        plan.segment_of[index], plan.offset_of[index] = len(plan.segments), size
        members.append((index, size))
        sizes.append(nbytes)
        size += -(-nbytes // _ALIGN) * _ALIGN
        device = where
        host = host and source.is_cpu
    if members:
        plan.segments.append(_Run(device, members, sizes, host))
    return plan


def _copy(
    leaves: Sequence[Leaf],
    plan: _CopyPlan,
    staged: _Staged,
    pool: StagingPool,
    pointers: Sequence[int] | None,
    *,
    unviewed: list[tuple[_Run, Sequence[int]]],
) -> None:
    """Copy the leaves into staging segments as ``plan`` says: from a GPU into pinned memory asynchronously, every
    copy having landed when this returns. These loops are the stall of a background save with many small tensors.
    ``pointers``: see :meth:`BackgroundWriter.submit`. Adds to ``unviewed`` the host segments copied by address
    without views of those addresses (see _views), with their source addresses."""
    for index in plan.direct:
        source = leaves[index].tensor
        staged.put(index, source if source.nbytes else torch.empty(source.shape, dtype=source.dtype))
    for segment in plan.segments:
        pinned = segment.device is not None
        buffer = pool.acquire(segment.size, pinned=pinned, cancelled=staged.cancelled)
        if staged.cancelled.is_set():
            return
        if pointers is not None and segment.host:
            sources = segment.sources(pointers)
            views = segment.views
            if views is not None and views[0] == sources:
                _copy_views(buffer, views[1], segment)
            else:
                _move(buffer, sources, segment)
                unviewed.append((segment, sources))
        else:
            _fill(buffer, [leaves[index].tensor for index in segment.indices], segment)
        stream = torch.cuda.current_stream(segment.device) if pinned else None
        staged.add_segment(buffer, len(segment.indices), stream)
    staged.synchronize()


_CONTIGUOUS = torch.Tensor.is_contiguous
_CONJ, _NEG, _DATA_PTR = torch.Tensor.is_conj, torch.Tensor.is_neg, torch.Tensor.data_ptr


def _move(buffer: torch.Tensor, sources: Sequence[int], segment: _Run) -> None:
    """One memmove per source address into ``buffer`` at the segment's offsets, driven by ``map`` (no interpreter
    loop: for many small tensors its per-tensor cost would be the stall); the sizes are the planned ones, which
    the leaves' dtypes and shapes fix. torch's ``copy_`` costs ~10x more per call."""
    base = buffer.data_ptr()
    collections.deque(map(ctypes.memmove, map(base.__add__, segment.offsets), sources, segment.sizes), 0)


def _copy_views(buffer: torch.Tensor, views: list[memoryview], segment: _Run) -> None:
    """What :func:`_move` does, through views of the same source extents: a slice assignment costs a tenth of a
    foreign call (~0.04 us against ~0.36 us: 3 ms of the stall of 10 000 tensors). A size that differs from the
    planned one would be a ValueError, never a copy of other bytes."""
    collections.deque(map(buffer.numpy().data.__setitem__, segment.slices, views), 0)


def _views(unviewed: list[tuple[_Run, Sequence[int]]]) -> None:
    """Give each segment views of its planned source extents at ``sources``, for the next copy from the same
    addresses. On the writer's thread, after a copy (~1.5 us a tensor, paid once while the addresses stay). The
    views hold no tensor: they are used only by a copy whose walk read these same addresses again for tensors of
    the planned dtypes and shapes (dense), i.e. exactly the spans :func:`_move` would copy."""
    for segment, sources in unviewed:
        views = [
            memoryview((ctypes.c_char * size).from_address(address)).cast("B")
            for address, size in zip(sources, segment.sizes, strict=True)
        ]
        segment.views = (sources, views)


def _fill(buffer: torch.Tensor, sources: list[torch.Tensor], segment: _Run) -> None:
    """Copy ``sources`` into ``buffer`` at the segment's offsets. Dense host tensors with one memmove each, driven
    by ``map`` (no interpreter loop: for many small tensors its per-tensor cost would be the stall); others with
    ``copy_``: from a GPU asynchronously, into pinned memory. A tensor's bytes are read here, at the call."""
    if segment.host and all(map(_CONTIGUOUS, sources)) and not any(map(_CONJ, sources)) and not any(map(_NEG, sources)):
        _move(buffer, list(map(_DATA_PTR, sources)), segment)
        return
    base = buffer.data_ptr()
    asynchronous = segment.device is not None
    for source, offset, nbytes in zip(sources, segment.offsets, segment.sizes, strict=True):
        if source.is_cpu and source.is_contiguous() and not (source.is_conj() or source.is_neg()):
            ctypes.memmove(base + offset, source.data_ptr(), nbytes)
        else:
            view = buffer[offset : offset + nbytes].view(source.dtype).view(source.shape)
            view.copy_(source, non_blocking=asynchronous)


class _Worker:
    """A writer thread kept from one background save to the next: ``_start`` hands it a save through a queue and
    returns. (A thread started per save made the caller wait until it had run and handed the GIL back: 0.3-0.6 ms
    a save, more with more ranks than cores; docs/performance.md.) It runs at the background niceness for its
    whole life, holds nothing of a save once the save is done, and serves any manager of the process."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], Callable[[], None]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="safepoint-writer", daemon=True)

    def run(self, task: Callable[[], Callable[[], None]]) -> None:
        self._tasks.put(task)

    def stop(self) -> None:
        """End the thread once the saves handed to it are done."""
        self._tasks.put(None)

    def _serve(self) -> None:
        _yield_cpu()
        while (task := self._tasks.get()) is not None:
            settle = task()
            del task  # nothing of a finished save stays reachable from an idle thread
            with _lock:
                if self in _workers:  # not stopped by the exit hook, nor left behind in a forked child
                    _idle.append(self)
            settle()
            del settle


#: Every background save from its start until its manager has seen its outcome (``raise_failures``): held here, not
#: through the manager, so that the exit hook also finishes a save whose manager nobody holds any more (a local of
#: a ``main()`` that returned while the save was in flight). A save of such a manager that succeeded is forgotten at
#: the next start of a save; one that failed stays, for the exit hook to log.
_saves: list[SaveHandle[Any]] = []
_workers: list[_Worker] = []  # every writer thread of this process
_idle: list[_Worker] = []  # those waiting for a save
_lock = threading.Lock()
_hook_registered = False
_exiting = False  # the exit hook has run: see _start


def _start(handle: SaveHandle[Any], task: Callable[[], Callable[[], None]]) -> None:
    """Run ``task`` (a save of ``handle``) on an idle writer thread, or a new one."""
    _register_exit_hook()
    new = worker = None
    with _lock:
        _saves[:] = [held for held in _saves if not held._quiet()]
        _saves.append(handle)
        if _exiting:
            # a save started by a thread the interpreter is still waiting for after the exit hook ran (the main
            # thread has returned): a kept daemon thread would be cut off at finalization, the save lost without a
            # word. A thread of its own, not a daemon, is waited for like the caller's.
            new = threading.Thread(target=_run_once, args=(handle, task), name="safepoint-writer", daemon=False)
        elif _idle:
            worker = _idle.pop()
        else:
            worker = _Worker()
            new = worker.thread
            _workers.append(worker)
    if new is not None:
        new.start()
    if worker is not None:
        worker.run(task)


def _run_once(handle: SaveHandle[Any], task: Callable[[], Callable[[], None]]) -> None:
    """A save started after the exit hook ran: no hook is left to report its failure, so it is logged here (and
    still raised to whoever waits for it: logged twice at worst, never lost)."""
    _yield_cpu()
    task()()
    if not handle._quiet():
        logger.error("safepoint: the background save of step %s failed: %r", handle.step, handle._future.exception())


def _forget(handles: list[SaveHandle[Any]]) -> None:
    with _lock:
        _saves[:] = [held for held in _saves if not any(held is handle for handle in handles)]


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) has none of its parent's writer threads, and its parent's saves are not
    its own: the exit hook must not wait for them (it waited forever), nor an idle thread that is not there be
    handed a save. The lock may have been held by one of the parent's threads at the fork."""
    global _lock, _exiting
    _lock = threading.Lock()
    _exiting = False
    _saves.clear()
    _workers.clear()
    _idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _register_exit_hook() -> None:
    """Finish saves in flight at interpreter exit. ``threading._register_atexit`` hooks run, newest first,
    before non-daemon threads are joined and before concurrent.futures refuses new work (which the writer
    needs for its parallel files); plain ``atexit`` hooks would run too late for that."""
    global _hook_registered
    with _lock:
        if _hook_registered:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is None:  # pragma: no cover - every CPython since 3.9 has it
            import atexit

            atexit.register(_drain_at_exit)
        else:
            register(_drain_at_exit)
        _hook_registered = True


def _drain_at_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
        saves = list(_saves)
    for handle in saves:
        if not handle.done():
            logger.warning(
                "safepoint: finishing the background save of step %s at interpreter exit; "
                "call manager.wait() or close() so its errors reach you",
                handle.step,
            )
            handle._wait()
    with _lock:
        workers = list(_workers)
        _workers.clear()
        _idle.clear()
    for worker in workers:
        worker.stop()
    for worker in workers:
        # a writer thread still alive during finalization (even an idle one) aborts the interpreter ("terminate
        # called without an active exception"): CPython ends a thread that takes the GIL then with pthread_exit,
        # whose unwinding through torch's noexcept frames calls std::terminate
        worker.thread.join()
    for handle in saves:
        error = handle._take_error()
        if error is not None:
            logger.error("safepoint: the background save of step %s failed: %r", handle.step, error)
