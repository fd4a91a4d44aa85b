"""The reliability suite: each function runs one kind of trial many times and returns a :class:`Result`.

pytest (tests/reliability/test_reliability.py) runs every suite at the ``quick`` scale and requires zero
failures; ``scripts/reliability.py`` runs them at the ``full`` scale and prints the table published in
docs/reliability.md. The harness's own ability to fail is shown by deliberately broken writers (a non-atomic
writer for kill -9, a storage that drops fsyncs for power loss), which must be caught.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import torch

import safepoint
from safepoint import CheckpointExistsError, CheckpointManager
from safepoint import _faults as faults
from safepoint._errors import AmbiguousCommitError, SafepointError
from safepoint._faults import FaultSpec
from safepoint._layout import MANIFEST_NAME, step_dir
from safepoint._storage import LocalStorage, Storage
from tests.reliability.storage import (
    KINDS,
    FaultyStorage,
    ForgetfulStorage,
    PowerLossStorage,
    SimulatedCrash,
)
from tests.reliability.workload import check_directory, leftovers, state_for, tree_size

__all__ = ["SCALES", "Result", "run_all"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    name: str
    trials: int = 0
    failures: int = 0
    figure: str = ""
    examples: list[str] = field(default_factory=list)  # the first few failures, for the report
    skipped: str = ""

    def fail(self, trial: str, problems: list[str]) -> None:
        self.failures += 1
        if len(self.examples) < 5:
            self.examples.append(f"{trial}: {'; '.join(problems)[:600]}")


@dataclass(frozen=True)
class Scale:
    kill_random: int
    kill_point_nths: tuple[int, ...]
    subprocess_points: int
    non_atomic: int
    power_modes: tuple[str, ...]
    concurrent: int
    writers: int
    two_managers: int
    max_elements: int
    fuzz_examples: int


SCALES = {
    "quick": Scale(
        kill_random=25,
        kill_point_nths=(1,),
        subprocess_points=2,
        non_atomic=10,
        power_modes=("truncate",),
        concurrent=5,
        writers=3,
        two_managers=1,
        max_elements=1 << 14,
        fuzz_examples=300,
    ),
    "full": Scale(
        kill_random=1000,
        kill_point_nths=(1, 2, 3),
        subprocess_points=len(faults.POINTS),
        non_atomic=100,
        power_modes=("truncate", "garbage"),
        concurrent=200,
        writers=4,
        two_managers=10,
        max_elements=1 << 20,
        fuzz_examples=5000,
    ),
}


# -- forked writers ---------------------------------------------------------------------------------------------
class _Child:
    """A forked process that reports lines on a pipe. The parent always reaps it (killing it on a timeout)."""

    def __init__(self, target: Callable[[int], None]) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's stack
            code = 0
            try:
                os.close(read)
                torch.set_num_threads(1)
                target(write)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        self.pid, self.fd, self.lines, self._buffer = pid, read, list[str](), b""
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False at end of file."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return True
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines += [line.decode() for line in complete]
        return True

    def wait_for(self, prefix: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            if time.monotonic() > deadline or not self._read(deadline - time.monotonic()):
                return any(line.startswith(prefix) for line in self.lines)
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def finish(self, timeout: float) -> bool:
        """Read to the end and reap; False if the child had to be killed because it hung."""
        deadline = time.monotonic() + timeout
        hung = False
        while self._read(deadline - time.monotonic()):
            if time.monotonic() > deadline:
                hung = True
                self.kill()
                deadline = time.monotonic() + 30
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        self.status = status
        return not hung


def _say(fd: int, line: str) -> None:
    os.write(fd, line.encode() + b"\n")


@contextlib.contextmanager
def _children() -> Iterator[list[_Child]]:
    """Every child started in the block is killed and reaped when it ends, whatever happened."""
    started: list[_Child] = []
    try:
        yield started
    finally:
        for child in started:
            if child.status is None:
                child.kill()
                with contextlib.suppress(OSError):
                    os.close(child.fd)
                os.waitpid(child.pid, 0)
                child.status = -1


# -- kill -9 ----------------------------------------------------------------------------------------------------
def _writer(
    root: Path, point: str | None, nth: int, *, saves: int, max_elements: int, atomic: bool
) -> Callable[[int], None]:
    def run(fd: int) -> None:
        armed = faults.armed({point: FaultSpec("kill", nth)}) if point else contextlib.nullcontext()
        with armed:
            if atomic:
                _safepoint_loop(fd, root, saves, max_elements)
            else:
                _non_atomic_loop(fd, root, saves, max_elements)

    return run


def _safepoint_loop(fd: int, root: Path, saves: int, max_elements: int) -> None:
    with CheckpointManager(root, keep_last=3) as manager:
        steps = manager.steps()
        step = steps[-1] + 1 if steps else 0
        _say(fd, "R")
        for _ in range(saves):
            manager.save(step, state_for(step, max_elements))
            _say(fd, f"A {step}")
            step += 1


def _non_atomic_loop(fd: int, root: Path, saves: int, max_elements: int) -> None:
    """The deliberately broken writer: a correct checkpoint is made elsewhere, then copied straight into its final
    place, manifest first (as writers that 'simplified away' the temporary name do). A kill mid-copy leaves a
    visible, incomplete checkpoint, which the harness must report."""
    root.mkdir(parents=True, exist_ok=True)
    steps = sorted(int(p.name[5:]) for p in root.glob("step-*"))
    step = steps[-1] + 1 if steps else 0
    scratch = root.parent / f"scratch-{os.getpid()}"
    _say(fd, "R")
    for _ in range(saves):
        shutil.rmtree(scratch, ignore_errors=True)
        safepoint.save(scratch, state_for(step, max_elements), step=step)
        target = root / step_dir(step)
        files = [scratch / MANIFEST_NAME, *sorted(p for p in scratch.rglob("*.safetensors"))]
        for source in files:
            destination = target / source.relative_to(scratch)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as src, open(destination, "wb") as dst:
                while chunk := src.read(1 << 14):  # flushed as it goes, like a writer streaming to its final name
                    dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
        _say(fd, f"A {step}")
        step += 1


@dataclass(frozen=True)
class _Trial:
    killed: bool
    problems: list[str]


def _kill_trial(
    result: Result,
    root: Path,
    trial: str,
    *,
    point: str | None,
    nth: int,
    delay: float | None,
    scale: Scale,
    atomic: bool = True,
) -> _Trial:
    """One writer, one kill, then the checks."""
    saves = 1000 if delay is not None else 6
    with _children() as children:
        child = _Child(_writer(root, point, nth, saves=saves, max_elements=scale.max_elements, atomic=atomic))
        children.append(child)
        if delay is not None:
            child.wait_for("R", 120)
            time.sleep(delay)
            child.kill()
        finished = child.finish(120)
    acked = [int(line[2:]) for line in child.lines if line.startswith("A ")]
    problems = [] if finished else ["the writer hung"]
    problems += check_directory(root, acked, scale.max_elements)
    if atomic:
        CheckpointManager(root).close()  # opening collects what dead writers left
        problems += [f"not collected: {item}" for item in leftovers(root)]
        if point is None and os.WIFEXITED(child.status or 0) and delay is not None:
            problems.append("the writer exited on its own instead of being killed")
    result.trials += 1
    if problems:
        result.fail(trial, problems)
    status = child.status or 0
    return _Trial(killed=os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, problems=problems)


def kill_random(scale: Scale, work: Path, seed: int = 0) -> Result:
    result = Result("kill -9 at random moments")
    rng = random.Random(seed)
    root = work / "kill-random"
    for trial in range(scale.kill_random):
        if trial % 25 == 0:
            shutil.rmtree(root, ignore_errors=True)
        _kill_trial(result, root, f"trial {trial}", point=None, nth=1, delay=rng.uniform(0.0, 0.4), scale=scale)
    result.figure = "every visible checkpoint verified and held its values; newest ack present; staging collected"
    return result


def kill_points(scale: Scale, work: Path) -> Result:
    result = Result("kill -9 at every fault point")
    for point in faults.POINTS:
        for nth in scale.kill_point_nths:
            root = work / f"kill-{point}-{nth}"
            shutil.rmtree(root, ignore_errors=True)
            if point.startswith("gc."):  # gc needs something dead to collect: writers killed mid-write
                for _ in range(nth):
                    _kill_trial(result, root, "setup", point="data.write.after", nth=1, delay=None, scale=scale)
            status = _kill_trial(result, root, f"{point}@{nth}", point=point, nth=nth, delay=None, scale=scale)
            if not status.killed:
                result.fail(f"{point}@{nth}", ["the writer never reached the point: the trial tested nothing"])
    result.figure = f"{len(faults.POINTS)} points x nth {list(scale.kill_point_nths)}; same checks as above"
    return result


def kill_subprocess(scale: Scale, work: Path) -> Result:
    """A real ``python`` subprocess armed through SAFEPOINT_FAULTS, as users' CI would run it."""
    result = Result("kill -9 via SAFEPOINT_FAULTS (subprocess)")
    points = [p for p in faults.POINTS if not p.startswith("gc.")][: scale.subprocess_points]
    for point in points:
        root = work / f"subprocess-{point}"
        shutil.rmtree(root, ignore_errors=True)
        env = {
            **os.environ,
            "SAFEPOINT_FAULTS": f"{point}@1=kill",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        }
        command = [sys.executable, "-m", "tests.reliability.writer", str(root), "6", str(scale.max_elements)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        except subprocess.TimeoutExpired:
            result.trials += 1
            result.fail(point, ["the writer hung"])
            continue
        acked = [int(line[2:]) for line in done.stdout.splitlines() if line.startswith("A ")]
        problems = []
        if done.returncode != -signal.SIGKILL:
            problems.append(f"the writer was not killed at {point} (exit {done.returncode}): {done.stderr[-300:]}")
        problems += check_directory(root, acked, scale.max_elements)
        CheckpointManager(root).close()
        problems += [f"not collected: {item}" for item in leftovers(root)]
        result.trials += 1
        if problems:
            result.fail(point, problems)
    result.figure = "the environment variable arms the point in a fresh interpreter; same checks"
    return result


def non_atomic_is_caught(scale: Scale, work: Path, seed: int = 1) -> Result:
    """Inverted: a 'failure' here is a trial where the broken writer went unnoticed. Caught at least once = pass."""
    result = Result("harness self-test: non-atomic writer caught")
    rng = random.Random(seed)
    probe = Result("non-atomic writer")
    root = work / "non-atomic"
    for trial in range(scale.non_atomic):
        shutil.rmtree(root, ignore_errors=True)
        _kill_trial(probe, root, f"trial {trial}", point=None, nth=1, delay=rng.uniform(0.05, 0.4), scale=scale,
                    atomic=False)  # fmt: skip
    result.trials = probe.trials
    result.figure = f"the harness caught the broken writer in {probe.failures} of {probe.trials} trials"
    if probe.failures == 0:
        result.fail("all trials", ["the non-atomic writer was never caught: the harness cannot fail"])
    return result


# -- power loss -------------------------------------------------------------------------------------------------
def _dead_attempt(root: Path) -> None:
    """What a writer killed mid-save leaves: an attempt directory and its (unlocked) lock file."""
    attempt = "0" * 31 + "1"
    directory = root / step_dir(9) / attempt
    directory.mkdir(parents=True)
    (directory / "00000.safetensors").write_bytes(b"partial")
    (root / step_dir(9) / f"{attempt}.lock").write_bytes(b"")


def _power_scenario(
    work: Path, *, mode: str, crash_at: int | None, point: str | None, nth: int, broken: bool, max_elements: int
) -> tuple[PowerLossStorage, list[int]]:
    root = work / "root"
    shutil.rmtree(work, ignore_errors=True)
    root.mkdir(parents=True)
    _dead_attempt(root)
    recorder = PowerLossStorage(LocalStorage(root), work, mode=mode, crash_at=crash_at)
    storage: Storage = ForgetfulStorage(recorder) if broken else recorder
    acked: list[int] = []

    def crash(name: str) -> None:
        recorder.crash()

    armed = faults.armed({point: FaultSpec(crash, nth)}) if point else contextlib.nullcontext()
    with contextlib.suppress(SimulatedCrash), armed, CheckpointManager(storage, keep_last=2) as manager:
        for step in range(4):
            manager.save(step, state_for(step, max_elements))
            acked.append(step)
    if recorder.image is None:  # ran to the end: the power goes now
        with contextlib.suppress(SimulatedCrash):
            recorder.crash()
    return recorder, acked


def _check_image(recorder: PowerLossStorage, acked: list[int], max_elements: int) -> list[str]:
    assert recorder.image is not None
    problems = check_directory(recorder.image, acked, max_elements)
    CheckpointManager(recorder.image).close()
    return problems + [f"not collected: {item}" for item in leftovers(recorder.image)]


def _power_sweep(result: Result, work: Path, scale: Scale, *, broken: bool) -> None:
    elements = 1 << 12
    for mode in scale.power_modes:
        probe, _ = _power_scenario(work / "probe", mode=mode, crash_at=None, point=None, nth=1, broken=broken,
                                   max_elements=elements)  # fmt: skip
        trials: list[tuple[str, int | None, str | None, int]] = [
            (f"{mode}: after storage call {n}", n, None, 1) for n in range(1, probe.calls + 1)
        ]
        trials += [(f"{mode}: at {p}@{k}", None, p, k) for p in faults.POINTS for k in scale.kill_point_nths]
        for name, crash_at, point, nth in trials:
            recorder, acked = _power_scenario(work / "trial", mode=mode, crash_at=crash_at, point=point, nth=nth,
                                              broken=broken, max_elements=elements)  # fmt: skip
            problems = _check_image(recorder, acked, elements)
            result.trials += 1
            if problems:
                result.fail(name, problems)


def power_loss(scale: Scale, work: Path) -> Result:
    result = Result("power loss (unsynced data and entries dropped)")
    _power_sweep(result, work / "power", scale, broken=False)
    result.figure = f"crash after every storage call and at every fault point, modes {list(scale.power_modes)}"
    return result


def power_loss_is_caught(scale: Scale, work: Path) -> Result:
    result = Result("harness self-test: dropped fsyncs caught")
    probe = Result("forgetful storage")
    _power_sweep(probe, work / "forgetful", scale, broken=True)
    result.trials = probe.trials
    result.figure = f"a storage that drops every fsync lost acknowledged data in {probe.failures} of {probe.trials}"
    if probe.failures == 0:
        result.fail("all trials", ["dropping every fsync went unnoticed: the power-loss model cannot fail"])
    return result


# -- injected errors --------------------------------------------------------------------------------------------
def _counts(work: Path, elements: int) -> dict[str, int]:
    root = work / "count"
    shutil.rmtree(root, ignore_errors=True)
    with CheckpointManager(root) as manager:
        manager.save(0, state_for(0, elements))
    counter = FaultyStorage(LocalStorage(root))
    with CheckpointManager(counter, keep_last=1) as manager:
        manager.save(1, state_for(1, elements))
    return counter.counts


def _error_trial(work: Path, kind: str, nth: int, code: int, elements: int, *, point: str | None = None) -> list[str]:
    """Step 0 committed; step 1 saved with ``code`` injected at the nth call of ``kind`` (or, with ``point``, raised
    at that fault point); then retried."""
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    with CheckpointManager(root) as manager:
        manager.save(0, state_for(0, elements))
    storage = FaultyStorage(LocalStorage(root), None if point else kind, nth, code)
    action = {errno.EIO: "eio", errno.ENOSPC: "enospc"}[code]
    armed = faults.armed({point: FaultSpec(action, nth)} if point else {})
    problems: list[str] = []
    outcome = "saved"
    try:
        with armed as specs, CheckpointManager(storage, keep_last=1) as manager:
            manager.save(1, state_for(1, elements))
    except AmbiguousCommitError:
        outcome = "ambiguous"
    except SafepointError as err:
        outcome = "failed"
        if getattr(err, "errno", None) != code:
            problems.append(f"the error does not carry errno {errno.errorcode[code]}: {err!r}")
        if (root / step_dir(1) / MANIFEST_NAME).exists():
            problems.append("a failed save left step 1 visible")
        if code == errno.ENOSPC and leftovers(root):
            problems.append(f"staging space not given back: {leftovers(root)}")
    except OSError as err:
        if point is None:
            return [f"an OSError escaped unmapped: {err!r}"]
        # a fault point raises the bare OSError the system call would have: the save failed as it would
        outcome = "failed"
        if (root / step_dir(1) / MANIFEST_NAME).exists() and check_directory(root, [0, 1], elements) != []:
            problems.append(f"an error at {point} left step 1 visible but damaged")
        elif (root / step_dir(1) / MANIFEST_NAME).exists():
            outcome = "ambiguous"  # raised after the publish: step 1 is committed, and must be complete
    except Exception as err:  # any other type is exactly what the suite reports
        return [f"untyped error {type(err).__name__}: {err}"]
    if not (storage.fired or (point is not None and specs[point].hits >= nth)):
        return []
    problems += [p for p in check_directory(root, [0], elements) if "acknowledged" not in p]
    try:
        with CheckpointManager(root) as manager:
            manager.save(1, state_for(1, elements))
        if outcome != "failed":
            problems.append(f"retry after an {outcome} save wrote step 1 again")
    except CheckpointExistsError as err:
        if outcome == "failed":
            problems.append("a failed save left step 1 committed")
        elif err.verified is not True:
            problems.append(f"the retry did not verify the committed step 1: {err}")
    problems += check_directory(root, [0, 1], elements)
    CheckpointManager(root).close()
    problems += [f"not collected: {item}" for item in leftovers(root)]
    return problems


def _error_sweep(name: str, work: Path, kinds: tuple[str, ...], code: int, elements: int) -> Result:
    result = Result(name)
    counts = _counts(work, elements)
    for kind in kinds:
        for nth in range(1, counts[kind] + 1):
            problems = _error_trial(work, kind, nth, code, elements)
            result.trials += 1
            if problems:
                result.fail(f"{kind} #{nth}", problems)
    reached = ", ".join(f"{kind} x{counts[kind]}" for kind in kinds)
    result.figure = f"every call of one save: {reached}; nothing partial visible, retry correct"
    return result


def io_errors(scale: Scale, work: Path) -> Result:
    return _error_sweep("EIO at the n-th call of each kind", work / "eio", KINDS, errno.EIO, scale.max_elements)


def disk_full_injected(scale: Scale, work: Path) -> Result:
    kinds = ("write", "create", "fsync")
    return _error_sweep("ENOSPC at every write", work / "enospc", kinds, errno.ENOSPC, scale.max_elements)


def fault_point_errors(scale: Scale, work: Path) -> Result:
    """EIO raised at every fault point of a save with retention: whatever the point, what is visible is complete."""
    result = Result("EIO raised at every fault point")
    points = [p for p in faults.POINTS if not p.startswith("gc.")]
    for point in points:
        problems = _error_trial(work / "points", "", 1, errno.EIO, scale.max_elements, point=point)
        result.trials += 1
        if problems:
            result.fail(point, problems)
    result.figure = f"{len(points)} points of save and retention; nothing partial visible, retry correct"
    return result


def disk_full_tmpfs(scale: Scale, work: Path) -> Result:
    """A real 8 MiB tmpfs (needs root): a save that does not fit fails with ENOSPC and gives its space back."""
    result = Result("ENOSPC on a real 8 MiB tmpfs")
    mount = work / "tmpfs"
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        result.skipped = f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        return result
    try:
        problems: list[str] = []
        root = mount / "run"
        small = {"w": torch.randn(256 << 10)}  # 1 MiB
        with CheckpointManager(root) as manager:
            manager.save(0, small)
            before = os.statvfs(mount).f_bavail
            try:
                manager.save(1, {"w": torch.randn(4 << 20)})  # 16 MiB: cannot fit
                problems.append("a 16 MiB save into 8 MiB succeeded")
            except SafepointError as err:
                if getattr(err, "errno", None) != errno.ENOSPC:
                    problems.append(f"the error does not carry ENOSPC: {err!r}")
            after = os.statvfs(mount).f_bavail
            if after < before:
                problems.append(f"staging space not given back: {before - after} blocks still used")
            if not manager.verify().ok:
                problems.append("step 0 does not verify after the failed save")
            manager.save(2, small)  # the space really is free again
        problems += [f"left behind: {item}" for item in leftovers(root)]
        result.trials = 1
        if problems:
            result.fail("tmpfs", problems)
        result.figure = f"error carries ENOSPC; {tree_size(root)} bytes on the tmpfs afterwards = 2 checkpoints"
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    return result


# -- concurrency ------------------------------------------------------------------------------------------------
def _rival(root: Path, who: int, go: int) -> Callable[[int], None]:
    def run(fd: int) -> None:
        state = {"w": torch.full((1000 + who * 10,), float(who)), "who": who}
        with CheckpointManager(root) as manager:
            _say(fd, "R")
            os.read(go, 1)
            try:
                manager.save(7, state)
                _say(fd, "OK")
            except CheckpointExistsError as err:
                _say(fd, f"EXISTS {err.verified}")
            except SafepointError as err:
                _say(fd, f"ERR {type(err).__name__}: {err}")

    return run


def concurrent_same_step(scale: Scale, work: Path) -> Result:
    result = Result(f"{scale.writers} processes save the same step")
    for trial in range(scale.concurrent):
        root = work / "rivals"
        shutil.rmtree(root, ignore_errors=True)
        go_read, go_write = os.pipe()
        with _children() as children:
            for who in range(scale.writers):
                children.append(_Child(_rival(root, who, go_read)))
            for child in children:
                child.wait_for("R", 120)
            os.write(go_write, b"x" * scale.writers)
            hung = [c.pid for c in children if not c.finish(120)]
        os.close(go_read)
        os.close(go_write)
        outcomes = [c.lines[-1] if c.lines else "nothing" for c in children]
        problems = [f"writer {pid} hung" for pid in hung]
        winners = [who for who, line in enumerate(outcomes) if line == "OK"]
        if len(winners) != 1:
            problems.append(f"{len(winners)} writers succeeded: {outcomes}")
        problems += [f"unexpected outcome {line!r}" for line in outcomes if line not in ("OK", "EXISTS True")]
        if len(winners) == 1:
            saved = safepoint.load(root / step_dir(7))
            who = winners[0]
            if saved["who"] != who or not torch.equal(saved["w"], torch.full((1000 + who * 10,), float(who))):
                problems.append("the committed checkpoint is not entirely the winner's")
        result.trials += 1
        if problems:
            result.fail(f"trial {trial}", problems)
    result.figure = "exactly one succeeds; the others get CheckpointExistsError (verified); no mix, no hang"
    return result


def _saver(root: Path, steps: range, keep_last: int | None, max_elements: int) -> Callable[[int], None]:
    def run(fd: int) -> None:
        with CheckpointManager(root, keep_last=keep_last) as manager:
            for step in steps:
                manager.save(step, state_for(step, max_elements))
                _say(fd, f"A {step}")

    return run


def _inspector(root: Path, seconds: float) -> Callable[[int], None]:
    def run(fd: int) -> None:
        deadline = time.monotonic() + seconds
        with CheckpointManager(root) as manager:
            while time.monotonic() < deadline:
                manager.gc()
                for bad in manager.verify().bad:
                    _say(fd, f"BAD step {bad.step}: {bad.error}")
        _say(fd, "DONE")

    return run


def two_managers(scale: Scale, work: Path) -> Result:
    """Two savers (one with retention) and an inspector running gc and verify, all on one directory."""
    result = Result("two managers: save vs retention, gc, verify")
    for trial in range(scale.two_managers):
        root = work / "shared"
        shutil.rmtree(root, ignore_errors=True)
        CheckpointManager(root).close()
        with _children() as children:
            children.append(_Child(_saver(root, range(0, 40, 2), None, 1 << 12)))
            children.append(_Child(_saver(root, range(1, 40, 2), 3, 1 << 12)))
            children.append(_Child(_inspector(root, 4.0)))
            hung = [c.pid for c in children if not c.finish(180)]
        problems = [f"process {pid} hung" for pid in hung]
        acked = [int(line[2:]) for c in children[:2] for line in c.lines if line.startswith("A ")]
        if len(acked) != 40:
            problems.append(f"only {len(acked)} of 40 saves succeeded")
        problems += [line for line in children[2].lines if line.startswith("BAD")]
        problems += check_directory(root, acked, 1 << 12)
        result.trials += 1
        if problems:
            result.fail(f"trial {trial}", problems)
    result.figure = "every save succeeded; verify never saw a bad checkpoint; nothing valid lost"
    return result


# -- corruption -------------------------------------------------------------------------------------------------
def _flip(offset: Callable[[int], int]) -> Callable[[Path, Path], None]:
    def corrupt(path: Path, other: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset(len(data))] ^= 0x01
        path.write_bytes(bytes(data))

    return corrupt


def _truncate(size: Callable[[int], int]) -> Callable[[Path, Path], None]:
    def corrupt(path: Path, other: Path) -> None:
        os.truncate(path, size(path.stat().st_size))

    return corrupt


def _zero_page(offset: Callable[[int], int]) -> Callable[[Path, Path], None]:
    def corrupt(path: Path, other: Path) -> None:
        data = bytearray(path.read_bytes())
        start = offset(len(data)) // 4096 * 4096
        data[start : start + 4096] = bytes(len(data[start : start + 4096]))
        path.write_bytes(bytes(data))

    return corrupt


def _append(count: int) -> Callable[[Path, Path], None]:
    def corrupt(path: Path, other: Path) -> None:
        with open(path, "ab") as handle:
            handle.write(random.Random(count).randbytes(count))

    return corrupt


def _delete(path: Path, other: Path) -> None:
    path.unlink()


def _replace(path: Path, other: Path) -> None:
    path.write_bytes(other.read_bytes())


CORRUPTIONS: dict[str, Callable[[Path, Path], None]] = {
    "bit flip, first byte": _flip(lambda n: 0),
    "bit flip, byte 9": _flip(lambda n: min(9, n - 1)),
    "bit flip, middle": _flip(lambda n: n // 2),
    "bit flip, last byte": _flip(lambda n: n - 1),
    "truncated to 0 bytes": _truncate(lambda n: 0),
    "truncated to half": _truncate(lambda n: n // 2),
    "last 2 bytes cut": _truncate(lambda n: n - 2),  # the manifest's last byte is a newline: cutting it is no damage
    "first 4 KiB page zeroed": _zero_page(lambda n: 0),
    "middle 4 KiB page zeroed": _zero_page(lambda n: n // 2),
    "1 byte appended": _append(1),
    "4 KiB garbage appended": _append(4096),
    "deleted": _delete,
    "replaced by the previous step's": _replace,
}


def _live_model(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(64, 64), "progress": {"step": -seed}}


def _bits(state: dict[str, Any]) -> list[bytes]:
    return [t.detach().numpy().tobytes() for t in state["model"].state_dict().values()] + [
        repr(state["progress"]).encode()
    ]


def corruption(scale: Scale, work: Path) -> Result:
    result = Result("corruption of every kind of file")
    for kind in ("manifest", "payload"):
        for name, corrupt in CORRUPTIONS.items():
            root = work / "corrupt"
            shutil.rmtree(root, ignore_errors=True)
            saved = {step: _live_model(step) for step in (1, 2)}
            with CheckpointManager(root) as manager:
                for step, state in saved.items():
                    state["progress"]["step"] = step
                    manager.save(step, state)

            bad_file = _file_of(root, step=2, kind=kind)
            corrupt(bad_file, _file_of(root, step=1, kind=kind))
            problems = _corruption_checks(root, kind, name, bad_file, _bits(saved[1]))
            result.trials += 1
            if problems:
                result.fail(f"{kind}: {name}", problems)
    result.figure = f"{len(CORRUPTIONS)} kinds x 2 files; 100 % detected before any value reached a live object"
    return result


def _file_of(root: Path, *, step: int, kind: str) -> Path:
    directory = root / step_dir(step)
    return directory / MANIFEST_NAME if kind == "manifest" else next(directory.rglob("*.safetensors"))


def _corruption_checks(root: Path, kind: str, name: str, bad_file: Path, step1_bits: list[bytes]) -> list[str]:
    problems: list[str] = []
    with CheckpointManager(root) as manager:
        report = manager.verify()
        flagged = [c for c in report.bad if c.step == 2]
        if kind == "manifest" and name == "deleted":
            # without its commit record the step is unpublished, like a save that crashed before publishing
            if any(c.step == 2 for c in report.checkpoints):
                problems.append("verify lists a step whose manifest is gone")
        elif not flagged:
            problems.append("verify did not flag step 2")
        elif bad_file.name not in (flagged[0].bad_file or "") + (flagged[0].error or ""):
            problems.append(f"verify did not name {bad_file.name}: {flagged[0].error}")
        live = _live_model(99)
        untouched = _bits(live)
        try:
            manager.restore(live, step=2)
            problems.append("restore(step=2) succeeded on a damaged checkpoint")
        except SafepointError:
            pass
        if _bits(live) != untouched:
            problems.append("a failed restore changed the live state")
        report_ = manager.restore(live)
        if report_ is None or report_.step != 1:
            problems.append(f"restore did not fall back to step 1: {report_}")
        elif _bits(live) != step1_bits:
            problems.append("the fallback restore did not apply step 1 exactly")
        elif (kind, name) != ("manifest", "deleted") and [s.step for s in report_.skipped] != [2]:
            problems.append(f"the restore report does not list step 2 as skipped: {report_.skipped}")
    return problems


# -- suites kept as pytest modules, counted here ------------------------------------------------------------------
def _pytest_row(name: str, targets: list[str], env: dict[str, str] | None = None) -> Result:
    result = Result(name)
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *targets]
        done = subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=3600, check=False)  # fmt: skip
        if not xml.exists():
            result.fail("pytest", [done.stdout[-500:] + done.stderr[-500:]])
            return result
        suite = ElementTree.parse(xml).getroot().find("testsuite")
        assert suite is not None
        result.trials = int(suite.get("tests", 0)) - int(suite.get("skipped", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        for _ in range(failed):
            result.fail("pytest", [line for line in done.stdout.splitlines() if line.startswith("FAILED")][:3])
    return result


def hostile_input(scale: Scale, work: Path) -> Result:
    result = _pytest_row("hostile input (pickles, paths, symlinks, sizes)", ["tests/unit/test_hostile.py"])
    result.figure = "nothing executed (canary + audit hook), nothing outside the root opened, typed errors"
    return result


def fuzz(scale: Scale, work: Path) -> Result:
    env = {"SAFEPOINT_FUZZ_EXAMPLES": str(scale.fuzz_examples)}
    result = _pytest_row("fuzzed manifests and payload headers", ["tests/reliability/test_fuzz.py"], env)
    result.trials *= scale.fuzz_examples
    result.figure = f"3 hypothesis targets x {scale.fuzz_examples} examples; only SafepointError ever raised"
    return result


# -- the table --------------------------------------------------------------------------------------------------
SUITES: list[Callable[[Scale, Path], Result]] = [
    kill_random,
    kill_points,
    kill_subprocess,
    non_atomic_is_caught,
    power_loss,
    power_loss_is_caught,
    disk_full_injected,
    disk_full_tmpfs,
    io_errors,
    fault_point_errors,
    concurrent_same_step,
    two_managers,
    corruption,
    hostile_input,
    fuzz,
]


def run_all(
    scale_name: str,
    work: Path | None = None,
    only: list[str] | None = None,
    progress: Callable[[str], object] | None = None,
) -> list[Result]:
    scale = SCALES[scale_name]
    results = []
    with tempfile.TemporaryDirectory(prefix="safepoint-reliability-", dir=work) as tmp:
        for suite in SUITES:
            if only and suite.__name__ not in only:
                continue
            started = time.monotonic()
            result = suite(scale, Path(tmp) / suite.__name__)
            result.figure += f" [{time.monotonic() - started:.0f} s]"
            results.append(result)
            if progress is not None:
                progress(f"{result.name}: {result.trials} trials, {result.failures} failures")
    return results
