"""Restore is total or nothing, and loud: mismatches raise with the live state untouched (seed failure 2)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
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


def test_optimizer_state_keyed_by_ids_as_strings_is_refused_not_left_unused(tmp_path: Path) -> None:
    """torch's load_state_dict keeps state keys that name no parameter as they are: the moments keyed "0" were
    restored, reported, and never used (found on a DCP conversion, which turns parameter ids into strings)."""
    state = make_state()
    saved = state["optimizer"].state_dict()
    assert saved["state"], "the optimizer must have stepped, or there is no state to lose"
    saved["state"] = {str(k): v for k, v in saved["state"].items()}
    safepoint.save(tmp_path / "c", {"optimizer": saved})
    live = fresh_state()
    before = snapshot(live)
    with pytest.raises(safepoint.RestoreError, match=r"optimizer/state: keys \['0'.*int\(\)"):
        safepoint.restore(tmp_path / "c", {"optimizer": live["optimizer"]})
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


# -- honest reports -------------------------------------------------------------------------------------------
def test_a_dict_left_empty_is_not_reported_as_restored(tmp_path: Path) -> None:
    """Regression: restoring {"history": {}} from {"history": {"loss": [...]}} listed history as restored."""
    safepoint.save(tmp_path / "c", {"history": {"loss": [0.5, 0.25]}, "step": 7})
    live: dict[str, Any] = {"history": {}, "step": 0}
    report = safepoint.restore(tmp_path / "c", live, strict=False)
    assert live["history"] == {}
    assert report.restored == ("step",)
    assert report.unexpected == ("history/loss",)
    assert "not applied" in report.reasons["history/loss"]


def test_a_partly_applied_entry_lists_the_applied_sub_paths(checkpoint: Path) -> None:
    live = fresh_state()
    live["progress"] = {"epoch": 0, "extra": 1}  # the checkpoint has epoch, batch and losses
    report = safepoint.restore(checkpoint, live, strict=False)
    assert report.restored == ("model", "optimizer", "scheduler", "rng", "progress/epoch")
    assert report.missing == ("progress/extra",)
    assert set(report.unexpected) == {"progress/batch", "progress/losses"}
    assert set(report.reasons) == {"progress/extra", "progress/batch", "progress/losses"}
    assert "left as it was" in report.reasons["progress/extra"]


def test_a_full_restore_lists_every_top_level_entry(checkpoint: Path) -> None:
    report = safepoint.restore(checkpoint, fresh_state())
    assert report.restored == ("model", "optimizer", "scheduler", "rng", "progress")
    assert report.missing == ()
    assert report.unexpected == ()
    assert report.reasons == {}


def test_empty_entries_on_both_sides_count_as_restored(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"a": {}, "b": [], "c": torch.nn.Sequential()})
    report = safepoint.restore(tmp_path / "c", {"a": {}, "b": [], "c": torch.nn.Sequential()})
    assert report.restored == ("a", "b", "c")


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_a_compiled_models_keys_into_a_plain_model_report_nothing_restored(tmp_path: Path) -> None:
    """Regression: a torch.compile'd model's `_orig_mod.` keys restored with strict=False into an uncompiled
    model reported `model` restored while no tensor was applied."""
    compiled = torch.compile(linear_model())  # wrapping compiles nothing until the first call
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    safepoint.save(tmp_path / "c", {"model": compiled, "step": 3})
    live = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in live.state_dict().items()}
    report = safepoint.restore(tmp_path / "c", {"model": live, "step": 0}, strict=False)
    assert report.restored == ("step",)
    assert set(report.missing) == {f"model/{k}" for k in before}
    assert set(report.unexpected) == {f"model/_orig_mod.{k}" for k in before}
    assert "_orig_mod." in report.reasons["model/0.weight"]
    assert "torch.compile" in report.reasons["model/0.weight"]
    for name, value in live.state_dict().items():
        assert torch.equal(value, before[name])


def test_a_module_restored_in_part_lists_the_keys_it_got(tmp_path: Path) -> None:
    saved = torch.nn.Linear(3, 2)
    safepoint.save(tmp_path / "c", {"model": saved})
    live = torch.nn.Linear(3, 2, bias=False)
    report = safepoint.restore(tmp_path / "c", {"model": live}, strict=False)
    assert report.restored == ("model/weight",)
    assert report.unexpected == ("model/bias",)


# -- helpful mismatches -------------------------------------------------------------------------------------------
def test_a_compiled_checkpoint_into_a_plain_model_says_how_to_fix_it(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"model": torch.compile(linear_model())})
    live = linear_model()
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(tmp_path / "c", {"model": live})
    message = str(caught.value)
    assert "hint for 'model'" in message
    assert "'_orig_mod.'" in message
    assert "restore into the compiled module" in message
    assert "{k.removeprefix('_orig_mod.'): v for k, v in state['model'].items()}" in message
    # the fix it names works
    report = safepoint.restore(tmp_path / "c", {"model": torch.compile(live)})
    assert report.restored == ("model",)


def test_a_plain_checkpoint_into_a_compiled_model_says_to_use_orig_mod(tmp_path: Path) -> None:
    source = linear_model()
    safepoint.save(tmp_path / "c", {"model": source})
    live = torch.compile(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    with pytest.raises(safepoint.RestoreError, match=r"model\._orig_mod") as caught:
        safepoint.restore(tmp_path / "c", {"model": live})
    assert "is wrapped by torch.compile" in str(caught.value)
    safepoint.restore(tmp_path / "c", {"model": live._orig_mod})
    assert torch.equal(live.state_dict()["_orig_mod.0.weight"], source[0].weight)


def test_a_data_parallel_checkpoint_into_a_plain_model_says_how_to_fix_it(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"model": torch.nn.DataParallel(linear_model())})
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(tmp_path / "c", {"model": linear_model()})
    assert "'module.'" in str(caught.value)
    assert "DistributedDataParallel" in str(caught.value)
    assert "save model.module" in str(caught.value)


def test_a_ddp_wrapped_live_model_says_to_restore_model_module(tmp_path: Path) -> None:
    import torch.distributed as dist

    safepoint.save(tmp_path / "c", {"model": linear_model()})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(linear_model())
        with pytest.raises(safepoint.RestoreError, match=r"put the module it wraps, model\.module") as caught:
            safepoint.restore(tmp_path / "c", {"model": wrapped})
        assert "DistributedDataParallel" in str(caught.value)
        report = safepoint.restore(tmp_path / "c", {"model": wrapped.module})
        assert report.restored == ("model",)
    finally:
        dist.destroy_process_group()


def test_keys_that_differ_otherwise_get_no_prefix_hint(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"model": torch.nn.Linear(3, 2)})
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(tmp_path / "c", {"model": torch.nn.Sequential(torch.nn.Linear(3, 2))})
    assert "hint" not in str(caught.value)


def test_an_fp32_checkpoint_into_a_bf16_model_needs_cast_dtypes(tmp_path: Path) -> None:
    source = linear_model()
    safepoint.save(tmp_path / "c", {"model": source, "scale": torch.full((2,), 1 / 3)})
    live = {"model": linear_model().to(torch.bfloat16), "scale": torch.zeros(2, dtype=torch.bfloat16)}
    torch.nn.init.zeros_(live["model"][0].weight)
    with pytest.raises(safepoint.RestoreError, match=r"cast_dtypes=True") as caught:
        safepoint.restore(tmp_path / "c", live)
    assert "model/0.weight: live tensor is torch.bfloat16 [4, 3], checkpoint has torch.float32 [4, 3]" in (
        caught.value.mismatched
    )
    assert torch.equal(live["model"][0].weight, torch.zeros(4, 3, dtype=torch.bfloat16))  # nothing applied

    report = safepoint.restore(tmp_path / "c", live, cast_dtypes=True)
    assert report.restored == ("model", "scale")
    for name, value in live["model"].state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, source.state_dict()[name].to(torch.bfloat16))
    assert torch.equal(live["scale"], torch.full((2,), 1 / 3).to(torch.bfloat16))
    assert "model/0.weight: torch.float32 -> torch.bfloat16" in report.cast
    assert "scale: torch.float32 -> torch.bfloat16" in report.cast
    assert len(report.cast) == 5  # four module tensors and the plain one


def test_cast_dtypes_never_casts_between_integers_or_to_floats_from_integers(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"n": torch.arange(3, dtype=torch.int64)})
    with pytest.raises(safepoint.RestoreError, match=r"live tensor is torch\.float32"):
        safepoint.restore(tmp_path / "c", {"n": torch.zeros(3)}, cast_dtypes=True)
    with pytest.raises(safepoint.RestoreError) as caught:
        safepoint.restore(tmp_path / "c", {"n": torch.zeros(3, dtype=torch.int32)}, cast_dtypes=True)
    assert "cast_dtypes=True" not in str(caught.value)  # not offered where it would not help


def test_an_optimizer_that_casts_its_state_is_accepted_only_with_cast_dtypes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    safepoint.save(tmp_path / "c", {"model": model, "optimizer": optimizer})

    live_model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    live_optimizer = torch.optim.AdamW(live_model.parameters())
    live = {"model": live_model, "optimizer": live_optimizer}
    report = safepoint.restore(tmp_path / "c", live, cast_dtypes=True)
    exp_avg = live_optimizer.state_dict()["state"][0]["exp_avg"]
    assert exp_avg.dtype == torch.bfloat16
    assert torch.equal(exp_avg, optimizer.state_dict()["state"][0]["exp_avg"].to(torch.bfloat16))
    assert "optimizer/state/0/exp_avg: torch.float32 -> torch.bfloat16 (by its load_state_dict)" in report.cast

    fresh_model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters())
    with pytest.raises(safepoint.RestoreError, match=r"cast it from torch.float32 to torch.bfloat16"):
        safepoint.restore(tmp_path / "c", {"optimizer": fresh_optimizer}, strict=False)
    assert fresh_optimizer.state_dict()["state"] == {}  # rolled back


# -- dynamic containers -------------------------------------------------------------------------------------------
def test_replace_restores_a_dict_whose_keys_are_data(tmp_path: Path) -> None:
    history = {"loss": [0.5, 0.25], "acc": [0.1]}
    safepoint.save(tmp_path / "c", {"history": safepoint.Replace(history), "counts": safepoint.Replace([1, 2, 3])})
    assert safepoint.load(tmp_path / "c") == {"history": history, "counts": [1, 2, 3]}  # saved as the plain value

    live_history: dict[str, Any] = {"stale": [9.0]}
    live_counts: list[int] = []
    live = {"history": safepoint.Replace(live_history), "counts": safepoint.Replace(live_counts)}
    report = safepoint.restore(tmp_path / "c", live)
    assert live_history == history  # the same dict object, with the saved contents only
    assert live["history"].value is live_history
    assert live_counts == [1, 2, 3]
    assert report.restored == ("history", "counts")
    assert report.missing == ()
    assert report.unexpected == ()


def test_replace_of_tensors_and_nested_containers(tmp_path: Path) -> None:
    saved = {"a": {"x": torch.arange(3.0), "y": {"z": 1}}, 5: "five"}
    safepoint.save(tmp_path / "c", {"d": safepoint.Replace(saved)})
    target: dict[Any, Any] = {}
    safepoint.restore(tmp_path / "c", {"d": safepoint.Replace(target)})
    assert set(target) == {"a", 5}
    assert torch.equal(target["a"]["x"], torch.arange(3.0))
    assert target["a"]["y"] == {"z": 1}


def test_replace_of_the_wrong_kind_is_a_mismatch_and_changes_nothing(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"d": [1, 2], "t": torch.ones(2)})
    target = {"keep": 1}
    live = {"d": safepoint.Replace(target), "t": torch.zeros(2)}
    with pytest.raises(safepoint.RestoreError, match="d: live value is a Replace of a dict, checkpoint has list"):
        safepoint.restore(tmp_path / "c", live)
    assert target == {"keep": 1}
    assert torch.equal(live["t"], torch.zeros(2))


def test_replace_wraps_only_dicts_and_lists() -> None:
    with pytest.raises(safepoint.ConfigError, match="tuple"):
        safepoint.Replace((1, 2))  # type: ignore[arg-type]


def test_the_migration_the_prefix_hint_suggests_converts_the_checkpoint(tmp_path: Path) -> None:
    source = linear_model()
    safepoint.save(tmp_path / "c", {"model": torch.compile(source)}, state_version=1)
    migrations = safepoint.Migrations()

    @migrations.register(from_version=1)
    def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
        state["model"] = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
        return state

    live = linear_model()
    torch.nn.init.zeros_(live[0].weight)
    report = safepoint.restore(tmp_path / "c", {"model": live}, state_version=2, migrations=migrations)
    assert report.restored == ("model",)
    assert torch.equal(live[0].weight, source[0].weight)


def test_a_prefix_inside_another_wrappers_prefix_is_recognised(tmp_path: Path) -> None:
    """DataParallel around a compiled model saves `module._orig_mod.` keys."""
    safepoint.save(tmp_path / "c", {"model": torch.nn.DataParallel(torch.compile(linear_model()))})
    with pytest.raises(safepoint.RestoreError, match=r"start with '_orig_mod\.' \(torch\.compile"):
        safepoint.restore(tmp_path / "c", {"model": torch.nn.DataParallel(linear_model())})


class BrokenAfterLoad:
    """A state_dict() that fails once load_state_dict has run (a generator given an invalid state, say)."""

    def __init__(self) -> None:
        self.value = torch.zeros(2)
        self.loaded = False

    def state_dict(self) -> dict[str, Any]:
        if self.loaded:
            raise RuntimeError("Invalid mt19937 state")
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = True


def test_a_state_dict_failing_in_the_check_after_applying_is_a_restore_error(tmp_path: Path) -> None:
    """Regression: the raw RuntimeError of the post-restore check escaped instead of a RestoreError."""
    safepoint.save(tmp_path / "c", {"a": Holder(1.0), "b": BrokenAfterLoad()})
    live = {"a": Holder(0.0), "b": BrokenAfterLoad()}
    with pytest.raises(safepoint.RestoreError, match=r"'b'.*state_dict\(\) failed.*Invalid mt19937") as caught:
        safepoint.restore(tmp_path / "c", live)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert torch.equal(live["a"].value, torch.zeros(2))  # rolled back


def test_a_live_torch_size_stays_a_torch_size(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"shape": torch.Size([2, 3]), "grid": torch.Size([4])})
    live = {"shape": torch.Size([0, 0]), "grid": torch.Size([1, 1])}
    safepoint.restore(tmp_path / "ckpt", live)
    assert type(live["shape"]) is torch.Size
    assert live["shape"] == torch.Size([2, 3])
    assert type(live["grid"]) is torch.Size
    assert live["grid"] == torch.Size([4])


def _loader(workers: int) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import RandomSampler

    data = torch.utils.data.TensorDataset(torch.arange(22.0).unsqueeze(1))
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(5))
    return StatefulDataLoader(
        data, batch_size=4, sampler=sampler, num_workers=workers, generator=torch.Generator().manual_seed(6)
    )


# Run in a fresh process: worker processes are forked, and forking pytest's process after other tests have
# started threads (background saves, readers) can deadlock the children.
_LOADER_SCRIPT = """
import sys
import safepoint
from tests.unit.test_restore import _loader

def epochs(loader):
    batches = [b[0].flatten().tolist() for _ in range(2) for b in loader]
    return batches, loader.state_dict()["_snapshot"]["_main_snapshot"]["_base_seed"]

source = _loader(2)
batches = iter(source)
next(batches), next(batches)
safepoint.save(sys.argv[1], {"loader": source})
expected = _loader(2)
expected.load_state_dict(source.state_dict())
live = {"loader": _loader(2)}
report = safepoint.restore(sys.argv[1], live)
assert report.restored == ("loader",), report.restored
got, want = epochs(live["loader"]), epochs(expected)
assert got == want, f"restored {got[1]}, load_state_dict alone {want[1]}"
print("same")
"""


def test_a_data_loader_is_not_looked_at_before_its_load_state_dict(tmp_path: Path) -> None:
    """Regression (state zoo, loader-workers-2): restore called a fresh StatefulDataLoader's state_dict() before
    its load_state_dict; that starts an iterator, which draws the workers' base seed from the loader's generator,
    so the resumed run's workers were seeded differently from the run that never stopped."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _LOADER_SCRIPT, str(tmp_path / "c")],
        capture_output=True, text=True, cwd=root, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])},
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert done.stdout.split() == ["same"]


def test_a_data_loader_that_cannot_be_rolled_back_is_named(tmp_path: Path) -> None:
    source = IgnoresData()
    source.weights = torch.arange(4.0)
    safepoint.save(tmp_path / "c", {"b": source, "loader": _loader(0)})
    live = {"b": IgnoresData(), "loader": _loader(0)}
    with pytest.raises(safepoint.RestoreError, match=r"b/weights: differs from the checkpoint") as caught:
        safepoint.restore(tmp_path / "c", live)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "StatefulDataLoader keeps the state it was given" in notes
