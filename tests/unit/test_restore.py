"""Restore is total or nothing, and loud: mismatches raise with the live state untouched (seed failure 2)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safepoint
from tests.conftest import assert_same_tensors, fresh_state, make_state, tensors_of


def snapshot(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any, Any]:
    return tensors_of(state), copy.deepcopy(state["progress"]), copy.deepcopy(state["scheduler"].state_dict())


def assert_untouched(state: dict[str, Any], before: tuple[dict[str, torch.Tensor], Any, Any]) -> None:
    tensors, progress, scheduler = before
    assert_same_tensors(tensors_of(state), tensors)
    assert state["progress"] == progress
    assert state["scheduler"].state_dict() == scheduler


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    safepoint.save(path, make_state(), step=4, metrics={"loss": 1.25})
    return path


def test_architecture_change_raises_and_changes_nothing(checkpoint: Path) -> None:
    live = fresh_state(hidden=9)
    before = snapshot(live)
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(checkpoint, live)
    assert any("model/0.weight" in m and "[9, 4]" in m for m in caught.value.mismatched)
    assert "nothing was changed" in str(caught.value)
    assert_untouched(live, before)


def test_shape_mismatch_raises_even_when_not_strict(checkpoint: Path) -> None:
    live = fresh_state(hidden=9)
    before = snapshot(live)
    with pytest.raises(safepoint.RestoreError):
        safepoint.restore(checkpoint, live, strict=False)
    assert_untouched(live, before)


def test_dtype_mismatch_raises(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"x": torch.ones(3, dtype=torch.float32), "y": torch.ones(2)})
    live = {"x": torch.zeros(3, dtype=torch.float64), "y": torch.zeros(2)}
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(tmp_path / "c", live)
    assert caught.value.mismatched == ("x: live tensor is torch.float64 [3], checkpoint has torch.float32 [3]",)
    assert torch.equal(live["y"], torch.zeros(2))  # the entry that matched was not applied either


def test_missing_entry_raises_when_strict_and_is_reported_otherwise(checkpoint: Path) -> None:
    live = fresh_state()
    live["extra"] = {"ema": torch.zeros(3)}
    before = snapshot(live)
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(checkpoint, live)
    assert caught.value.missing == ("extra",)
    assert_untouched(live, before)

    report = safepoint.restore(checkpoint, live, strict=False)
    assert report.missing == ("extra",)
    assert torch.equal(live["extra"]["ema"], torch.zeros(3))
    assert_same_tensors(tensors_of(live), tensors_of(make_state()))


def test_unexpected_entry_raises_when_strict_and_is_reported_otherwise(checkpoint: Path) -> None:
    live = fresh_state()
    del live["scheduler"]
    live["progress"] = {"epoch": 0}  # the checkpoint also has batch and losses
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(checkpoint, live)
    assert set(caught.value.unexpected) == {"scheduler", "progress/batch", "progress/losses"}
    assert live["progress"] == {"epoch": 0}

    report = safepoint.restore(checkpoint, live, strict=False)
    assert set(report.unexpected) == {"scheduler", "progress/batch", "progress/losses"}
    assert live["progress"] == {"epoch": 3}  # what matches is applied; nothing is added silently


def test_module_missing_and_unexpected_keys(tmp_path: Path) -> None:
    saved = torch.nn.Linear(3, 2)
    safepoint.save(tmp_path / "c", {"model": saved})
    live = torch.nn.Linear(3, 2, bias=False)
    before = live.weight.detach().clone()
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(tmp_path / "c", {"model": live})
    assert caught.value.unexpected == ("model/bias",)
    assert torch.equal(live.weight, before)
    report = safepoint.restore(tmp_path / "c", {"model": live}, strict=False)
    assert report.unexpected == ("model/bias",)
    assert torch.equal(live.weight, saved.weight)


def test_report_describes_the_checkpoint(checkpoint: Path) -> None:
    report = safepoint.restore(checkpoint, fresh_state())
    assert report.step == 4
    assert report.metrics == {"loss": 1.25}
    assert report.path == str(checkpoint)
    assert report.checksums_verified
    assert report.nbytes == sum(p.stat().st_size for p in checkpoint.glob("*/*.safetensors"))


class IgnoresData:
    """A load_state_dict that silently drops what it is given (Lightning's mistyped-attribute resume)."""

    def __init__(self) -> None:
        self.weights = torch.zeros(4)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wieghts = state["weights"]  # the typo


class Fails:
    def state_dict(self) -> dict[str, Any]:
        return {"n": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("cannot take this")


class Holder:
    def __init__(self, value: float) -> None:
        self.value = torch.full((2,), value)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"].clone()


def test_a_load_state_dict_that_ignores_data_is_caught_and_rolled_back(tmp_path: Path) -> None:
    source = IgnoresData()
    source.weights = torch.arange(4.0)
    safepoint.save(tmp_path / "c", {"a": Holder(1.0), "b": source, "t": torch.ones(2)})
    live = {"a": Holder(0.0), "b": IgnoresData(), "t": torch.zeros(2)}
    with pytest.raises(safepoint.RestoreError, match=r"b/weights: differs from the checkpoint"):
        safepoint.restore(tmp_path / "c", live)
    assert torch.equal(live["a"].value, torch.zeros(2))  # rolled back
    assert torch.equal(live["t"], torch.zeros(2))


def test_a_failing_load_state_dict_rolls_back_what_was_applied(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"a": Holder(1.0), "b": Fails(), "progress": {"x": 5}})
    live = {"a": Holder(0.0), "b": Fails(), "progress": {"x": 0}}
    with pytest.raises(safepoint.RestoreError, match=r"'b'.*cannot take this") as caught:
        safepoint.restore(tmp_path / "c", live)
    assert isinstance(caught.value.__cause__, ValueError)
    assert torch.equal(live["a"].value, torch.zeros(2))
    assert live["progress"] == {"x": 0}


def test_optimizer_with_other_parameter_groups_raises_before_applying(tmp_path: Path) -> None:
    state = make_state()
    safepoint.save(tmp_path / "c", state)
    live = fresh_state()
    model = live["model"]
    live["optimizer"] = torch.optim.AdamW(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    )
    before = snapshot(live)
    with pytest.raises(safepoint.RestoreError, match="parameter groups"):
        safepoint.restore(tmp_path / "c", live)
    assert_untouched(live, before)


def test_containers_restore_in_place_and_tuples_are_rebuilt(tmp_path: Path) -> None:
    saved = {
        "hist": [1, 2, 3],
        "pair": (torch.ones(2), "name"),
        "arr": np.arange(4, dtype=np.int32),
        "nested": {"best": 0.25, "when": None},
        "scalar": np.float32(1.5),
    }
    safepoint.save(tmp_path / "c", saved)
    tensor, array, hist, nested = torch.zeros(2), np.zeros(4, dtype=np.int32), [], {"best": None, "when": 3}
    live: dict[str, Any] = {"hist": hist, "pair": (tensor, "x"), "arr": array, "nested": nested, "scalar": 0.0}
    safepoint.restore(tmp_path / "c", live)
    assert live["hist"] is hist
    assert hist == [1, 2, 3]
    assert live["pair"][0] is tensor
    assert torch.equal(tensor, torch.ones(2))
    assert live["pair"][1] == "name"
    assert live["arr"] is array
    assert array.tolist() == [0, 1, 2, 3]
    assert live["nested"] is nested
    assert nested == {"best": 0.25, "when": None}
    assert live["scalar"] == np.float32(1.5)


def test_a_tensor_where_the_checkpoint_has_a_number_is_a_mismatch(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"x": 3, "y": torch.ones(1)})
    with pytest.raises(safepoint.RestoreError, match="x: live value is a tensor"):
        safepoint.restore(tmp_path / "c", {"x": torch.zeros(1), "y": torch.zeros(1)})


def test_pickle_needs_the_same_opt_in_to_load(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"extra": safepoint.Pickled({"a": {1, 2}}), "x": torch.ones(1)})
    with pytest.raises(safepoint.UnsafeCheckpointError, match="'extra'"):
        safepoint.load(tmp_path / "c")
    assert safepoint.load(tmp_path / "c", allow_pickle=["extra"])["extra"] == {"a": {1, 2}}
    with pytest.raises(safepoint.RestoreError, match="pickled"):
        safepoint.restore(tmp_path / "c", {"extra": None, "x": torch.zeros(1)})
    wrapper = safepoint.Pickled(None)
    safepoint.restore(tmp_path / "c", {"extra": wrapper, "x": torch.zeros(1)})
    assert wrapper.value == {"a": {1, 2}}


def test_restore_from_a_missing_path_and_from_a_manager_directory(tmp_path: Path) -> None:
    with pytest.raises(safepoint.CheckpointNotFoundError):
        safepoint.restore(tmp_path / "nothing", {"x": torch.ones(1)})
    with safepoint.CheckpointManager(tmp_path / "runs") as manager:
        manager.save(3, {"x": torch.ones(1)})
    with pytest.raises(safepoint.CheckpointNotFoundError, match="manager directory"):
        safepoint.restore(tmp_path / "runs", {"x": torch.ones(1)})


def test_arrays_of_another_byte_order_restore(tmp_path: Path) -> None:
    """Regression: a big-endian live array was refused as a dtype mismatch."""
    safepoint.save(tmp_path / "c", {"b": np.arange(3, dtype=">i4")})
    live = {"b": np.zeros(3, dtype=">i4")}
    safepoint.restore(tmp_path / "c", live)
    assert live["b"].tolist() == [0, 1, 2]
    assert live["b"].dtype == np.dtype(">i4")
