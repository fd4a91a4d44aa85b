"""Races between managers on one directory, made deterministic by a storage that lets 'the other process' act
at the worst moment. Each was found by the reliability suite's two-managers trial (tests/reliability).

Invariant defended: *nothing valid is lost, nothing valid is reported bad*, whatever another manager's retention
and gc do at the same time.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

import safepoint
from safepoint._gc import EMPTY_DIR_GRACE_S, collect
from safepoint._layout import MANIFEST_NAME, step_dir
from safepoint._storage import LocalStorage
from tests.reliability.storage import FaultyStorage


class _Rival(FaultyStorage):
    """A pass-through storage that runs ``act`` (the other process) once, when ``trigger`` sees its call."""

    def __init__(self, root: Path, trigger: str, path: str, act: object) -> None:
        super().__init__(LocalStorage(root))
        self.trigger, self.path, self.act, self.acted = trigger, path, act, 0

    def hit(self, kind: str, path: str) -> None:
        if kind == self.trigger and path == self.path:
            self.acted += 1
            self.act()  # type: ignore[operator]


def _state(value: float) -> dict[str, object]:
    return {"w": torch.full((64,), value)}


def test_retention_tolerates_a_step_another_manager_deleted_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = LocalStorage(tmp_path)
    rival = _Rival(tmp_path, "unlink", f"{step_dir(0)}/{MANIFEST_NAME}", lambda: other.remove_tree(step_dir(0)))
    with safepoint.CheckpointManager(rival, keep_last=1) as manager, caplog.at_level(logging.WARNING, "safepoint"):
        manager.save(0, _state(0))
        manager.save(1, _state(1))  # its retention deletes step 0, which the rival removes under it
        assert rival.acted == 1
        assert manager.steps() == [1]
    assert [r.getMessage() for r in caplog.records] == []  # before: "retention failed ... No such file"


def _delete_step(root: Path, step: int) -> None:
    storage = LocalStorage(root)
    storage.remove_file(f"{step_dir(step)}/{MANIFEST_NAME}")
    storage.remove_tree(step_dir(step))


def test_a_checkpoint_deleted_while_it_is_read_is_not_reported_bad(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(0, _state(0))
        manager.save(1, _state(1))

    class _DeletingReader(FaultyStorage):
        def read_into(self, path: str, buffer: memoryview, hasher: object) -> None:  # type: ignore[override]
            if path.startswith(f"{step_dir(1)}/") and path.endswith(".safetensors"):
                _delete_step(tmp_path, 1)  # retention elsewhere, between our listing and our read
            super().read_into(path, buffer, hasher)  # type: ignore[arg-type]

    with safepoint.CheckpointManager(_DeletingReader(LocalStorage(tmp_path))) as manager:
        report = manager.verify()
        assert report.ok, report.bad
        assert [c.step for c in report.checkpoints] == [0]
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, _state(1))
    with safepoint.CheckpointManager(_DeletingReader(LocalStorage(tmp_path))) as manager:
        live = _state(9)
        restored = manager.restore(live)
        assert restored is not None
        assert restored.step == 0
        assert restored.skipped == ()  # deleted, not corrupt: nothing to report as skipped
        assert torch.equal(live["w"], torch.full((64,), 0.0))  # type: ignore[arg-type]


def test_a_collector_in_a_loop_cannot_starve_a_starting_save(tmp_path: Path) -> None:
    # the other process collects right after each creation of the step directory, before the lock file exists
    inner = LocalStorage(tmp_path)

    class _Collecting(_Rival):
        def ensure_dir(self, path: str) -> bool:
            created = super().ensure_dir(path)
            if path == step_dir(3):
                self.acted += 1
                collect(inner)
            return created

    rival = _Collecting(tmp_path, "", "", None)
    with safepoint.CheckpointManager(rival) as manager:
        manager.save(3, _state(3))  # before: "cannot start a save ...: it keeps disappearing"
        assert manager.steps() == [3]
    assert rival.acted >= 1


def test_gc_removes_an_empty_step_directory_only_once_it_is_old(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(0, _state(0))
        empty = tmp_path / step_dir(5)
        empty.mkdir()
        assert manager.gc().removed == ()
        assert empty.is_dir()
        old = time.time() - EMPTY_DIR_GRACE_S - 1
        os.utime(empty, (old, old))
        assert manager.gc().removed == (step_dir(5),)
        assert not empty.exists()
        assert manager.steps() == [0]
