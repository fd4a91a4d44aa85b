"""DDP: Lightning saves on global rank 0 only and every rank loads. A real 2-process DDP run on the CPU (train.py,
Lightning's own subprocess launcher, gloo), stopped after two epochs and resumed with ``ckpt_path="last"``, must
end bit for bit where the uninterrupted 4-epoch run ends, and must really have resumed (not started over)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint

TRAIN = Path(__file__).with_name("train.py")
ROOT = Path(__file__).resolve().parents[3]


def _run(directory: Path, out: Path, *, epochs: int, resume: bool = False) -> None:
    command = [sys.executable, str(TRAIN), str(directory), str(out), "--devices", "2", "--epochs", str(epochs)]
    if resume:
        command.append("--resume")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _final(out: Path) -> dict[str, Any]:
    return safepoint.load(out)


@pytest.mark.timeout(600)
def test_a_ddp_run_stopped_and_resumed_from_last_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    _run(tmp_path / "whole", tmp_path / "whole.out", epochs=4)
    _run(tmp_path / "parts", tmp_path / "first.out", epochs=2)
    _run(tmp_path / "parts", tmp_path / "parts.out", epochs=4, resume=True)
    whole, first, resumed = (
        _final(tmp_path / "whole.out"),
        _final(tmp_path / "first.out"),
        _final(tmp_path / "parts.out"),
    )
    assert first["start_step"] == 0
    assert resumed["start_step"] == first["global_step"] > 0  # it resumed from last.ckpt, not from scratch
    assert resumed["global_step"] == whole["global_step"]
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, value in whole["optimizer"]["state"].items():
        for name, tensor in value.items():
            got = resumed["optimizer"]["state"][key][name]
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(got)), (key, name)
    safepoint.verify(tmp_path / "parts" / "last.ckpt")
