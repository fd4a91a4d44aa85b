"""Background saves: a snapshot into host staging buffers, then writing, checksums and commit on a thread.

``submit`` encodes the state and copies every tensor into a staging buffer (:mod:`safepoint.staging`) before it
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

This module never decides what is retained or what a step is called: the caller passes a ``commit`` callable.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, overload

import torch

from .codec import Leaf, encode_state
from .commit import SavePlan, plan_save
from .errors import BackgroundSaveError, ConfigError, SafepointError, attach_note
from .staging import StagingPool

__all__ = ["BackgroundWriter", "Commit", "SaveHandle", "check_in_flight"]

logger = logging.getLogger("safepoint")

#: Writes ``plan`` from the staged leaves, calling ``written(leaf)`` as each leaf's memory is free again.
Commit = Callable[[SavePlan, Sequence[torch.Tensor], Callable[[int], None]], Any]


def check_in_flight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_in_flight must be a positive integer, not {value!r}")
    return value


class SaveHandle:
    """A background save. ``result()`` returns its :class:`~safepoint.CheckpointInfo` once durable."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._future: Future[Any] = Future()
        self._reported = False
        self._lock = threading.Lock()

    def done(self) -> bool:
        """True once the save is durable or has failed."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
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


class _Staged(Sequence[torch.Tensor]):
    """The snapshot's leaves as the writer sees them: ``[i]`` waits until leaf ``i`` is copied."""

    def __init__(self, count: int, pool: StagingPool) -> None:
        self._values: list[torch.Tensor | None] = [None] * count
        self._buffers: dict[int, torch.Tensor] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._pool = pool
        self._condition = threading.Condition()
        self.cancelled = threading.Event()  # the writer failed: stop copying
        self._staging_done = threading.Event()
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(index, slice):
            raise TypeError("staged leaves are read one at a time")
        with self._condition:
            self._condition.wait_for(lambda: self._values[index] is not None or self._failure is not None)
            value, event = self._values[index], self._events.pop(index, None)
        if value is None:
            raise SafepointError("the snapshot of this save was abandoned") from self._failure
        if event is not None:
            event.synchronize()  # the device-to-host copy into this pinned buffer has landed
        return value

    def put(
        self, index: int, value: torch.Tensor, buffer: torch.Tensor | None, *, stream: torch.cuda.Stream | None = None
    ) -> None:
        """Leaf ``index`` is copied; with ``stream``, the copy was queued there and lands once an event says so."""
        event = None
        if stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        with self._condition:
            self._values[index] = value
            if buffer is not None:
                self._buffers[index] = buffer
            if event is not None:
                self._events[index] = event
            self._condition.notify_all()

    def synchronize(self) -> None:
        """Wait for every device-to-host copy queued so far: the snapshot is then complete."""
        with self._condition:
            events = list(self._events.values())
        for event in events:
            event.synchronize()

    def written(self, index: int) -> None:
        with self._condition:
            buffer = self._buffers.pop(index, None)
        if buffer is not None:
            self._pool.release(buffer)

    def abandon(self, failure: BaseException) -> None:
        with self._condition:
            self._failure = failure
            self.cancelled.set()
            self._condition.notify_all()

    def staging_finished(self) -> None:
        self._staging_done.set()

    def release_all(self) -> None:
        """After the writer and the copier are both done: every buffer still lent goes back to the pool."""
        self._staging_done.wait()
        with self._condition:
            buffers = list(self._buffers.values())
            self._buffers.clear()
            self._values = [None] * len(self._values)
        for buffer in buffers:
            self._pool.release(buffer)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BackgroundWriter:
    """Background saves of one manager: the staging pool, the saves in flight, and their failures."""

    def __init__(self, max_staging_bytes: int | None, max_in_flight: int) -> None:
        self.pool = StagingPool(max_staging_bytes)
        self.max_in_flight = max_in_flight
        self._pending: list[SaveHandle] = []
        self._threads: dict[SaveHandle, threading.Thread] = {}

    def in_flight(self) -> list[SaveHandle]:
        return [handle for handle in self._pending if not handle.done()]

    def wait_for_room(self) -> None:
        """Wait until fewer than ``max_in_flight`` saves are in flight, oldest first."""
        while len(self.in_flight()) >= self.max_in_flight:
            self.in_flight()[0]._wait()

    def wait_all(self) -> None:
        for handle in list(self._pending):
            handle._wait()

    def raise_failures(self) -> None:
        """Raise the first failure nobody has seen yet (later ones attached as notes), once; forget finished saves."""
        finished = [handle for handle in self._pending if handle.done()]
        self._pending = [handle for handle in self._pending if not handle.done()]
        for handle in finished:
            self._threads.pop(handle, None)
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
        state: Mapping[str, Any],
        *,
        checkpoint: str,
        step: int,
        metrics: Mapping[str, float] | None,
        state_version: int,
        commit: Commit,
    ) -> SaveHandle:
        """Snapshot ``state`` into staging buffers and start writing it; returns once the snapshot is complete."""
        was_enabled = gc.isenabled()
        gc.disable()  # as in a synchronous save: a few objects per tensor would trigger full collections
        try:
            encoded = encode_state(state)
            plan = plan_save(encoded, checkpoint=checkpoint, step=step, metrics=metrics, state_version=state_version)
            return self._start(plan, encoded.leaves, commit)
        finally:
            if was_enabled:
                gc.enable()

    def _start(self, plan: SavePlan, leaves: list[Leaf], commit: Commit) -> SaveHandle:
        handle = SaveHandle(plan.step)
        staged = _Staged(len(leaves), self.pool)
        thread = threading.Thread(
            target=self._run, args=(handle, plan, staged, commit), name=f"safepoint-save-{plan.step}", daemon=True
        )
        total = sum(_nbytes(leaf.tensor) for leaf in leaves)
        streaming = self.pool.limit is not None and total > self.pool.limit
        if streaming:
            _register_exit_hook(self)
            thread.start()
        try:
            # the order the writer consumes them: file by file, each file's tensors as laid out
            _copy(leaves, [item.leaf for planned in plan.files for item in planned.tensors], staged, self.pool)
        except BaseException as err:
            staged.abandon(err)
            staged.staging_finished()
            if streaming:
                thread.join()  # the writer removes what it wrote: nothing half-written outlives the error
            else:
                staged.release_all()
            handle._mark_reported()
            raise
        staged.staging_finished()
        if staged.cancelled.is_set():  # the writer failed while the snapshot was copied: it is this call's error
            thread.join()
            handle._mark_reported()
            raise handle._future.exception() or SafepointError(f"the background save of step {plan.step} failed")
        if not streaming:
            _register_exit_hook(self)
            thread.start()
        self._pending.append(handle)
        self._threads[handle] = thread
        return handle

    def _run(self, handle: SaveHandle, plan: SavePlan, staged: _Staged, commit: Commit) -> None:
        try:
            result = commit(plan, staged, staged.written)
        except BaseException as err:
            staged.abandon(err)
            staged.release_all()
            handle._future.set_exception(err)
            return
        staged.release_all()
        handle._future.set_result(result)


def _copy(leaves: list[Leaf], order: list[int], staged: _Staged, pool: StagingPool) -> None:
    """Copy each leaf into a staging buffer. Device tensors go to pinned buffers with an asynchronous copy;
    every copy has landed when this returns."""
    for index in order:
        leaf = leaves[index]
        source = leaf.tensor
        if leaf.kind == "pickle":  # already a private copy of the pickled bytes
            staged.put(index, source, None)
            continue
        nbytes = _nbytes(source)
        if nbytes == 0:
            staged.put(index, torch.empty(source.shape, dtype=source.dtype), None)
            continue
        device = source.device.type == "cuda"  # other devices copy synchronously into plain memory
        buffer = pool.acquire(nbytes, pinned=device, cancelled=staged.cancelled)
        if staged.cancelled.is_set():
            return
        view = buffer.view(source.dtype).view(source.shape)
        view.copy_(source, non_blocking=device)
        staged.put(index, view, buffer, stream=torch.cuda.current_stream(source.device) if device else None)
    staged.synchronize()


_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_registered = False


def _register_exit_hook(writer: BackgroundWriter) -> None:
    """Finish saves in flight at interpreter exit. ``threading._register_atexit`` hooks run, newest first,
    before non-daemon threads are joined and before concurrent.futures refuses new work (which the writer
    needs for its parallel files); plain ``atexit`` hooks would run too late for that."""
    global _hook_registered
    _writers.add(writer)
    with _hook_lock:
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
    for writer in list(_writers):
        for handle in writer.in_flight():
            logger.warning(
                "safepoint: finishing the background save of step %s at interpreter exit; "
                "call manager.wait() or close() so its errors reach you",
                handle.step,
            )
            handle._wait()
        for handle in list(writer._pending):
            error = handle._take_error()
            if error is not None:
                logger.error("safepoint: the background save of step %s failed: %r", handle.step, error)
