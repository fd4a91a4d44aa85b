"""kill -9 of a real Lightning run (train.py in a subprocess), then ``trainer.fit(ckpt_path="last")``: the final
weights, optimizer state and global step are bitwise those of a run that was never interrupted.

The killed run is a subprocess; the reference run and the resumed run train in this process (nothing forks). The
fast tier kills once inside an overwrite of ``last.ckpt``; the slow tier kills between saves, sweeps every
file-system call (fsync, rename, link) of three saves (a new path, a new top-1 with the removal of the previous
one, an overwrite) in the foreground and in the background, and kills twice in a row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import safepoint
from safepoint.integrations.lightning import SafepointCheckpointIO
from tests.helpers import assert_same
from tests.integrations.lightning.train import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
EPOCHS = 4  # 4 batches an epoch: global steps 4, 8, 12, 16; each epoch saves its top-1 and last.ckpt
SIGKILLED = -signal.SIGKILL


def run(directory: Path, out: Path, *flags: str, **crash: str) -> int:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KILL_")}
    env.update(crash, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    command = [sys.executable, str(HERE / "train.py"), str(directory), str(out), "--epochs", str(EPOCHS), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode not in (0, SIGKILLED):
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final state of a run that was never interrupted (in this process: it does not fork)."""
    root = tmp_path_factory.mktemp("reference")
    train(root / "checkpoints", root / "out", epochs=EPOCHS)
    return safepoint.load(root / "out")


def assert_resumes_exactly(
    reference: dict[str, Any], directory: Path, out: Path, killed_in_save: int, background: bool = False
) -> None:
    """Resume in this process (the killed run was the subprocess) and compare with the reference bit for bit.

    Saves alternate top-1 and last.ckpt, one pair an epoch of 4 steps: every last.ckpt saved before the killed
    save must be resumed from (at least), and nothing after it can be. A run that started from scratch instead
    would end with the same weights (training is deterministic), so the start step is what shows it resumed."""
    start = train(directory, out, resume=True, epochs=EPOCHS, plugin=SafepointCheckpointIO(blocking=not background))
    assert 4 * ((killed_in_save - 1) // 2) <= start <= 4 * ((killed_in_save + 1) // 2)
    final = safepoint.load(out)
    assert final["global_step"] == reference["global_step"]
    assert_same(final["state_dict"], reference["state_dict"], "state_dict")
    assert_same(final["optimizer"], reference["optimizer"], "optimizer")
    leftovers = [name for name in os.listdir(directory) if name.startswith(".")]
    assert leftovers == []  # a crashed save's hidden directory is collected by the next save


@pytest.mark.slow
def test_killed_between_saves_resumes_exactly(reference: dict[str, Any], tmp_path: Path) -> None:
    assert run(tmp_path / "ck", tmp_path / "out", KILL_AFTER_STEP="6") == SIGKILLED
    assert SafepointCheckpointIO().load_checkpoint(tmp_path / "ck" / "last.ckpt")["global_step"] == 4
    assert_resumes_exactly(reference, tmp_path / "ck", tmp_path / "out", killed_in_save=3)  # step 6: before save 3


def test_killed_inside_an_overwrite_of_last_resumes_exactly(reference: dict[str, Any], tmp_path: Path) -> None:
    # save 4 is epoch 1's last.ckpt, an overwrite; its 3rd file-system call is inside safepoint's commit
    assert run(tmp_path / "ck", tmp_path / "out", KILL_IN_SAVE="4:3") == SIGKILLED
    assert_resumes_exactly(reference, tmp_path / "ck", tmp_path / "out", killed_in_save=4)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # one subprocess per file-system call of the save, about ten of them
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("save", [2, 3, 4])  # a new last.ckpt; a top-1 and the removal of the previous; an overwrite
def test_killed_at_every_file_system_call_of_a_save(
    reference: dict[str, Any], tmp_path: Path, save: int, background: bool
) -> None:
    flags = ("--background",) if background else ()
    call = 1
    while True:
        directory, out = tmp_path / f"ck{call}", tmp_path / f"out{call}"
        if run(directory, out, *flags, KILL_IN_SAVE=f"{save}:{call}") != SIGKILLED:
            break  # the save (and what followed) made fewer calls: every one of them has been tried
        assert_resumes_exactly(reference, directory, out, save, background)
        call += 1
    assert call > 3, f"save {save} made only {call - 1} file-system calls: the crash points were not reached"


@pytest.mark.slow
def test_killed_twice_resumes_exactly(reference: dict[str, Any], tmp_path: Path) -> None:
    directory, out = tmp_path / "ck", tmp_path / "out"
    assert run(directory, out, KILL_AFTER_STEP="6") == SIGKILLED
    assert run(directory, out, "--resume", KILL_IN_SAVE="2:2") == SIGKILLED  # its first last.ckpt save (step 8)
    assert_resumes_exactly(reference, directory, out, killed_in_save=4)
