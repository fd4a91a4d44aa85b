"""Payload files are written by several threads: errors still surface once, and copies stay within budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import safepoint
from safepoint import _faults as faults
from safepoint._budget import ByteBudget
from safepoint._codec import encode_state
from safepoint._commit import plan_save
from safepoint._pipeline import save_to
from safepoint._storage import LocalStorage


def save_sharded(path: Path, state: dict[str, torch.Tensor], shard_bytes: int) -> None:
    """Save through the pipeline with payload files cut at ``shard_bytes``."""
    storage = LocalStorage(path)
    storage.shard_bytes = shard_bytes
    save_to(storage, "", 1, state, metrics=None, state_version=1)


def many_files_state() -> dict[str, torch.Tensor]:
    # strided tensors: each must be copied before it is written, under the budget
    return {f"t{i}": torch.arange(4096.0 * 2).reshape(2, 4096).t() + i for i in range(12)}


def test_many_files_are_written_and_read_back(tmp_path: Path) -> None:
    state = many_files_state()
    plan = plan_save(encode_state(state), checkpoint="", step=1, shard_bytes=20_000)
    assert len(plan.files) == 12
    save_sharded(tmp_path, state, 20_000)
    loaded = safepoint.load(tmp_path)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    assert safepoint.verify(tmp_path).ok


@pytest.mark.parametrize("point", ["data.write.after", "data.fsync.after"])
def test_an_error_in_one_writer_thread_fails_the_save_and_leaves_nothing(tmp_path: Path, point: str) -> None:
    state = many_files_state()
    assert len(plan_save(encode_state(state), checkpoint="", step=1, shard_bytes=20_000).files) == 12
    with faults.armed({point: faults.FaultSpec("eio", nth=5)}), pytest.raises(OSError, match="injected"):
        save_sharded(tmp_path, state, 20_000)
    assert list(tmp_path.iterdir()) == []


def test_budget_holds_copies_within_the_limit() -> None:
    budget = ByteBudget(100)
    inside = []
    lock = threading.Lock()

    def hold(nbytes: int) -> None:
        with budget.hold(nbytes):
            with lock:
                inside.append(budget.used)
            time.sleep(0.01)

    threads = [threading.Thread(target=hold, args=(n,)) for n in (60, 60, 30, 100, 10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert budget.used == 0
    assert budget.peak <= 100
    assert max(inside) <= 100
    assert len(inside) == 5


def test_a_piece_larger_than_the_budget_is_admitted_alone() -> None:
    budget = ByteBudget(10)
    with budget.hold(50):
        assert budget.used == 50
    assert budget.used == 0
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)
