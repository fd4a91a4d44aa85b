"""``safepoint demo``: a run killed with SIGKILL and resumed ends bitwise identical, checked here independently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safepoint
from safepoint._cli import main
from safepoint._demo import MARKER


def _tensors(value: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {k: t for key, item in value.items() for k, t in _tensors(item, f"{prefix}/{key}").items()}
    return {}


def test_demo_kills_resumes_and_ends_bitwise_identical(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    # a previous demo's results: the demo must replace them, or the reference run's final save would collide
    root.mkdir()
    (root / MARKER).write_text("earlier demo\n")
    safepoint.save(root / "final" / "reference", {"stale": torch.zeros(1)})

    result = subprocess.run(
        [sys.executable, "-m", "safepoint._cli", "demo", "--dir", str(root)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "bitwise identical" in result.stdout
    assert "DIFFERENT" not in result.stdout
    assert "SIGKILL sent" in result.stdout
    assert "restored step" in result.stdout
    # the demo's own verdict is checked against the files it left
    reference = safepoint.load(root / "final" / "reference")
    resumed = safepoint.load(root / "final" / "resumed")
    assert "stale" not in reference
    for component in ("model", "optimizer"):
        left, right = _tensors(reference[component]), _tensors(resumed[component])
        assert left.keys() == right.keys()
        assert left  # there is something to compare
        for key in left:
            assert left[key].dtype == right[key].dtype, key
            assert torch.equal(left[key].reshape(-1).view(torch.uint8), right[key].reshape(-1).view(torch.uint8)), key
    assert reference["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    assert reference["progress"] == resumed["progress"]


def test_demo_refuses_a_non_empty_directory_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ")
    assert "not empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_demo_refuses_too_few_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path / "d"), "--steps", "5"]) == 2
    assert "--steps must be at least" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
