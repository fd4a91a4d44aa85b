"""Lifecycle never masks errors: close() is idempotent and safe from any state (seed failure 1, T5X)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint


class Boom(Exception):
    pass


def test_exception_inside_with_propagates_unchanged(tmp_path: Path) -> None:
    error = Boom("the real error")
    with pytest.raises(Boom) as caught, safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(2)})
        raise error
    assert caught.value is error
    assert manager.closed
    assert caught.value.__context__ is None


def test_close_is_idempotent_and_use_after_close_raises(tmp_path: Path) -> None:
    manager = safepoint.CheckpointManager(tmp_path)
    manager.close()
    manager.close()
    with pytest.raises(safepoint.ManagerClosedError):
        manager.save(1, {"x": torch.ones(1)})
    with pytest.raises(safepoint.ManagerClosedError):
        manager.restore({"x": torch.ones(1)})
    with pytest.raises(safepoint.ManagerClosedError), manager:
        pass


def test_the_t5x_cleanup_pattern_reports_the_real_error(tmp_path: Path) -> None:
    """T5X: construction fails, the cleanup path closes a manager that never existed, the real error is lost."""
    bad = tmp_path / "a-file"
    bad.write_text("")
    manager: safepoint.CheckpointManager | None = None
    with pytest.raises(safepoint.StorageError, match="not a directory"):
        try:
            manager = safepoint.CheckpointManager(bad)
        finally:
            if manager is not None:
                manager.close()


def test_close_is_safe_on_a_half_constructed_manager() -> None:
    manager = safepoint.CheckpointManager.__new__(safepoint.CheckpointManager)
    manager.close()
    manager.close()
    assert manager.closed
    assert "CheckpointManager" in repr(manager)


def test_close_is_safe_after_a_failed_restore_and_a_failed_save(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(2)})
        with pytest.raises(safepoint.RestoreError):
            manager.restore({"x": torch.ones(3)})
        with pytest.raises(safepoint.InvalidStateError):
            manager.save(2, {"x": object()})
        assert manager.steps() == [1]
    manager.close()
    assert manager.closed


def test_a_failing_close_does_not_replace_the_body_error(tmp_path: Path) -> None:
    class FailingClose(safepoint.CheckpointManager):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed too")

    error = Boom("the real error")
    with pytest.raises(Boom) as caught, FailingClose(tmp_path):
        raise error
    assert caught.value is error
    if sys.version_info >= (3, 11):
        assert any("close failed too" in note for note in caught.value.__notes__)


def test_a_failing_close_is_raised_when_the_body_succeeded(tmp_path: Path) -> None:
    class FailingClose(safepoint.CheckpointManager):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    with pytest.raises(RuntimeError, match="close failed"), FailingClose(tmp_path):
        pass


def test_no_unraisable_exceptions_from_abandoned_managers(tmp_path: Path) -> None:
    seen: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        for i in range(3):
            manager = safepoint.CheckpointManager(tmp_path / str(i))
            manager.save(0, {"x": torch.ones(1)})
            del manager
        half = safepoint.CheckpointManager.__new__(safepoint.CheckpointManager)
        del half
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert seen == []
