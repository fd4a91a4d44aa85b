"""Scripts on a real gloo group that end with a background save in flight, the interpreter exiting normally.

safepoint's exit hook finishes the save on every rank before the interpreter finalizes (and warns); the process
exits 0, never aborts ("terminate called without an active exception"), and the checkpoint is committed whole.
The ranks run tests/distributed/worker_exit.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safepoint
from tests.distributed.group import run_group
from tests.distributed.worker_exit import ROWS, values
from tests.reliability.workload import leftovers

WORLD = 2
STEP_DIR = "step-000000000007"


@pytest.mark.parametrize("scenario", ["unclosed", "destroyed"])
def test_a_script_ending_with_a_background_save_in_flight_exits_cleanly_with_the_checkpoint(
    tmp_path: Path, scenario: str
) -> None:
    ckpt = tmp_path / "ckpt"
    ranks = run_group(scenario, WORLD, ckpt, tmp_path / "out", worker="tests.distributed.worker_exit")
    for rank, result in enumerate(ranks):
        assert result.returncode == 0, f"rank {rank} exited {result.returncode}:\n{result.output[-4000:]}"
        assert "terminate called" not in result.output, result.output[-4000:]
        assert "Fatal Python error" not in result.output, result.output[-4000:]
        assert f"rank {rank}: the script ends" in result.output
        # in flight when the script ended: the exit hook is what finished it
        assert result.results["returned_before_done"] is True
        assert "finishing the background save of step 7 at interpreter exit" in result.output
    assert safepoint.verify(ckpt).ok
    assert sorted(p.name for p in ckpt.iterdir()) == [STEP_DIR]
    assert leftovers(ckpt) == []
    loaded = safepoint.load(ckpt / STEP_DIR)
    expected = values(0)
    assert loaded["model"]["sharded"].shape == (ROWS, expected["sharded"].shape[1])
    assert torch.equal(loaded["model"]["sharded"], expected["sharded"])
    assert torch.equal(loaded["model"]["replicated"], expected["replicated"])
    assert sorted(loaded["own"]) == list(range(WORLD))
    for rank in range(WORLD):
        assert torch.equal(loaded["own"][rank], values(rank)["own"])


def test_ctrl_c_stops_a_rank_waiting_for_the_others_and_the_script_exits_cleanly(tmp_path: Path) -> None:
    """The store's own wait is C++: a main thread blocked in it would see Ctrl-C only when the store answered
    (rank 1 never comes: after the 60 s timeout). The wait it gave up on is still blocked in the store when the
    interpreter exits, on a daemon thread: the process must still exit normally, and nothing be committed."""
    ckpt = tmp_path / "ckpt"
    ranks = run_group("interrupted", WORLD, ckpt, tmp_path / "out", worker="tests.distributed.worker_exit")
    for rank, result in enumerate(ranks):
        assert result.returncode == 0, f"rank {rank} exited {result.returncode}:\n{result.output[-4000:]}"
        assert "terminate called" not in result.output, result.output[-4000:]
        assert "Fatal Python error" not in result.output, result.output[-4000:]
        assert f"rank {rank}: the script ends" in result.output
    assert 1.0 <= ranks[0].results["interrupted_after"] < 10
    assert safepoint.CheckpointManager(ckpt).steps() == []
