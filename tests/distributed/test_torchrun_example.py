"""The torchrun example, run as a user would: two processes, killed mid-commit, resumed to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import safepoint
from tests.distributed.group import ROOT

STEPS = ["--steps", "12", "--every", "3", "--timeout", "30"]


def torchrun(directory: Path, out: Path, faults: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "SAFEPOINT_FAULTS": faults}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["examples/torchrun_train.py", "--dir", str(directory), "--out", str(out), *STEPS]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=150)
    finally:
        if process.poll() is None:  # torchrun stops its workers on SIGTERM; SIGKILL if it does not
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def test_a_killed_torchrun_job_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    reference = torchrun(tmp_path / "reference", tmp_path / "reference-final")
    assert reference.returncode == 0, reference.stdout[-4000:]
    assert "starting fresh" in reference.stdout
    assert "saved step 11" in reference.stdout

    # rank 0 is SIGKILLed on its third commit (step 8), before publishing; torchrun then stops rank 1
    crashed = torchrun(tmp_path / "run", tmp_path / "run-final", faults="commit.publish.before@3=kill")
    assert crashed.returncode != 0
    assert "saved step 5" in crashed.stdout
    assert "saved step 8" not in crashed.stdout
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == [2, 5]  # the interrupted step 8 is invisible

    resumed = torchrun(tmp_path / "run", tmp_path / "run-final")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed from step 5" in resumed.stdout
    expected = safepoint.load(tmp_path / "reference-final")["model"]
    final = safepoint.load(tmp_path / "run-final")["model"]
    assert sorted(final) == sorted(expected) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == [5, 8, 11]  # keep_last=3
