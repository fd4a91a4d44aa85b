"""The collector reads only the save id of a manifest whose checksum matches its own text; any other manifest is
parsed in full, and one that does not parse leaves every attempt of its checkpoint alone, as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint._errors import CorruptCheckpointError, FormatVersionError
from safepoint._gc import collect
from safepoint._layout import step_dir
from safepoint._manifest import FORMAT_VERSION, Manifest, _canonical, _checksum_of, save_id_of
from safepoint._storage import LocalStorage

ORPHAN = "c" * 32  # an attempt directory without a lock file, which the manifest does not name


def _committed(root: Path) -> tuple[Path, str]:
    with safepoint.CheckpointManager(root) as manager:
        saved = manager.save(1, {"x": torch.ones(2)})
    step = root / step_dir(1)
    (step / ORPHAN).mkdir()
    (step / ORPHAN / "00000.safetensors").write_bytes(b"partial")
    return step, saved.save_id


def _written(body: dict[str, Any], *, indent: int | None = None) -> bytes:
    """A manifest's text with its checksum: canonical, as the writer writes it, or indented."""
    checksum = _checksum_of(_canonical(body))
    if indent is None:
        return b'{"checksum":"' + checksum.encode() + b'",' + _canonical(body)[1:] + b"\n"
    return json.dumps({"checksum": checksum, **body}, sort_keys=True, indent=indent).encode() + b"\n"


def _body(step: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((step / "manifest.json").read_bytes())
    del body["checksum"]
    return body


def test_an_intact_manifest_keeps_its_attempt_and_the_orphan_goes(tmp_path: Path) -> None:
    step, save_id = _committed(tmp_path)
    data = (step / "manifest.json").read_bytes()
    assert save_id_of(data, "m") == save_id
    assert save_id_of(data, "m") == Manifest.from_json(data, "m").save_id
    report = collect(LocalStorage(tmp_path))
    assert report.removed == (f"{step_dir(1)}/{ORPHAN}",)
    assert (step / save_id / "00000.safetensors").exists()
    assert safepoint.verify(tmp_path).ok


@pytest.mark.parametrize("damage", ["save_id", "truncated", "checksum"])
def test_a_damaged_manifest_leaves_every_attempt_alone(tmp_path: Path, damage: str) -> None:
    step, save_id = _committed(tmp_path)
    data = (step / "manifest.json").read_bytes()
    if damage == "save_id":  # one character of the save id, checksum unchanged: names another attempt
        data = data.replace(save_id.encode(), ORPHAN.encode())
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data.replace(b'"checksum":"xxh3_64:', b'"checksum":"xxh3_64:0', 1)
    (step / "manifest.json").write_bytes(data)
    with pytest.raises(CorruptCheckpointError):
        save_id_of(data, "m")
    collect(LocalStorage(tmp_path))
    assert (step / save_id / "00000.safetensors").exists()
    assert (step / ORPHAN / "00000.safetensors").exists()


def test_a_newer_format_version_leaves_every_attempt_alone(tmp_path: Path) -> None:
    step, save_id = _committed(tmp_path)
    data = _written({**_body(step), "format_version": FORMAT_VERSION + 1})
    (step / "manifest.json").write_bytes(data)
    with pytest.raises(FormatVersionError):
        save_id_of(data, "m")
    collect(LocalStorage(tmp_path))
    assert (step / ORPHAN / "00000.safetensors").exists()
    assert (step / save_id / "00000.safetensors").exists()


def test_a_manifest_written_otherwise_is_parsed_in_full(tmp_path: Path) -> None:
    step, save_id = _committed(tmp_path)
    body = _body(step)
    indented = _written(body, indent=1)  # the checksum matches the canonical body, not this text
    assert save_id_of(indented, "m") == save_id
    (step / "manifest.json").write_bytes(indented)
    assert collect(LocalStorage(tmp_path)).removed == (f"{step_dir(1)}/{ORPHAN}",)
    assert (step / save_id / "00000.safetensors").exists()
    # the same, with a field the full parse refuses: every attempt stays
    (step / ORPHAN).mkdir()
    (step / "manifest.json").write_bytes(_written({**body, "created": "yesterday"}, indent=1))
    collect(LocalStorage(tmp_path))
    assert (step / ORPHAN).exists()


def test_a_malformed_save_id_under_a_matching_checksum_is_corrupt() -> None:
    data = _written({"format_version": FORMAT_VERSION, "save_id": "../" + "a" * 29})
    with pytest.raises(CorruptCheckpointError, match="save_id"):
        save_id_of(data, "m")


# -- the pass a manager makes when it opens ------------------------------------------------------------------------
def test_opening_a_manager_reads_no_manifest_of_a_settled_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A step as a finished save leaves it (its manifest and its one attempt) is passed over when a manager opens:
    a manifest the collector would read is made unreadable, and opening says nothing of it; gc() reads it."""
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            manager.save(step, {"x": torch.ones(2)})
    for step in (1, 2, 3):
        (tmp_path / step_dir(step) / "manifest.json").write_bytes(b"not json")
    with caplog.at_level("WARNING", logger="safepoint"), safepoint.CheckpointManager(tmp_path) as manager:
        assert "cannot be read" not in caplog.text
        manager.gc()
    assert caplog.text.count("cannot be read") == 3


def test_opening_a_manager_collects_an_orphan_beside_a_committed_attempt(tmp_path: Path) -> None:
    step, save_id = _committed(tmp_path)
    with safepoint.CheckpointManager(tmp_path):
        pass
    assert not (step / ORPHAN).exists()
    assert (step / save_id / "00000.safetensors").exists()
    assert safepoint.verify(tmp_path).ok


def test_a_lone_attempt_the_manifest_does_not_name_is_left_on_open_and_collected_by_gc(tmp_path: Path) -> None:
    """A committed step whose own data is gone and which holds one other attempt: opening passes it over (it looks
    settled, and passing over removes nothing); an explicit gc reads the manifest and removes the attempt."""
    step, save_id = _committed(tmp_path)
    (step / save_id / "00000.safetensors").unlink()
    (step / save_id).rmdir()
    with safepoint.CheckpointManager(tmp_path) as manager:
        assert (step / ORPHAN / "00000.safetensors").exists()
        assert manager.gc().removed == (f"{step_dir(1)}/{ORPHAN}",)
    assert not (step / ORPHAN).exists()
