"""``safepoint rm`` when the file system refuses: one ``error:`` line naming the file and the errno, exit 2, never a
traceback. The failures are real ones of the kernel (an immutable directory, an injected EIO), not mocks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safepoint
from safepoint._layout import step_dir

DEAD_ID = "0123456789abcdef0123456789abcdef"


def make_run(root: Path) -> None:
    with safepoint.CheckpointManager(root) as manager:
        for step in (1, 2):
            manager.save(step, {"w": torch.full((3,), float(step))})


def rm(root: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    command = [*prefix, sys.executable, "-m", "safepoint._cli", "rm", str(root), "--step", "1", "--yes"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_rm_in_an_immutable_step_directory_is_one_error_line(tmp_path: Path) -> None:
    make_run(tmp_path)
    step = tmp_path / step_dir(1)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(step)], check=False).returncode:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        result = rm(tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(step)], check=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr == f"error: cannot remove {step / 'manifest.json'}: Operation not permitted [EPERM]\n"
    assert (step / "manifest.json").is_file()  # nothing was unpublished


def test_rm_when_checking_a_dead_attempts_lock_fails_is_one_error_line(tmp_path: Path) -> None:
    """The lock file of a dead attempt is stat-ed before it is removed; that stat failing escaped unmapped."""
    make_run(tmp_path)
    step = tmp_path / step_dir(1)
    (step / DEAD_ID).mkdir()
    lock = step / f"{DEAD_ID}.lock"
    lock.touch()
    strace = shutil.which("strace")
    if strace is None or subprocess.run([strace, "-o", "/dev/null", "true"], check=False).returncode:
        pytest.skip("strace cannot trace here")
    # the lock file's third lstat (newfstatat) is the one made while releasing it: make it fail with EIO
    inject = ["-f", "--seccomp-bpf", "-qq", "-o", "/dev/null", "-P", str(lock), "-e", "trace=newfstatat"]
    result = rm(tmp_path, strace, *inject, "-e", "inject=newfstatat:error=EIO:when=3")
    assert "Traceback" not in result.stderr
    assert result.stderr == f"error: cannot remove {lock}: Input/output error [EIO]\n"
    assert result.returncode == 2
