"""CheckpointManager: round trips, resume semantics, same-step saves, retention, corruption fallback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint._errors import ConfigError
from safepoint._layout import step_dir
from tests.conftest import assert_same_tensors, fresh_state, make_state, tensors_of


def payload_files(root: Path, step: int) -> list[Path]:
    return sorted((root / step_dir(step)).glob("*/*.safetensors"))


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_round_trip_restores_everything_in_place(tmp_path: Path) -> None:
    state = make_state()
    saved = tensors_of(state)
    with safepoint.CheckpointManager(tmp_path) as manager:
        info = manager.save(7, state, metrics={"loss": 0.5})
    assert info.step == 7
    assert info.nbytes > 0

    live = fresh_state()
    progress = live["progress"]
    assert not torch.equal(next(iter(tensors_of(live).values())), next(iter(saved.values())))
    with safepoint.CheckpointManager(tmp_path) as manager:
        report = manager.restore(live)
    assert report is not None
    assert report.step == 7
    assert report.metrics == {"loss": 0.5}
    assert set(report.restored) == {"model", "optimizer", "scheduler", "rng", "progress"}
    assert report.missing == ()
    assert report.unexpected == ()
    assert report.skipped == ()
    assert report.path == str(tmp_path / step_dir(7))
    assert_same_tensors(tensors_of(live), saved)
    assert live["progress"] is progress  # updated in place, not replaced
    assert progress == {"epoch": 3, "batch": 120, "losses": [0.5, 0.25]}
    assert live["scheduler"].state_dict() == state["scheduler"].state_dict()
    assert live["optimizer"].param_groups[0]["lr"] == state["optimizer"].param_groups[0]["lr"]


def test_rng_state_resumes_the_same_random_stream(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = {"rng": safepoint.RNGState()}
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    safepoint.save(tmp_path / "ck", state)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    safepoint.restore(tmp_path / "ck", state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0])
    assert expected[1:] == again[1:]


def test_nothing_to_restore_returns_none(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "new") as manager:
        assert manager.restore(fresh_state()) is None
        assert manager.steps() == []
        assert manager.latest_step() is None


def test_steps_are_ascending_and_latest_is_the_newest(tmp_path: Path) -> None:
    state = {"x": torch.arange(3)}
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (10, 2, 30):
            manager.save(step, state)
        assert manager.steps() == [2, 10, 30]
        assert manager.latest_step() == 30
        assert [c.step for c in manager.checkpoints()] == [2, 10, 30]


def test_same_step_twice_raises_and_leaves_the_committed_one(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        first = manager.save(5, {"x": torch.ones(4)})
        manifest = (tmp_path / step_dir(5) / "manifest.json").read_bytes()
        with pytest.raises(safepoint.CheckpointExistsError) as caught:
            manager.save(5, {"x": torch.zeros(4)})
        assert caught.value.step == 5
        assert caught.value.verified is True
        assert (tmp_path / step_dir(5) / "manifest.json").read_bytes() == manifest
        # only the committed attempt's data is left
        attempts = [p.name for p in (tmp_path / step_dir(5)).iterdir() if p.is_dir()]
        assert attempts == [first.save_id]
    assert torch.equal(safepoint.load(tmp_path / step_dir(5))["x"], torch.ones(4))


def test_same_step_over_a_corrupt_checkpoint_says_it_does_not_verify(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(5, {"x": torch.ones(1000)})
        flip_byte(payload_files(tmp_path, 5)[0])
        with pytest.raises(safepoint.CheckpointExistsError, match="does NOT verify") as caught:
            manager.save(5, {"x": torch.ones(1000)})
    assert caught.value.verified is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_last": 1.5},
        {"keep_last": True},
        {"keep_best": 2},
        {"keep_best": 2, "best_metric": ""},
        {"best_mode": "lowest"},
        {"keep_every": 0},
        {"state_version": -1},
    ],
)
def test_invalid_arguments_raise_before_touching_disk(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    target = tmp_path / "never"
    with pytest.raises(safepoint.ConfigError) as caught:
        safepoint.CheckpointManager(target, **kwargs)
    assert isinstance(caught.value, ValueError)
    assert not target.exists()


def test_directory_that_is_a_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(safepoint.SafepointError, match="not a directory"):
        safepoint.CheckpointManager(path)
    assert path.read_text() == "not a directory"


def test_invalid_steps_raise(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        for bad in (-1, 1.0, "3", True):
            with pytest.raises(safepoint.ConfigError):
                manager.save(bad, {"x": torch.ones(1)})  # type: ignore[arg-type]
        assert manager.steps() == []


def test_invalid_state_raises_before_writing(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with pytest.raises(safepoint.InvalidStateError) as caught:
            manager.save(1, {"ok": torch.ones(1), "bad": {"inner": object()}})
        assert caught.value.key == "bad/inner"
        assert manager.steps() == []
    assert list(tmp_path.iterdir()) == []


def test_bad_metrics_raise(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager, pytest.raises(safepoint.ConfigError, match="loss"):
        manager.save(1, {"x": torch.ones(1)}, metrics={"loss": "low"})  # type: ignore[dict-item]


# -- retention ------------------------------------------------------------------------------------------------
def save_steps(root: Path, steps: list[int], losses: dict[int, float] | None = None, **policy: Any) -> list[int]:
    with safepoint.CheckpointManager(root, **policy) as manager:
        for step in steps:
            metrics = {"loss": losses[step]} if losses else None
            manager.save(step, {"x": torch.full((4,), float(step))}, metrics=metrics)
        return manager.steps()


def test_keep_last(tmp_path: Path) -> None:
    assert save_steps(tmp_path, list(range(6)), keep_last=2) == [4, 5]


def test_keep_every_and_keep_last_union(tmp_path: Path) -> None:
    assert save_steps(tmp_path, list(range(1, 11)), keep_last=2, keep_every=4) == [4, 8, 9, 10]


@pytest.mark.parametrize(("mode", "best"), [("min", [2, 5]), ("max", [3, 4])])
def test_keep_best(tmp_path: Path, mode: str, best: list[int]) -> None:
    losses = {0: 0.9, 1: 0.8, 2: 0.1, 3: 1.5, 4: 1.4, 5: 0.2, 6: 0.7}
    kept = save_steps(tmp_path, list(losses), losses, keep_best=2, best_metric="loss", best_mode=mode)
    assert kept == sorted({*best, 6})  # the newest is always kept


def test_retention_never_deletes_the_newest_or_the_just_saved(tmp_path: Path) -> None:
    assert save_steps(tmp_path, [10, 11, 12], keep_last=1) == [12]
    # saving an older step than the newest keeps both: the newest and the one just saved
    assert save_steps(tmp_path, [3], keep_last=1) == [3, 12]


def test_retention_survives_restarts(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2, 3])  # no policy: everything is kept
    assert save_steps(tmp_path, [4], keep_last=2) == [3, 4]


def test_retention_never_touches_what_it_does_not_recognise(tmp_path: Path) -> None:
    foreign = [tmp_path / "notes.txt", tmp_path / "step-1", tmp_path / "step-000000000001-old", tmp_path / "step-x"]
    foreign[0].write_text("mine")
    for path in foreign[1:]:
        path.mkdir()
        (path / "manifest.json").write_text("{}")
    save_steps(tmp_path, list(range(5)), keep_last=1)
    assert all(p.exists() for p in foreign)
    assert (foreign[1] / "manifest.json").read_text() == "{}"


def test_retention_keeps_unreadable_checkpoints_and_does_not_count_them(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    (tmp_path / step_dir(2) / "manifest.json").write_text("garbage")
    assert save_steps(tmp_path, [3], keep_last=1) == [2, 3]  # step 2 left for a person to look at; 1 deleted


def test_retention_removes_the_directory_of_each_step_it_deletes(tmp_path: Path) -> None:
    """Even one holding nothing but its manifest (the data removed by hand): retention removes checkpoints as
    ``safepoint rm`` does, so no empty step directory is left for a later gc, which would wait out its grace."""
    save_steps(tmp_path, [1, 2])
    for path in (tmp_path / step_dir(1)).iterdir():
        if path.name != "manifest.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert save_steps(tmp_path, [3], keep_last=1) == [3]
    assert [p.name for p in tmp_path.iterdir()] == [step_dir(3)]


# -- corruption and fallback -------------------------------------------------------------------------------------
def test_restore_falls_back_to_the_newest_valid_and_reports_why(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            manager.save(step, {"x": torch.full((256,), float(step))})
    flip_byte(payload_files(tmp_path, 3)[0])
    (tmp_path / step_dir(2) / "manifest.json").write_text("{ truncated")
    live = {"x": torch.zeros(256)}
    with safepoint.CheckpointManager(tmp_path) as manager:
        report = manager.restore(live)
    assert report is not None
    assert report.step == 1
    assert [s.step for s in report.skipped] == [3, 2]
    assert "checksum" in report.skipped[0].reason
    assert "00000.safetensors" in report.skipped[0].reason
    assert torch.equal(live["x"], torch.full((256,), 1.0))


def test_restore_of_a_specific_corrupt_step_raises_and_never_falls_back(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (1, 2):
            manager.save(step, {"x": torch.full((64,), float(step))})
    flip_byte(payload_files(tmp_path, 2)[0], offset=-3)
    live = {"x": torch.zeros(64)}
    with safepoint.CheckpointManager(tmp_path) as manager:
        with pytest.raises(safepoint.CorruptCheckpointError):
            manager.restore(live, step=2)
        with pytest.raises(safepoint.CheckpointNotFoundError, match="step 9 is not committed"):
            manager.restore(live, step=9)
    assert torch.equal(live["x"], torch.zeros(64))


@pytest.mark.parametrize("read", ["restore", "load"])
def test_all_checkpoints_corrupt_raises_instead_of_starting_from_scratch(tmp_path: Path, read: str) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (1, 2):
            manager.save(step, {"x": torch.ones(64)})
    for step in (1, 2):
        flip_byte(payload_files(tmp_path, step)[0])
    with safepoint.CheckpointManager(tmp_path) as manager, pytest.raises(safepoint.CorruptCheckpointError) as caught:
        if read == "restore":
            manager.restore({"x": torch.zeros(64)})
        else:
            manager.load()
    assert "none verifies" in str(caught.value)


def test_a_manifest_moved_to_another_step_is_detected(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(8)})
        manager.save(2, {"x": torch.ones(8) * 2})
    # move step 1 wholesale under step 3's name: its files verify, but it is not step 3
    os.rename(tmp_path / step_dir(1), tmp_path / step_dir(3))
    live = {"x": torch.zeros(8)}
    with safepoint.CheckpointManager(tmp_path) as manager:
        report = manager.restore(live)
        assert report is not None
        assert report.step == 2
        assert report.skipped[0].step == 3
        assert "manifest of step 1, not of step 3" in report.skipped[0].reason


def test_a_newer_format_is_refused_not_skipped(tmp_path: Path) -> None:
    from safepoint._manifest import _body_checksum

    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(2)})
        manager.save(2, {"x": torch.ones(2)})
    path = tmp_path / step_dir(2) / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    body["format_version"] = safepoint.FORMAT_VERSION + 1
    body["checksum"] = _body_checksum(body)
    path.write_text(json.dumps(body))
    with safepoint.CheckpointManager(tmp_path) as manager, pytest.raises(safepoint.FormatVersionError) as caught:
        manager.restore({"x": torch.zeros(2)})
    assert f"version {safepoint.FORMAT_VERSION + 1}" in str(caught.value)
    assert f"up to {safepoint.FORMAT_VERSION}" in str(caught.value)


def test_verify_names_the_bad_file(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(64)})
        manager.save(2, {"x": torch.ones(64)})
        assert manager.verify().ok
    bad = payload_files(tmp_path, 2)[0]
    flip_byte(bad)
    report = safepoint.verify(tmp_path)
    assert not report.ok
    assert [c.step for c in report.bad] == [2]
    assert report.bad[0].bad_file == str(bad)


def test_manager_refuses_a_single_checkpoint_directory(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "one", {"x": torch.ones(1)})
    with pytest.raises(safepoint.ConfigError, match="single checkpoint"):
        safepoint.CheckpointManager(tmp_path / "one")


def test_verify_reports_leftover_staging_as_a_note_not_a_failure(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(4)})
    (tmp_path / step_dir(1) / ("d" * 32)).mkdir()  # a dead attempt beside the committed one
    (tmp_path / step_dir(2) / ("e" * 32)).mkdir(parents=True)  # a step that never committed
    report = safepoint.verify(tmp_path)
    assert report.ok
    assert [c.step for c in report.checkpoints] == [1]
    assert len(report.notes) == 2
    assert all("safepoint gc" in note for note in report.notes)


def test_checkpoints_lists_the_readable_ones_when_one_manifest_is_bad(tmp_path: Path) -> None:
    """Regression: one unreadable manifest made checkpoints() raise for the whole directory."""
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(1)})
        manager.save(2, {"x": torch.ones(1)})
        (tmp_path / step_dir(1) / "manifest.json").write_text("{")
        assert [c.step for c in manager.checkpoints()] == [2]
        assert manager.steps() == [1, 2]


def test_verify_of_a_single_corrupt_checkpoint_names_its_step(tmp_path: Path) -> None:
    """Regression: the step of a single checkpoint with a bad payload was reported as -1."""
    safepoint.save(tmp_path / "c", {"w": torch.ones(4)}, step=9)
    flip_byte(next((tmp_path / "c").glob("*/00000.safetensors")))
    report = safepoint.verify(tmp_path / "c")
    assert not report.ok
    assert report.checkpoints[0].step == 9


# -- manager.load: the newest valid checkpoint as plain data -------------------------------------------------------
def test_load_returns_the_newest_valid_checkpoint_as_plain_values(tmp_path: Path) -> None:
    state = make_state()
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.zeros(4)})
        manager.save(2, state, metrics={"loss": 0.5})
        values, report = manager.load()
    assert report.step == 2
    assert report.metrics == {"loss": 0.5}
    assert report.restored == ("model", "optimizer", "scheduler", "rng", "progress")
    assert report.skipped == ()
    assert values["progress"] == {"epoch": 3, "batch": 120, "losses": [0.5, 0.25]}
    assert_same_tensors(values["model"], dict(state["model"].state_dict()))
    assert values["optimizer"]["param_groups"][0]["lr"] == state["optimizer"].param_groups[0]["lr"]


def test_load_falls_back_over_corrupt_checkpoints_and_lists_them(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            manager.save(step, {"x": torch.full((256,), float(step)), "step": step})
    flip_byte(payload_files(tmp_path, 3)[0])
    with safepoint.CheckpointManager(tmp_path) as manager:
        values, report = manager.load()
        assert report.step == 2
        assert values["step"] == 2
        assert torch.equal(values["x"], torch.full((256,), 2.0))
        assert [s.step for s in report.skipped] == [3]
        assert "checksum" in report.skipped[0].reason
        with pytest.raises(safepoint.CorruptCheckpointError):
            manager.load(step=3)  # an explicit step never falls back
        assert manager.load(step=1)[0]["step"] == 1
        with pytest.raises(safepoint.CheckpointNotFoundError, match="step 9 is not committed"):
            manager.load(step=9)


def test_load_with_nothing_committed_raises_not_found(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        with pytest.raises(safepoint.CheckpointNotFoundError, match="nothing is committed"):
            manager.load()
        assert manager.restore({"x": torch.zeros(1)}) is None  # restore's own signal is unchanged


def test_load_applies_the_managers_migrations(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, state_version=1) as manager:
        manager.save(1, {"progress": {"epoch": 3}})
    migrations = safepoint.Migrations()

    @migrations.register(from_version=1)
    def add_batch(state: dict[str, Any]) -> dict[str, Any]:
        return safepoint.set_default(state, "progress/batch", 0)

    with safepoint.CheckpointManager(tmp_path, state_version=2, migrations=migrations) as manager:
        values, report = manager.load()
    assert values == {"progress": {"epoch": 3, "batch": 0}}
    assert report.state_version == 1
    assert report.migrations[0].endswith("add_batch (1 -> 2)")
    assert len(report.migrations) == 1


def test_load_unpickles_only_with_the_opt_in_and_can_map(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"extra": safepoint.Pickled({"a": {1, 2}}), "x": torch.arange(8.0)})
        with pytest.raises(safepoint.UnsafeCheckpointError, match="'extra'"):
            manager.load()
        values, _ = manager.load(allow_pickle=["extra"], mmap=True)
        assert values["extra"] == {"a": {1, 2}}
        assert torch.equal(values["x"], torch.arange(8.0))
        with pytest.raises(safepoint.ConfigError, match="mmap"):
            manager.load(mmap="yes")  # type: ignore[arg-type]
    with pytest.raises(safepoint.ManagerClosedError):
        manager.load()


def test_manager_restore_casts_dtypes_only_when_asked(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"w": torch.full((3,), 1 / 3)})
        live = {"w": torch.zeros(3, dtype=torch.bfloat16)}
        with pytest.raises(safepoint.RestoreError, match="cast_dtypes=True"):
            manager.restore(live)
        report = manager.restore(live, cast_dtypes=True)
    assert report is not None
    assert report.cast == ("w: torch.float32 -> torch.bfloat16",)
    assert torch.equal(live["w"], torch.full((3,), 1 / 3).to(torch.bfloat16))


def test_a_replaced_history_resumes_through_the_manager(tmp_path: Path) -> None:
    history: dict[str, list[float]] = {"loss": [1.0, 0.5]}
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"history": safepoint.Replace(history)})
        history["val_loss"] = [0.7]
        manager.save(2, {"history": safepoint.Replace(history)})
    resumed: dict[str, list[float]] = {}
    with safepoint.CheckpointManager(tmp_path) as manager:
        report = manager.restore({"history": safepoint.Replace(resumed)})
        assert manager.load()[0] == {"history": {"loss": [1.0, 0.5], "val_loss": [0.7]}}
    assert report is not None
    assert report.restored == ("history",)
    assert resumed == {"loss": [1.0, 0.5], "val_loss": [0.7]}


@pytest.mark.parametrize("step", ["3", -1, True, 1.5])
def test_restore_and_load_refuse_a_step_that_is_not_one(tmp_path: Path, step: Any) -> None:
    """Regression: a str or float step raised a bare ValueError from a format string."""
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(1)})
        with pytest.raises(safepoint.ConfigError, match="step must be None or a non-negative integer"):
            manager.load(step=step)
        with pytest.raises(safepoint.ConfigError, match="step must be None or a non-negative integer"):
            manager.restore({"x": torch.zeros(1)}, step=step)


def test_distributed_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distributed must be True or False, not 'no'"):
        safepoint.CheckpointManager(tmp_path / "run", distributed="no")  # type: ignore[arg-type]
