"""Runs zoo cases in a fresh process: ``python -m tests.zoo.worker MODE WORKDIR CASE [CASE ...]``.

MODE ``reference``: per case, train every step without stopping (``full.pt``), then, from the same seed, train to
``stop_at`` and checkpoint: with a safepoint CheckpointManager in ``ckpt/`` and, as the control that proves the
case itself resumes exactly, the objects' state_dicts with ``torch.save`` in ``control.pt``.
MODE ``resume-safepoint`` / ``resume-torch``: per case, build fresh objects from the same construction seed,
restore the checkpoint into them, train the remaining steps and dump (``resume-safepoint.pt``/``resume-torch.pt``).
MODE ``resume-torch-without-rng``: the control, leaving the RNG state out; the tests use it to show that the zoo
would catch a restore that forgot the generators.

The dumps are written with torch.save: they are the test's comparison, not a checkpoint. Before each case the
worker prints ``begin CASE`` so the test can name the case a crash (a signal) interrupted; a Python exception is
written to ``WORKDIR/CASE/MODE.error`` and the worker goes on with the next case. After each case it prints
``end CASE SECONDS``. The case ``selftest-segfault`` kills its process with SIGSEGV, to test the harness.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

import safepoint
from tests.zoo.cases import CASES, Case, Loop, seed_everything
from tests.zoo.compare import plain
from tests.zoo.lightning_case import LIGHTNING_CASES

MODES = ("reference", "resume-safepoint", "resume-torch", "resume-torch-without-rng")
SEGFAULT = "selftest-segfault"


def train(loop: Loop, start: int, end: int) -> list[list[float]]:
    return [loop.step(step) for step in range(start, end)]


def dump(path: Path, loop: Loop, trace: list[list[float]], start: int) -> None:
    torch.save({"start": start, "trace": trace, "state": plain(loop.state)}, path)


def reference(case: Case, work: Path) -> None:
    seed_everything(0)
    loop = case.build()
    dump(work / "full.pt", loop, train(loop, 0, case.steps), 0)

    seed_everything(0)
    loop = case.build()
    trace = train(loop, 0, case.stop_at)
    # the control first: a safepoint save that changed live state would otherwise change the control too
    control = {
        key: value.state_dict() if hasattr(value, "load_state_dict") else value for key, value in loop.state.items()
    }
    torch.save(control, work / "control.pt")
    with safepoint.CheckpointManager(work / "ckpt") as manager:
        manager.save(case.stop_at - 1, loop.state)
    dump(work / "first.pt", loop, trace, 0)


def restore_safepoint(case: Case, loop: Loop, work: Path) -> int:
    with safepoint.CheckpointManager(work / "ckpt") as manager:
        report = manager.restore(loop.state)
    if report is None:
        raise AssertionError("restore found nothing to resume from")
    if report.step != case.stop_at - 1 or sorted(report.restored) != sorted(loop.state):
        raise AssertionError(f"restore reported step {report.step}, restored {report.restored}")
    return report.step + 1


def restore_torch(case: Case, loop: Loop, work: Path, *, rng: bool = True) -> int:
    saved = torch.load(work / "control.pt", weights_only=False)
    for key, live in loop.state.items():
        if key == "rng" and not rng:
            continue
        if hasattr(live, "load_state_dict"):
            live.load_state_dict(saved[key])
        else:
            live.clear()
            live.update(saved[key])
    return case.stop_at


def resume(case: Case, work: Path, backend: str) -> None:
    seed_everything(0)  # the construction seed; what training drew since is in the checkpoint's RNG state
    loop = case.build()
    if backend == "safepoint":
        start = restore_safepoint(case, loop, work)
    else:
        start = restore_torch(case, loop, work, rng=backend == "torch")
    dump(work / f"resume-{backend}.pt", loop, train(loop, start, case.steps), start)


def run(mode: str, case_name: str, work: Path) -> None:
    if case_name == SEGFAULT:
        os.kill(os.getpid(), signal.SIGSEGV)
    if case_name in LIGHTNING_CASES:
        LIGHTNING_CASES[case_name](mode, work)
    elif mode == "reference":
        reference(CASES[case_name], work)
    else:
        resume(CASES[case_name], work, mode.removeprefix("resume-"))


def main(argv: list[str]) -> int:
    mode, workdir, *names = argv
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; one of {MODES}")
    torch.set_num_threads(1)  # the same in every process, so reductions split the same way
    torch.use_deterministic_algorithms(True)
    for name in names:
        work = Path(workdir) / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"begin {name}", flush=True)
        began = time.perf_counter()
        try:
            run(mode, name, work)
        except Exception:
            (work / f"{mode}.error").write_text(traceback.format_exc())
        print(f"end {name} {time.perf_counter() - began:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
