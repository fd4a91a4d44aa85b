"""Two ranks under ``torch.distributed.run`` (gloo, CPU): kill -9 of one rank mid-save leaves nothing visible
under ``checkpoint-N``, and the resumed run ends bitwise where an uninterrupted one ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import safepoint
from tests.helpers import assert_same

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def torchrun(output: Path, result: Path, *args: str, kill: str | None = None, rank: int = 0) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    for name in ("SP_KILL", "SP_KILL_RANK"):
        env.pop(name, None)
    if kill is not None:
        env["SP_KILL"] = kill
        env["SP_KILL_RANK"] = str(rank)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "tests.integrations.transformers.tiny", str(output), str(result), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if kill is None:
        assert done.returncode == 0, done.stderr[-4000:]
    return done.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("ddp-reference")
    torchrun(root / "out", root / "result")
    return safepoint.load(root / "result")


@pytest.mark.parametrize(("kill", "rank"), [("in-save:6", 1), ("publish:6", 0)], ids=["rank1-in-save", "rank0-publish"])
def test_kill_one_rank_mid_save_then_resume(reference: dict[str, object], tmp_path: Path, kill: str, rank: int) -> None:
    output = tmp_path / "out"
    assert torchrun(output, tmp_path / "unused", kill=kill, rank=rank) != 0
    visible = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
    assert visible == ["checkpoint-2", "checkpoint-4"]
    torchrun(output, tmp_path / "result", "--resume")
    resumed = safepoint.load(tmp_path / "result")
    assert resumed["started"] == 4
    assert resumed["global_step"] == reference["global_step"]
    assert_same(resumed["model"], reference["model"], "model")
    assert_same(resumed["optimizer"], reference["optimizer"], "optimizer")
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    # every rank's RNG is inside the one commit
    manifest = next((output / "checkpoint-8" / "safepoint").rglob("manifest.json")).read_text()
    assert "r00001-own" in manifest
