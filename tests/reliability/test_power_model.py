"""The power-loss model itself: what survives a crash is exactly what was made durable.

The reliability suite trusts PowerLossStorage to drop what a power cut drops; these tests pin that down with
hand-made sequences, so that a lenient model (one that keeps everything) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from safepoint._storage import LocalStorage
from tests.reliability.storage import PowerLossStorage, SimulatedCrash


@pytest.fixture
def model(tmp_path: Path) -> PowerLossStorage:
    root = tmp_path / "root"
    root.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    return PowerLossStorage(LocalStorage(root), images)


def _write(model: PowerLossStorage, path: str, data: bytes, *, fsync: bool) -> None:
    sink = model.create(path)
    sink.write(memoryview(data))
    if fsync:
        sink.finish()
    else:
        sink.abort()


def _crash(model: PowerLossStorage) -> Path:
    with pytest.raises(SimulatedCrash):
        model.crash()
    assert model.image is not None
    return model.image


def test_a_file_whose_directory_was_not_synced_vanishes(model: PowerLossStorage) -> None:
    model.ensure_dir("d")
    _write(model, "d/f", b"x" * 10, fsync=True)
    assert not (_crash(model) / "d" / "f").exists()


def test_a_synced_file_in_a_synced_directory_survives_whole(model: PowerLossStorage) -> None:
    model.ensure_dir("d")
    _write(model, "d/f", b"x" * 10, fsync=True)
    model.sync_dir("d")
    assert (_crash(model) / "d" / "f").read_bytes() == b"x" * 10


def test_unsynced_bytes_are_lost(model: PowerLossStorage) -> None:
    model.ensure_dir("d")
    _write(model, "d/f", b"x" * 10, fsync=False)
    model.sync_dir("d")
    assert (_crash(model) / "d" / "f").read_bytes() == b""


def test_unsynced_bytes_become_garbage_in_garbage_mode(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    model = PowerLossStorage(LocalStorage(tmp_path / "root"), tmp_path, mode="garbage")
    _write(model, "f", b"\0" * 4096, fsync=False)
    model.sync_dir("")
    image = _crash(model)
    assert len((image / "f").read_bytes()) == 4096
    assert (image / "f").read_bytes() != b"\0" * 4096


def test_a_publish_without_a_directory_sync_is_undone(model: PowerLossStorage) -> None:
    _write(model, "staged", b"manifest", fsync=True)
    model.sync_dir("")
    model.publish("staged", "final")
    image = _crash(model)
    assert (image / "staged").exists()
    assert not (image / "final").exists()


def test_a_removal_without_a_directory_sync_is_undone(model: PowerLossStorage) -> None:
    model.ensure_dir("d")
    _write(model, "d/f", b"keep", fsync=True)
    model.sync_dir("d")
    model.remove_file("d/f")
    model.remove_tree("d")
    image = _crash(model)
    assert (image / "d" / "f").read_bytes() == b"keep"


def test_a_synced_removal_stays_removed(model: PowerLossStorage) -> None:
    _write(model, "f", b"gone", fsync=True)
    model.sync_dir("")
    model.remove_file("f")
    model.sync_dir("")
    assert not (_crash(model) / "f").exists()


def test_nothing_reaches_the_disk_after_the_crash(model: PowerLossStorage) -> None:
    _crash(model)
    with pytest.raises(SimulatedCrash):
        model.create("late")
    assert not (Path(model.root) / "late").exists()


def test_crash_at_counts_mutating_calls(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    model = PowerLossStorage(LocalStorage(tmp_path / "root"), tmp_path, crash_at=3)
    sink = model.create("f")  # 1
    sink.write(memoryview(b"ab"))  # 2
    with pytest.raises(SimulatedCrash):
        sink.finish()  # 3: the fsync happened, then the power went
    assert model.calls == 3
