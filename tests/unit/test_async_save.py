"""Background saves: a snapshot of the moment of the call, durable later; failures surface exactly once."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint import _faults as faults
from tests.conftest import make_state, tensors_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """While the event is clear, every background writer stops before its first payload file."""
    release = threading.Event()

    def hold(name: str) -> None:
        assert release.wait(60), "the test never released the writer"

    with faults.armed({"data.write.before": faults.FaultSpec(hold, nth=0)}):
        try:
            yield release
        finally:
            release.set()


def leftovers(root: Path) -> list[Path]:
    """Anything saves left under the step directories besides the committed checkpoints' manifest and data."""
    found = []
    for step in root.glob("step-*"):
        manifest = step / "manifest.json"
        keep = {"manifest.json", json.loads(manifest.read_text())["save_id"]} if manifest.exists() else set()
        found += [path for path in step.iterdir() if path.name not in keep] or ([] if keep else [step])
    return found


def run_script(script: str, directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new interpreter with ``directory`` and ``args`` as its arguments; it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", script, str(directory), *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    return result


def test_the_checkpoint_holds_the_values_of_the_moment_of_the_call(tmp_path: Path) -> None:
    state = make_state()
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: a tensor written in several chunks
    small = [torch.full((7,), float(i)) for i in range(300)]
    state["extra"] = {"big": big, "small": small}
    expected = tensors_of(state)
    expected_big, expected_small = big.clone(), [t.clone() for t in small]
    with safepoint.CheckpointManager(tmp_path) as manager:
        handle = manager.save(5, state, blocking=False)
        # the training loop goes on at once: every tensor changes before the writer is done
        for parameter in state["model"].parameters():
            parameter.data.add_(1.0)
        for value in state["optimizer"].state.values():
            value["exp_avg"].mul_(-3)
        big.zero_()
        for t in small:
            t.fill_(-1)
        info = handle.result(timeout=60)
    assert info.step == 5
    fresh = make_state(seed=99)
    fresh["extra"] = {"big": torch.empty_like(big), "small": [torch.empty(7) for _ in range(300)]}
    with safepoint.CheckpointManager(tmp_path) as manager:
        report = manager.restore(fresh)
    assert report is not None
    assert report.step == 5
    assert tensors_of(fresh).keys() == expected.keys()
    for key, value in tensors_of(fresh).items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(fresh["extra"]["big"], expected_big)
    assert all(torch.equal(a, b) for a, b in zip(fresh["extra"]["small"], expected_small, strict=True))


def test_latest_step_and_retention_move_only_once_the_save_is_durable(tmp_path: Path, gate: threading.Event) -> None:
    with safepoint.CheckpointManager(tmp_path, keep_last=1) as manager:
        gate.set()
        manager.save(1, {"x": torch.ones(4)})
        gate.clear()
        handle = manager.save(2, {"x": torch.full((4,), 2.0)}, blocking=False)
        assert not handle.done()
        assert manager.latest_step() == 1  # step 2 is not durable yet
        assert manager.steps() == [1]  # and retention has not removed step 1 for it
        gate.set()
        assert handle.result(timeout=60).step == 2
        assert manager.steps() == [2]
        assert safepoint.verify(tmp_path).ok


def _fsync_fails() -> Any:
    return faults.armed({"data.fsync.before": "eio"})


def test_a_background_failure_is_raised_at_the_next_save_once_with_its_cause(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with _fsync_fails() as specs:
            handle = manager.save(1, {"x": torch.ones(4)}, blocking=False)
            while not handle.done():
                handle._wait()
        assert specs["data.fsync.before"].hits == 1
        with pytest.raises(safepoint.BackgroundSaveError, match="step 1") as caught:
            manager.save(2, {"x": torch.ones(4)}, blocking=False)
        assert caught.value.step == 1
        assert caught.value.errno == errno.EIO
        assert isinstance(caught.value.__cause__, OSError)
        assert caught.value.__cause__.errno == errno.EIO
        # reported once: the next calls go on, and nothing of step 1 is visible or left behind
        manager.save(2, {"x": torch.ones(4)}, blocking=False)
        manager.wait()
        manager.wait()
        assert manager.steps() == [2]
    assert not (tmp_path / "step-000000000001").exists()
    assert leftovers(tmp_path) == []


def test_a_background_failure_is_raised_at_wait(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with _fsync_fails():
            manager.save(3, {"x": torch.ones(4)}, blocking=False)
            with pytest.raises(safepoint.BackgroundSaveError) as caught:
                manager.wait()
        assert isinstance(caught.value.__cause__, OSError)
        manager.wait()  # once only
        assert manager.steps() == []


def test_a_background_failure_is_raised_at_close_once(tmp_path: Path) -> None:
    manager = safepoint.CheckpointManager(tmp_path)
    with _fsync_fails():
        manager.save(3, {"x": torch.ones(4)}, blocking=False)
        with pytest.raises(safepoint.BackgroundSaveError):
            manager.close()
    manager.close()
    assert manager.closed
    assert leftovers(tmp_path) == []


def test_the_body_error_wins_and_the_background_failure_becomes_a_note(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    with _fsync_fails(), pytest.raises(Boom) as caught, safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(3, {"x": torch.ones(4)}, blocking=False)
        raise Boom("the real error")
    assert manager.closed
    if sys.version_info >= (3, 11):
        assert any("background save of step 3" in note for note in caught.value.__notes__)


def test_result_raises_the_failure_itself_and_the_manager_does_not_repeat_it(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with _fsync_fails():
            handle = manager.save(3, {"x": torch.ones(4)}, blocking=False)
            with pytest.raises(OSError, match="injected") as caught:
                handle.result(timeout=60)
        assert caught.value.errno == errno.EIO
        manager.wait()
        manager.save(4, {"x": torch.ones(4)})
        assert manager.steps() == [4]


def test_a_new_save_waits_for_the_one_in_flight_by_default(tmp_path: Path, gate: threading.Event) -> None:
    timer = threading.Timer(0.3, gate.set)
    with safepoint.CheckpointManager(tmp_path) as manager:
        first = manager.save(1, {"x": torch.ones(4)}, blocking=False)
        timer.start()
        second = manager.save(2, {"x": torch.ones(4)}, blocking=False)
        assert first.done()  # save returned only after the first one finished
        second.result(timeout=60)
        assert manager.steps() == [1, 2]
    timer.join()


def test_max_in_flight_lets_saves_overlap(tmp_path: Path, gate: threading.Event) -> None:
    with safepoint.CheckpointManager(tmp_path, max_in_flight=2) as manager:
        first = manager.save(1, {"x": torch.ones(4)}, blocking=False)
        second = manager.save(2, {"x": torch.ones(4)}, blocking=False)
        assert not first.done()
        assert not second.done()
        with pytest.raises(safepoint.CheckpointExistsError, match="step 2 is already being saved"):
            manager.save(2, {"x": torch.ones(4)}, blocking=False)
        gate.set()
        manager.wait()
        assert manager.steps() == [1, 2]


def test_a_blocking_save_waits_for_background_saves_first(tmp_path: Path, gate: threading.Event) -> None:
    timer = threading.Timer(0.3, gate.set)
    with safepoint.CheckpointManager(tmp_path, keep_last=1) as manager:
        first = manager.save(1, {"x": torch.ones(4)}, blocking=False)
        timer.start()
        manager.save(2, {"x": torch.ones(4)})
        assert first.done()
        assert manager.steps() == [2]  # step 1 committed first, then retention removed it after step 2
    timer.join()


def test_close_finishes_the_saves_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    timer = threading.Timer(0.3, gate.set)
    manager = safepoint.CheckpointManager(tmp_path)
    handle = manager.save(1, {"x": torch.ones(4)}, blocking=False)
    timer.start()
    manager.close()
    assert handle.done()
    assert handle.result().step == 1
    assert safepoint.verify(tmp_path).ok
    timer.join()


def test_a_committed_step_is_reported_once_verified(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(4)})
        manager.save(1, {"x": torch.zeros(4)}, blocking=False)
        with pytest.raises(safepoint.BackgroundSaveError) as caught:
            manager.wait()
    cause = caught.value.__cause__
    assert isinstance(cause, safepoint.CheckpointExistsError)
    assert cause.verified is True
    assert torch.equal(safepoint.load(tmp_path / "step-000000000001")["x"], torch.ones(4))


def test_invalid_state_is_refused_at_the_call_and_nothing_is_pending(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with pytest.raises(safepoint.InvalidStateError, match="bad"):
            manager.save(1, {"bad": object()}, blocking=False)
        with pytest.raises(safepoint.ConfigError, match="metric"):
            manager.save(1, {"x": torch.ones(1)}, metrics={"loss": "low"}, blocking=False)  # type: ignore[dict-item]
        manager.wait()
        assert manager.steps() == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "value"), [("max_staging_bytes", 0), ("max_staging_bytes", 1.5),
                                               ("max_in_flight", 0), ("max_in_flight", True)])  # fmt: skip
def test_bad_options_are_config_errors(tmp_path: Path, option: str, value: object) -> None:
    with pytest.raises(safepoint.ConfigError, match=option):
        safepoint.CheckpointManager(tmp_path, **{option: value})


def test_staging_buffers_are_reused_between_saves(tmp_path: Path) -> None:
    state = {"w": [torch.randn(256, 256) for _ in range(4)], "b": torch.randn(1000)}
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, state, blocking=False).result(timeout=60)
        pool = manager._saver.background.pool
        first = pool.allocations
        for step in (2, 3):
            manager.save(step, state, blocking=False).result(timeout=60)
        assert first == 1  # five tensors, one staging segment
        assert pool.allocations == first
        assert pool.lent == 0


def test_a_budget_smaller_than_the_state_streams_and_keeps_the_snapshot(tmp_path: Path) -> None:
    budget = 1 << 20
    tensors = [torch.full((100, 1000), float(i)) for i in range(30)]  # 400 kB each, 12 MB in all
    tensors.append(torch.arange(600_000, dtype=torch.float64))  # one piece larger than the budget
    expected = [t.clone() for t in tensors]
    with safepoint.CheckpointManager(tmp_path, max_staging_bytes=budget) as manager:
        handle = manager.save(1, {"t": tensors}, blocking=False)
        for t in tensors:
            t.fill_(-7)
        handle.result(timeout=60)
        pool = manager._saver.background.pool
        assert pool.peak <= 600_000 * 8  # never more than the budget, or the one oversized piece alone
        assert pool.lent == 0
    loaded = safepoint.load(tmp_path / "step-000000000001")["t"]
    assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))


def test_a_writer_failure_while_the_snapshot_streams_is_raised_by_that_save(tmp_path: Path) -> None:
    tensors = [torch.full((100, 1000), float(i)) for i in range(30)]
    with safepoint.CheckpointManager(tmp_path, max_staging_bytes=1 << 20) as manager:
        with faults.armed({"data.write.before": "eio"}), pytest.raises(OSError, match="injected") as caught:
            manager.save(1, {"t": tensors}, blocking=False)
        assert caught.value.errno == errno.EIO
        manager.wait()  # already reported by save
        assert manager._saver.background.pool.lent == 0
        assert manager.steps() == []
    assert leftovers(tmp_path) == []


EXITS_WITH_A_SAVE_IN_FLIGHT = """
import sys, torch, safepoint
manager = safepoint.CheckpointManager(sys.argv[1])
state = {"w": [torch.full((1024, 1024), float(i)) for i in range(32)]}   # 128 MiB
manager.save(7, state, blocking=False)
print("returned", flush=True)
# no wait(), no close(): the interpreter exits with the save in flight
"""


@pytest.mark.parametrize("ending", ["", "manager.close()"])
def test_the_interpreter_exits_with_a_save_in_flight_and_finishes_it(tmp_path: Path, ending: str) -> None:
    """Without close(), the exit hook finishes the save and warns; with it, nothing is left to do. Either way the
    process exits cleanly: a save thread alive during finalization used to abort it (SIGABRT) now and then."""
    result = run_script(EXITS_WITH_A_SAVE_IN_FLIGHT + ending, tmp_path)
    assert result.stdout.strip() == "returned"
    warned = "finishing the background save of step 7 at interpreter exit" in result.stderr
    assert warned is (not ending)
    assert safepoint.verify(tmp_path).ok
    loaded = safepoint.load(tmp_path / "step-000000000007")["w"]
    assert [float(t[0, 0]) for t in loaded] == [float(i) for i in range(32)]
    assert leftovers(tmp_path) == []


SAVES_AFTER_THE_MAIN_THREAD_RETURNED = """
import errno, sys, threading, time, torch, safepoint
from safepoint import _faults as faults

manager = safepoint.CheckpointManager(sys.argv[1], keep_last=5)
manager.save(1, {"w": torch.ones(4)}, blocking=False).result(timeout=60)   # the exit hook is registered

def disk_full(name):
    raise OSError(errno.ENOSPC, "No space left on device")

def train():
    time.sleep(1.0)   # the main thread has returned: the exit hook has run, the interpreter waits for this thread
    state = {"w": [torch.full((1024, 1024), float(i)) for i in range(32)]}   # 128 MiB
    handle = manager.save(2, state, blocking=False)
    if sys.argv[2] == "fails":   # the next save fails in its write, and nobody waits for it
        handle.result(timeout=60)
        with faults.armed({"data.write.before": faults.FaultSpec(disk_full)}):
            manager.save(3, {"w": torch.ones(4)}, blocking=False)
            time.sleep(2.0)
    print("train returns", flush=True)

threading.Thread(target=train).start()
print("main returns", flush=True)
"""


@pytest.mark.parametrize("then", ["succeeds", "fails"])
def test_a_save_started_after_the_main_thread_returned_is_finished_and_its_failure_logged(
    tmp_path: Path, then: str
) -> None:
    """A training loop on a thread of its own saves after the main thread returned, so after the exit hook ran.
    Its save ran on a kept daemon thread that the interpreter cut off at finalization: step 2 was lost, exit code
    0, no word. A failure of such a save has no hook left to report it: it is logged."""
    result = run_script(SAVES_AFTER_THE_MAIN_THREAD_RETURNED, tmp_path, then)
    assert result.stdout.split() == ["main", "returns", "train", "returns"]
    assert safepoint.CheckpointManager(tmp_path).steps() == [1, 2]
    assert safepoint.verify(tmp_path).ok
    loaded = safepoint.load(tmp_path / "step-000000000002")["w"]
    assert [float(t[0, 0]) for t in loaded] == [float(i) for i in range(32)]
    failure = "the background save of step 3 failed" in result.stderr and "No space left on device" in result.stderr
    assert failure is (then == "fails")


DROPS_ITS_MANAGER_WITH_A_SAVE_IN_FLIGHT = """
import gc, sys, torch, safepoint
def main():
    manager = safepoint.CheckpointManager(sys.argv[1])
    state = {"w": [torch.full((1024, 1024), float(i)) for i in range(32)]}   # 128 MiB
    manager.save(7, state, blocking=False)
    print("returned", flush=True)
main()
gc.collect()
# nothing refers to the manager any more, and its save is still in flight
"""


def test_a_save_in_flight_is_finished_at_exit_when_nothing_refers_to_its_manager(tmp_path: Path) -> None:
    """A manager local to a main() that returned is collected with its save in flight: the exit hook must still
    find the save (it used to find only managers still alive), or the save thread aborted the interpreter or was
    cut off at finalization, and the checkpoint was lost."""
    result = run_script(DROPS_ITS_MANAGER_WITH_A_SAVE_IN_FLIGHT, tmp_path)
    assert "terminate called" not in result.stderr
    assert result.stdout.strip() == "returned"
    assert "finishing the background save of step 7 at interpreter exit" in result.stderr
    assert safepoint.verify(tmp_path).ok
    loaded = safepoint.load(tmp_path / "step-000000000007")["w"]
    assert [float(t[0, 0]) for t in loaded] == [float(i) for i in range(32)]
    assert leftovers(tmp_path) == []


def test_the_exit_hook_keeps_no_finished_save_of_a_manager_nobody_closed(tmp_path: Path) -> None:
    """The exit hook holds every save until its manager joins it; a manager dropped without close() never does,
    so its successful saves are forgotten when the next save starts (a failed one stays, for the hook to log)."""
    from safepoint import _writer

    dropped = []
    for step in range(3):
        manager = safepoint.CheckpointManager(tmp_path / f"dropped{step}")
        dropped.append(manager.save(step, {"w": torch.ones(10)}, blocking=False))
        dropped[-1].result(timeout=60)
        del manager  # never closed: nothing tells the registry that its saves were seen
    assert all(any(held is handle for held in _writer._saves) for handle in dropped[-1:])
    with safepoint.CheckpointManager(tmp_path / "last") as manager:
        manager.save(9, {"w": torch.ones(10)}, blocking=False).result(timeout=60)
    kept = [handle for handle in _writer._saves if any(handle is d for d in dropped)]
    assert kept == []


def save_threads(manager: safepoint.CheckpointManager, steps: list[int]) -> list[threading.Thread]:
    """The thread each background save of ``steps`` ran its attempt on (waited for, one after the other)."""
    seen: list[threading.Thread] = []

    def record(name: str) -> None:
        seen.append(threading.current_thread())

    with faults.armed({"save.begin": faults.FaultSpec(record, 0)}):
        for step in steps:
            manager.save(step, {"x": torch.full((4,), float(step))}, blocking=False).result(timeout=60)
    return seen


def test_background_saves_run_on_one_writer_thread_kept_between_saves_and_managers(tmp_path: Path) -> None:
    """save(blocking=False) hands the save to the thread of the last one instead of starting a thread (and
    waiting for it to be scheduled) every time; a closed manager's thread serves the next manager."""
    with safepoint.CheckpointManager(tmp_path / "a", keep_last=1) as manager:
        seen = save_threads(manager, [1, 2, 3])
        assert manager.steps() == [3]
    assert len(seen) == 3
    assert seen[1] is seen[0]
    assert seen[2] is seen[0]
    assert seen[0] is not threading.current_thread()
    assert seen[0].name == "safepoint-writer"
    assert seen[0].daemon
    assert seen[0].is_alive()  # idle, waiting for the next save
    with safepoint.CheckpointManager(tmp_path / "b") as other:
        (later,) = save_threads(other, [4])
    assert later is seen[0]


def test_with_room_for_two_a_save_starts_while_the_one_before_it_is_held(tmp_path: Path) -> None:
    """Saves in flight at the same time run side by side, each on a writer thread of its own: the second one
    begins while the first is held inside its write."""
    release, second_began = threading.Event(), threading.Event()

    def hold(name: str) -> None:
        assert release.wait(60), "the test never released the writer"

    with (
        faults.armed(
            {
                "data.write.before": faults.FaultSpec(hold, nth=1),
                "save.begin": faults.FaultSpec(lambda name: second_began.set(), nth=2),
            }
        ),
        safepoint.CheckpointManager(tmp_path, max_in_flight=2) as manager,
    ):
        try:
            first = manager.save(1, {"x": torch.ones(4)}, blocking=False)
            second = manager.save(2, {"x": torch.ones(4)}, blocking=False)
            assert second_began.wait(30)
            assert not first.done()
        finally:
            release.set()
        assert first.result(timeout=60).step == 1
        assert second.result(timeout=60).step == 2
        assert manager.steps() == [1, 2]


WRITERS_AT_EXIT = """
import atexit, sys, threading, torch, safepoint
from safepoint import _faults as faults

def writers_left():   # plain atexit hooks run after threading's, just before the interpreter finalizes
    print("writers left", sum(t.name == "safepoint-writer" and t.is_alive() for t in threading.enumerate()), flush=True)

atexit.register(writers_left)
second_began = threading.Event()
hold = faults.FaultSpec(lambda name: second_began.wait(60), nth=1)   # the first save waits for the second
with faults.armed({"data.write.before": hold, "save.begin": faults.FaultSpec(lambda name: second_began.set(), nth=2)}):
    manager = safepoint.CheckpointManager(sys.argv[1], max_in_flight=2)
    manager.save(1, {"w": torch.ones(1 << 20)}, blocking=False)
    manager.save(2, {"w": torch.ones(1 << 20)}, blocking=False)
    manager.wait()
print("writers idle", sum(t.name == "safepoint-writer" for t in threading.enumerate()), flush=True)
"""


def test_the_exit_hook_ends_every_writer_thread_before_the_interpreter_finalizes(tmp_path: Path) -> None:
    """A thread that runs while the interpreter finalizes can abort it; idle writer threads are ended and
    joined by the exit hook."""
    result = run_script(WRITERS_AT_EXIT, tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0] == "writers idle 2"  # two saves were in flight at once: two threads
    assert lines[1] == "writers left 0"
    assert safepoint.verify(tmp_path).ok


FORKED_CHILD_SAVES = """
import os, sys, threading, torch, safepoint
from safepoint import _faults as faults

held = sys.argv[2] == "held"   # the parent's save is in flight at the fork, else done (its thread idle)
reached, release = threading.Event(), threading.Event()

def hold(name):
    reached.set()
    release.wait(120)

with faults.armed({"data.write.before": faults.FaultSpec(hold)} if held else {}):
    manager = safepoint.CheckpointManager(sys.argv[1], keep_last=5)
    handle = manager.save(1, {"x": torch.ones(4)}, blocking=False)
    assert reached.wait(60) if held else handle.result(timeout=60)
    pid = os.fork()
    if pid == 0:   # no thread of the parent is here, and its save is not the child's: the child's must not wait
        try:
            manager.save(2, {"x": torch.full((4,), 2.0)}, blocking=False).result(timeout=30)
            manager.close()
        except BaseException as err:
            print("child:", repr(err), flush=True)
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    release.set()
    handle.result(timeout=60)
    manager.save(3, {"x": torch.full((4,), 3.0)}, blocking=False).result(timeout=60)   # the parent's threads serve
    manager.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("parent", ["idle", "held"])
def test_a_forked_child_saves_in_the_background_on_a_thread_of_its_own(tmp_path: Path, parent: str) -> None:
    """A forked child has none of its parent's writer threads: its save starts its own. With the parent's save in
    flight at the fork ("held"), the child's manager used to wait for that save, which no thread of the child
    would ever finish: a hang."""
    result = run_script(FORKED_CHILD_SAVES, tmp_path, parent)
    assert result.stdout.strip() == "child exit 0"
    assert safepoint.verify(tmp_path).ok
    assert [float(safepoint.load(tmp_path / f"step-00000000000{s}")["x"][0]) for s in (1, 2, 3)] == [1.0, 2.0, 3.0]


DATALOADER_DURING_A_SAVE = """
import sys, threading, time, torch, safepoint
from safepoint import _faults as faults
from torch.utils.data import DataLoader

release = threading.Event()
with faults.armed({"data.write.before": faults.FaultSpec(lambda name: release.wait(120), nth=1)}):
    manager = safepoint.CheckpointManager(sys.argv[1])
    handle = manager.save(1, {"w": torch.arange(1000.0)}, blocking=False)   # held in flight by the fault
    started = time.monotonic()
    batches = list(DataLoader(list(range(8)), batch_size=2, num_workers=2))   # forks 2 workers, which exit at the end
    print(f"epoch {time.monotonic() - started:.2f}", flush=True)
    assert not handle.done()
    release.set()
    handle.result(timeout=60)
manager.close()
print("batches", len(batches), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_dataloader_workers_forked_during_a_background_save_exit_at_once(tmp_path: Path) -> None:
    """A worker forked while a save is in flight inherits the exit hook but not the save's thread: its exit used
    to wait for the parent's save forever, until the DataLoader killed it after 5 s (MP_STATUS_CHECK_INTERVAL)."""
    from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

    result = run_script(DATALOADER_DURING_A_SAVE, tmp_path)
    assert "finishing the background save" not in result.stderr  # no worker waited for the parent's save
    lines = result.stdout.split()
    assert lines[-2:] == ["batches", "4"]
    assert float(lines[1]) < MP_STATUS_CHECK_INTERVAL - 1
    assert safepoint.verify(tmp_path).ok
    assert torch.equal(safepoint.load(tmp_path / "step-000000000001")["w"], torch.arange(1000.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_in_pinned_buffers_and_snapshotted(tmp_path: Path) -> None:  # pragma: no cover
    tensors = [torch.full((1024, 1024), float(i), device="cuda") for i in range(8)]
    expected = [t.cpu() for t in tensors]
    with safepoint.CheckpointManager(tmp_path) as manager:
        handle = manager.save(1, {"t": tensors}, blocking=False)
        for t in tensors:
            t.fill_(-1)
        handle.result(timeout=60)
        pool = manager._saver.background.pool
        assert all(key[1] for key in pool._free if pool._free[key])  # pinned
    loaded = safepoint.load(tmp_path / "step-000000000001")["t"]
    assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))


BEFORE_PUBLISH = faults.POINTS[: faults.POINTS.index("commit.publish.before") + 1]


@pytest.mark.parametrize("point", BEFORE_PUBLISH)
def test_an_io_error_at_any_point_before_publication_surfaces_once_and_leaves_nothing(
    tmp_path: Path, point: str
) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(4)})
        with faults.armed({point: "eio"}) as specs:
            manager.save(2, {"x": torch.ones(4), "y": [torch.ones(3)] * 3}, blocking=False)
            with pytest.raises(safepoint.BackgroundSaveError) as caught:
                manager.wait()
        assert specs[point].hits == 1
        assert caught.value.errno == errno.EIO
        manager.wait()
        assert manager.steps() == [1]
        manager.save(2, {"x": torch.ones(4)}, blocking=False).result(timeout=60)  # a retry works
        assert manager.steps() == [1, 2]
    assert leftovers(tmp_path) == []
    assert safepoint.verify(tmp_path).ok


def test_an_error_after_publication_is_ambiguous_and_the_step_stays_complete(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with faults.armed({"commit.publish.after": "eio"}):
            manager.save(2, {"x": torch.ones(4)}, blocking=False)
            with pytest.raises(safepoint.BackgroundSaveError) as caught:
                manager.wait()
        assert isinstance(caught.value.__cause__, safepoint.AmbiguousCommitError)
        assert manager.steps() == [2]
    assert safepoint.verify(tmp_path).ok


def test_every_kind_of_leaf_round_trips_through_staging(tmp_path: Path) -> None:
    import numpy as np

    state: dict[str, Any] = {
        "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "f64": torch.randn(7, dtype=torch.float64),
        "c64": torch.randn(3, dtype=torch.complex64),
        "i8": torch.arange(-5, 6, dtype=torch.int8),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "strided": torch.arange(24.0).reshape(4, 6).t(),
        "conj": torch.randn(4, dtype=torch.complex64).conj(),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "npscalar": np.float32(2.5),
        "pickled": safepoint.Pickled({"a": 1}),
        "meta": {"step": 9, "name": "run"},
    }
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    expected["conj"] = state["conj"].resolve_conj()
    with safepoint.CheckpointManager(tmp_path) as manager:
        handle = manager.save(1, state, blocking=False)
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() and not value.is_conj():
                value.zero_()
        state["array"][...] = 0
        handle.result(timeout=60)
    loaded = safepoint.load(tmp_path / "step-000000000001", allow_pickle=["pickled"])
    for key in ("bool", "bf16", "f64", "c64", "i8", "scalar", "empty", "strided", "conj"):
        assert loaded[key].dtype == expected[key].dtype, key
        assert torch.equal(loaded[key], expected[key]), key
    assert loaded["array"].dtype == np.int16
    assert np.array_equal(loaded["array"], np.arange(6, dtype=np.int16).reshape(2, 3))
    assert loaded["npscalar"] == np.float32(2.5)
    assert loaded["pickled"] == {"a": 1}
    assert loaded["meta"] == {"step": 9, "name": "run"}


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
def test_background_writers_yield_the_cpu_and_the_caller_keeps_its_priority(tmp_path: Path) -> None:
    import os

    from safepoint._writer import BACKGROUND_NICENESS

    seen: list[int] = []

    def record(name: str) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with (
        safepoint.CheckpointManager(tmp_path) as manager,
        faults.armed({"data.write.before": faults.FaultSpec(record, 0)}),
    ):
        manager.save(1, {"a": torch.ones(4), "b": [torch.ones(3)] * 2}, blocking=False).result(timeout=60)
    assert seen
    assert set(seen) == {max(before, BACKGROUND_NICENESS)}  # the file writers inherit it from the save thread
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_a_background_save_with_per_rank_entries_writes_the_per_rank_layout(tmp_path: Path) -> None:
    # issue 12: the one pipeline has a background path for PerRank entries too (this was refused before)
    with safepoint.CheckpointManager(tmp_path) as manager:
        state = {"w": torch.ones(4), "rng": safepoint.PerRank({"seed": 3, "t": torch.full((2,), 3.0)})}
        handle = manager.save(0, state, blocking=False)
        state["w"].add_(1.0)  # staged: the checkpoint holds the values of the moment of the call
        state["rng"].value["t"].add_(1.0)
        assert handle.result(timeout=60).step == 0
        live = {"w": torch.zeros(4), "rng": safepoint.PerRank({"seed": 0, "t": torch.zeros(2)})}
        report = manager.restore(live)
    assert report is not None
    assert torch.equal(live["w"], torch.ones(4))
    assert live["rng"].value["seed"] == 3
    assert torch.equal(live["rng"].value["t"], torch.full((2,), 3.0))
    names = sorted(path.name for path in (tmp_path / "step-000000000000").glob("*/*.safetensors"))
    assert names == ["r00000-own-00000.safetensors", "r00000-rep-00000.safetensors"]


def _segments(manager: safepoint.CheckpointManager) -> list[Any]:
    plan = manager._saver.background._copy_plan
    assert plan is not None
    return plan.segments


def test_a_copy_from_the_addresses_of_the_last_save_goes_through_views_and_holds_the_values_of_its_call(
    tmp_path: Path,
) -> None:
    """From the second save on, the copy of a dict of dense tensors at the addresses of the last save goes
    through views of those extents; a tensor replaced by another of its shape (the old one alive, holding other
    values) is copied from its new address, never through a view of the old one."""
    state = {"t": {f"w{i}": torch.full((5, 7), float(i)) for i in range(40)}}
    kept = state["t"]["w3"]  # stays alive at its address, with values the checkpoint must not hold
    with safepoint.CheckpointManager(tmp_path, max_in_flight=1) as manager:
        manager.save(1, state, blocking=False).result(timeout=60)  # encoded afresh: copied tensor by tensor
        manager.save(2, state, blocking=False).result(timeout=60)  # a hit: copied by address, then viewed
        segments = _segments(manager)
        assert all(segment.views is not None for segment in segments)
        viewed = segments[0].views
        manager.save(3, state, blocking=False).result(timeout=60)  # through the views
        assert segments[0].views is viewed
        state["t"]["w3"] = torch.full((5, 7), -3.0)  # the same structure, another address
        handle = manager.save(4, state, blocking=False)
        for tensor in state["t"].values():
            tensor.fill_(99.0)  # after save() returned: no save holds these
        handle.result(timeout=60)
        assert segments[0].views[0] == tuple(tensor.data_ptr() for tensor in state["t"].values())  # viewed anew
        for step in (3, 4):
            values, _ = manager.load(step)
            for i in range(40):
                want = -3.0 if (step, i) == (4, 3) else float(i)
                assert torch.equal(values["t"][f"w{i}"], torch.full((5, 7), want)), (step, i)
    assert torch.equal(kept, torch.full((5, 7), 3.0))  # the old w3 kept its values all along


def test_views_that_cannot_be_made_leave_the_save_and_the_next_copy_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views are an optimisation: failing to make them never fails a save, and the next copy goes by address."""
    from safepoint import _writer

    def refuse(unviewed: Any) -> None:
        raise MemoryError("no room for views")

    monkeypatch.setattr(_writer, "_views", refuse)
    state = {"t": {f"w{i}": torch.full((3,), float(i)) for i in range(10)}}
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (1, 2):
            manager.save(step, state, blocking=False).result(timeout=60)
        assert all(segment.views is None for segment in _segments(manager))
        manager.save(3, state, blocking=False).result(timeout=60)
        values, _ = manager.load(3)
    for i in range(10):
        assert torch.equal(values["t"][f"w{i}"], torch.full((3,), float(i)))
