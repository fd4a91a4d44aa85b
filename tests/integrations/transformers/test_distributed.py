"""Two ranks under ``torch.distributed.run`` (gloo, CPU): kill -9 of one rank mid-save leaves nothing visible
under ``checkpoint-N``, and the resumed run ends bitwise where an uninterrupted one ends."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import safepoint
from tests.helpers import assert_same
from tests.integrations.transformers.tiny import StartedAt, build

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
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp-reference")
    torchrun(root / "out", root / "result")
    return root


@pytest.fixture
def reference(reference_run: Path) -> dict[str, object]:
    return safepoint.load(reference_run / "result")


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


def test_resume_with_another_world_size_restores_all_but_the_rng_and_says_so(
    reference_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "out"
    shutil.copytree(reference_run / "out", output)
    for step in (6, 8):
        shutil.rmtree(output / f"checkpoint-{step}")
    trainer = build(str(output))
    started = StartedAt()
    trainer.add_callback(started)
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        trainer.train(resume_from_checkpoint=True)
    assert started.step == 4
    assert trainer.state.global_step == 8
    warned = [r.getMessage() for r in caplog.records if "random generators are not restored" in r.getMessage()]
    assert len(warned) == 1
    assert "saved by 2 ranks, this run has 1" in warned[0]
