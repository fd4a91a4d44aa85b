"""The resolver: what is at a path, and which steps of a manager directory are committed."""

from __future__ import annotations

from pathlib import Path

import torch

import safepoint
from safepoint._layout import MANIFEST_NAME, step_dir
from safepoint._resolve import Kind, committed_steps, is_committed, resolve, step_dirs
from safepoint._storage import LocalStorage

LOCK = "0123456789abcdef0123456789abcdef.lock"


def state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(4.0)}


def test_nothing_there(tmp_path: Path) -> None:
    location = resolve(LocalStorage(tmp_path / "absent"))
    assert location.kind is Kind.MISSING
    assert not location.is_ours


def test_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    location = resolve(LocalStorage(tmp_path / "file"))
    assert location.kind is Kind.FILE
    assert not location.is_ours


def test_a_committed_checkpoint(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", state(), step=5)
    location = resolve(LocalStorage(tmp_path / "ckpt"))
    assert location.kind is Kind.CHECKPOINT
    assert location.committed
    assert location.is_committed_checkpoint
    assert location.steps == ()


def test_an_uncommitted_checkpoint_is_recognised_by_its_attempt_lock(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_bytes(b"")
    location = resolve(LocalStorage(tmp_path))
    assert location.kind is Kind.CHECKPOINT
    assert not location.committed
    assert location.is_ours
    assert not location.is_committed_checkpoint


def test_a_manager_directory_lists_every_step_directory_and_commits_only_some(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(20, state())
        manager.save(3, state())
    (tmp_path / step_dir(7)).mkdir()  # a save that never committed
    (tmp_path / "step-7").mkdir()  # not a canonical name: not ours
    (tmp_path / "notes.txt").write_text("mine")
    storage = LocalStorage(tmp_path)
    location = resolve(storage)
    assert location.kind is Kind.MANAGER
    assert [found.step for found in location.steps] == [3, 7, 20]
    assert [found.path for found in location.steps] == [step_dir(3), step_dir(7), step_dir(20)]
    assert committed_steps(storage, location) == [3, 20]
    assert committed_steps(storage) == [3, 20]
    assert is_committed(storage, step_dir(3))
    assert not is_committed(storage, step_dir(7))
    assert step_dirs(storage) == list(location.steps)


def test_a_directory_that_is_neither(tmp_path: Path) -> None:
    assert resolve(LocalStorage(tmp_path)).kind is Kind.OTHER  # empty
    (tmp_path / "0123456789abcdef0123456789abcdef").mkdir()  # attempt-shaped, but no lock proves it is ours
    (tmp_path / "model.bin").write_bytes(b"x")
    location = resolve(LocalStorage(tmp_path))
    assert location.kind is Kind.OTHER
    assert not location.is_ours
    assert committed_steps(LocalStorage(tmp_path), location) == []


def test_a_published_manifest_wins_over_step_directories_beside_it(tmp_path: Path) -> None:
    safepoint.save(tmp_path, state(), step=1)
    (tmp_path / step_dir(2)).mkdir()
    location = resolve(LocalStorage(tmp_path))
    assert location.kind is Kind.CHECKPOINT
    assert location.committed
    assert (tmp_path / MANIFEST_NAME).is_file()
