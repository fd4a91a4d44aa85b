"""Two processes under ``torch.distributed.run`` (gloo, CPU, Accelerate's MULTI_CPU with DDP): one rank is
SIGKILLed inside the third save; nothing of that save is visible, both earlier checkpoints verify, and the job
resumes through ``load_state`` to end bitwise identical, on every rank, to a job that never stopped. Then a file
of the newest checkpoint that only rank 1 reads is damaged: both ranks skip it together and resume from the one
before, again bitwise.

Invariants defended: commit is exclusive and visible means complete with many ranks; per-rank RNG and data-loader
states come back to their own rank.
"""

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

pytestmark = pytest.mark.slow  # four two-process jobs: about two minutes on two cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def job(project: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment.pop("SAFEPOINT_FAULTS", None)
    environment.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **(env or {}))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "tests.integrations.accelerate.worker", str(project), str(out),
        "--total-limit", "2",
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, check=False)


def test_one_rank_killed_mid_save_then_the_job_resumes_bitwise(tmp_path: Path) -> None:
    finished = job(tmp_path / "reference", tmp_path / "reference-out")
    assert finished.returncode == 0, finished.stderr[-3000:]

    project = tmp_path / "project"
    # rank 1 writes one file of its own per save (its RNG and loader states): the 3rd is inside the 3rd save
    crashed = job(
        project, tmp_path / "unused", env={"ACCEL_KILL_RANK": "1", "SAFEPOINT_FAULTS": "data.write.after@3=kill"}
    )
    assert crashed.returncode != 0, "the job was not killed"
    checkpoints = project / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == [
        "checkpoint_0",
        "checkpoint_1",
    ]
    for name in ("checkpoint_0", "checkpoint_1"):
        assert safepoint.verify(checkpoints / name).ok

    resumed = job(project, tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("at step 8") == 2, resumed.stdout  # both ranks resumed from checkpoint_1
    for rank in (0, 1):
        final = safepoint.load(tmp_path / "out" / f"rank{rank}")
        expected = safepoint.load(tmp_path / "reference-out" / f"rank{rank}")
        for key in ("model", "optimizer", "scheduler", "accelerator_step", "rng"):
            assert_same(final[key], expected[key], f"rank {rank}: {key}")
        # registered objects are saved by the main process, as Accelerate does: rank 1 resumed rank 0's history
        assert final["progress"]["step"] == expected["progress"]["step"]
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_1", "checkpoint_2"]

    # damage a file only rank 1 reads (its own RNG and loader states) in the newest checkpoint: both ranks
    # must skip it together, resume from checkpoint_1 again and, once more, end bitwise as the reference
    (own,) = (checkpoints / "checkpoint_2").rglob("r00001-own-*.safetensors")
    data = bytearray(own.read_bytes())
    data[len(data) // 2] ^= 0x01
    own.write_bytes(bytes(data))
    again = job(project, tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("at step 8") == 2, again.stdout
    assert f"skipping {checkpoints / 'checkpoint_2'}" in again.stderr, again.stderr[-3000:]  # the warning
    for rank in (0, 1):
        final = safepoint.load(tmp_path / "again" / f"rank{rank}")
        expected = safepoint.load(tmp_path / "reference-out" / f"rank{rank}")
        for key in ("model", "optimizer", "scheduler", "accelerator_step", "rng"):
            assert_same(final[key], expected[key], f"after the fallback, rank {rank}: {key}")
    # the damaged checkpoint_2 is kept for inspection; the new save went past it, and retention kept two
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_2", "checkpoint_3"]
