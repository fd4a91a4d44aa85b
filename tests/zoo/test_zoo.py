"""The state zoo: each case is checkpointed mid-training, restored into fresh objects in a new process and trained
on; the continuation must be bitwise identical to the run that never stopped (every parameter, optimizer and
scheduler value, RNG state, and every step's loss and learning rate, compared by their bits).

The same resume through ``torch.save``/``load_state_dict`` is the control: it proves a case resumes exactly at
all, so a failure of the safepoint test is safepoint's. Cases run in batches, one process per batch and mode
(importing torch costs more than most cases); a process killed by a signal fails the case it was running, with
its exit code, and the batch goes on in a new process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler, swa_utils

from tests.zoo.cases import CASES
from tests.zoo.compare import diffs
from tests.zoo.lightning_case import LIGHTNING_CASES
from tests.zoo.worker import SEGFAULT

ROOT = Path(__file__).resolve().parents[2]
NAMES = [*CASES, *LIGHTNING_CASES]
BATCH_TIMEOUT = 600
RNG_CASES = ["optim-Adam", "loader-workers-0", "transformers-gpt2-tied"]


@dataclass(repr=False)
class Zoo:
    """Runs the worker lazily, once per mode and case, in batches, and keeps what failed how."""

    workdir: Path
    wanted: list[str]  # the cases this session selected: one batch per mode runs them all
    # all keyed by (case, mode)
    crashes: dict[tuple[str, str], str] = field(default_factory=dict)
    done: set[tuple[str, str]] = field(default_factory=set)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)

    def run(self, mode: str, names: list[str] | None = None) -> None:
        pending = [name for name in (names or self.wanted) if (name, mode) not in self.done]
        if not pending:
            return
        if mode != "reference":
            self.run("reference", pending)
        self.done.update((name, mode) for name in pending)
        while pending:
            process = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-m", "tests.zoo.worker", mode, str(self.workdir), *pending],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=BATCH_TIMEOUT,
            )
            lines = [line.split(" ") for line in process.stdout.splitlines()]
            begun = [words[1] for words in lines if words[0] == "begin"]
            self.seconds.update(((words[1], mode), float(words[2])) for words in lines if words[0] == "end")
            if process.returncode == 0:
                return
            crashed = begun[-1] if begun else pending[0]
            self.crashes[(crashed, mode)] = describe_exit(process.returncode, process.stderr)
            pending = pending[pending.index(crashed) + 1 :]

    def result(self, case: str, mode: str, name: str | None = None, batch: list[str] | None = None) -> dict[str, Any]:
        """The dump ``name`` (default: the mode's own) of ``case``, running ``batch`` (default: every selected
        case) in that mode if it has not run yet; fails the test with why the dump is not there."""
        self.run(mode, batch or (self.wanted if case in self.wanted else [case]))
        for step in ("reference", mode):
            if (case, step) in self.crashes:
                pytest.fail(f"{case}: the {step} process {self.crashes[(case, step)]}")
            error = self.workdir / case / f"{step}.error"
            if error.exists():
                pytest.fail(f"{case}: {step} raised\n{error.read_text()}")
        dumped: dict[str, Any] = torch.load(self.workdir / case / f"{name or mode}.pt", weights_only=False)
        return dumped


def describe_exit(code: int, stderr: str) -> str:
    why = f"was killed by {signal.Signals(-code).name} (exit code {code})" if code < 0 else f"exited with code {code}"
    fatal = stderr.rfind("Fatal Python error")  # faulthandler's traceback of the crash, when there is one
    return f"{why}; stderr:\n{stderr[fatal : fatal + 4000] if fatal >= 0 else stderr[-3000:]}"


@pytest.fixture(scope="module")
def zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    selected = {
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    }
    return Zoo(tmp_path_factory.mktemp("zoo"), [name for name in NAMES if name in selected])


def continuation_diffs(zoo: Zoo, case: str, mode: str, batch: list[str] | None = None) -> list[str]:
    """How the run resumed by ``mode`` differs from the one that never stopped (losses, lrs, final state)."""
    full = zoo.result(case, "reference", "full")
    first = zoo.result(case, "reference", "first")
    resumed = zoo.result(case, mode, batch=batch)
    start = resumed["start"]
    assert start == len(first["trace"]) > 0
    # the interrupted run is the same run up to the checkpoint: the case itself is deterministic
    assert not diffs(full["trace"][:start], first["trace"]), f"{case}: two runs from one seed differ"
    return diffs(full["trace"][start:], resumed["trace"], "trace") + diffs(full["state"], resumed["state"], "state")


def assert_continues_exactly(zoo: Zoo, case: str, mode: str) -> None:
    problems = continuation_diffs(zoo, case, mode)
    assert not problems, f"{case}: the resumed run differs from the one that never stopped:\n" + "\n".join(problems)


@pytest.mark.timeout(2 * BATCH_TIMEOUT)
@pytest.mark.parametrize("case", NAMES)
def test_safepoint_resume_continues_bitwise(zoo: Zoo, case: str) -> None:
    assert_continues_exactly(zoo, case, "resume-safepoint")


@pytest.mark.timeout(2 * BATCH_TIMEOUT)
@pytest.mark.parametrize("case", NAMES)
def test_control_torch_save_resume_continues_bitwise(zoo: Zoo, case: str) -> None:
    assert_continues_exactly(zoo, case, "resume-torch")


@pytest.mark.timeout(2 * BATCH_TIMEOUT)
@pytest.mark.parametrize("case", list(LIGHTNING_CASES))
def test_lightning_checkpoint_dict_loads_back_equal(zoo: Zoo, case: str) -> None:
    roundtrip = zoo.result(case, "resume-safepoint")["roundtrip"]
    assert not roundtrip, "safepoint.load differs from the dict the Trainer built:\n" + "\n".join(roundtrip)


@pytest.mark.timeout(2 * BATCH_TIMEOUT)
@pytest.mark.parametrize("case", RNG_CASES)
def test_the_zoo_catches_a_resume_that_forgets_the_rng(zoo: Zoo, case: str) -> None:
    """Dropout and data draw from the generators: without the RNG state the control itself must diverge."""
    problems = continuation_diffs(zoo, case, "resume-torch-without-rng", batch=RNG_CASES)
    assert any(line.startswith("trace/") for line in problems), problems
    assert any(line.startswith("state/model/") for line in problems), problems


@pytest.mark.timeout(2 * BATCH_TIMEOUT)
def test_a_crashed_worker_fails_its_case_with_the_signal_and_the_batch_goes_on(tmp_path: Path) -> None:
    zoo = Zoo(tmp_path, [SEGFAULT, "optim-SGD"])
    zoo.run("reference")
    assert "killed by SIGSEGV (exit code -11)" in zoo.crashes[(SEGFAULT, "reference")]
    assert (SEGFAULT, "reference") in zoo.done
    assert ("optim-SGD", "reference") not in zoo.crashes
    assert (tmp_path / "optim-SGD" / "full.pt").exists()  # run by a second process, after the crash
    with pytest.raises(pytest.fail.Exception, match=r"selftest-segfault: the reference process was killed by SIGSEGV"):
        zoo.result(SEGFAULT, "reference", "full")


def public_classes(module: Any, base: type) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and isinstance(value, type) and issubclass(value, base) and value is not base
    }


def test_every_optimizer_in_torch_optim_is_in_the_zoo() -> None:
    optimizers = public_classes(torch.optim, torch.optim.Optimizer)
    assert {"SGD", "SparseAdam", "LBFGS"} <= optimizers
    covered = {name for case in CASES.values() if case.name.startswith("optim-") for name in case.covers}
    assert optimizers - covered == set(), "add a zoo case for each new optimizer"


def test_every_scheduler_in_torch_lr_scheduler_is_in_the_zoo() -> None:
    schedulers = public_classes(lr_scheduler, lr_scheduler.LRScheduler) | {"ReduceLROnPlateau"}
    schedulers |= public_classes(swa_utils, lr_scheduler.LRScheduler)
    assert {"OneCycleLR", "CyclicLR", "SequentialLR", "SWALR"} <= schedulers
    covered = {name for case in CASES.values() for name in case.covers}
    assert schedulers - covered == set(), "add a zoo case for each new scheduler"
