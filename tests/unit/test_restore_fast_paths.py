"""The read path's speed work keeps restore exact and total-or-nothing (issue 10's read-path targets).

Each test here pins a way an optimisation of the restore path could go wrong: the check after an object's
``load_state_dict`` compares bits in words, the collector is paused only for the restore, ...
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint


class Alters:
    """An object whose first load_state_dict keeps the data changed by ``change`` (a bug the check must catch)."""

    def __init__(self, value: torch.Tensor, change: Callable[[torch.Tensor], None] = lambda t: None) -> None:
        self.value, self.change = value, change
        self.gc_enabled_in_load: bool | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gc_enabled_in_load = gc.isenabled()
        self.value = state["value"].clone()
        self.change(self.value)
        self.change = lambda t: None  # once: the rollback's load_state_dict restores faithfully


def _flip_last_byte(tensor: torch.Tensor) -> None:
    tensor.view(-1).view(torch.uint8)[-1] ^= 1


@pytest.mark.parametrize(
    ("saved", "change"),
    [
        # bits differ, values compare equal: -0.0 == 0.0
        (torch.zeros(8), lambda t: t.neg_()),
        # the last byte of sizes that fit int64, int32, int16 and only uint8 words
        (torch.arange(16, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(12, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(6, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(5, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(3, dtype=torch.int16), _flip_last_byte),
    ],
)
def test_the_check_after_load_state_dict_compares_every_bit(
    tmp_path: Path, saved: torch.Tensor, change: Callable[[torch.Tensor], None]
) -> None:
    safepoint.save(tmp_path / "c", {"obj": Alters(saved), "t": torch.ones(2)})
    live = {"obj": Alters(torch.full_like(saved, 7), change), "t": torch.zeros(2)}
    with pytest.raises(safepoint.RestoreError, match=r"obj/value: differs from the checkpoint"):
        safepoint.restore(tmp_path / "c", live)
    assert torch.equal(live["obj"].value, torch.full_like(saved, 7))  # rolled back
    assert torch.equal(live["t"], torch.zeros(2))
    safepoint.restore(tmp_path / "c", live)  # the same bits pass
    assert torch.equal(live["obj"].value.view(torch.uint8), saved.view(torch.uint8))


def test_the_check_compares_a_view_at_an_odd_offset(tmp_path: Path) -> None:
    """A live tensor whose bytes start at an odd offset of its storage is compared byte by byte, not skipped."""
    base = torch.arange(9, dtype=torch.uint8)
    safepoint.save(tmp_path / "c", {"obj": Alters(base[1:].clone())})
    odd = torch.zeros(9, dtype=torch.uint8)[1:]
    live = Alters(odd, _flip_last_byte)
    live.value = odd

    def keep_a_view(state: dict[str, Any]) -> None:
        storage = torch.empty(9, dtype=torch.uint8)
        storage[1:] = state["value"]
        storage[-1] ^= 1
        live.value = storage[1:]  # storage offset 1: no word view fits

    live.load_state_dict = keep_a_view  # type: ignore[method-assign]
    with pytest.raises(safepoint.RestoreError, match=r"obj/value: differs"):
        safepoint.restore(tmp_path / "c", {"obj": live})


def test_the_collector_is_paused_during_a_restore_and_enabled_after(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"obj": Alters(torch.ones(3))})
    live = Alters(torch.zeros(3))
    assert gc.isenabled()
    safepoint.restore(tmp_path / "c", {"obj": live})
    assert live.gc_enabled_in_load is False
    assert gc.isenabled()
    failing = Alters(torch.zeros(3), lambda t: t.add_(1))
    with pytest.raises(safepoint.RestoreError):
        safepoint.restore(tmp_path / "c", {"obj": failing})
    assert gc.isenabled()  # enabled again after a failed restore too


def test_a_collector_the_caller_disabled_stays_disabled(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"obj": Alters(torch.ones(3))})
    gc.disable()
    try:
        safepoint.restore(tmp_path / "c", {"obj": Alters(torch.zeros(3))})
        safepoint.load(tmp_path / "c")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_manager_restore_pauses_the_collector(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, {"obj": Alters(torch.ones(3))})
        live = Alters(torch.zeros(3))
        manager.restore({"obj": live})
    assert live.gc_enabled_in_load is False
    assert gc.isenabled()
