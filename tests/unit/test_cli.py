"""The ``safepoint`` command line, run on real checkpoint directories: output, exit codes and what it leaves on disk."""

from __future__ import annotations

import collections
import os
import random
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

import safepoint
from safepoint import _faults as faults
from safepoint._cli import main
from safepoint._storage import open_storage

STEPS = (100, 200, 300)
LOSS = {100: 0.125, 200: 0.0625, 300: 0.03125}
DEAD_ID = "0123456789abcdef0123456789abcdef"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_run(root: Path) -> dict[int, safepoint.CheckpointInfo]:
    infos = {}
    with safepoint.CheckpointManager(root) as manager:
        for step in STEPS:
            state = {"weights": torch.full((3,), float(step)), "progress": {"step": step}}
            infos[step] = manager.save(step, state, metrics={"loss": LOSS[step]})
    return infos


def payload(root: Path, step: int) -> Path:
    (found,) = (root / f"step-{step:012d}").glob("*/00000.safetensors")
    return found


def row(out: str, first: str) -> str:
    """The one output line whose first word is ``first``."""
    (line,) = [line for line in out.splitlines() if line.split()[:1] == [first]]
    return line


def flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def flip_last_byte(path: Path) -> None:
    flip_byte(path, -1)


def damage_manifest(root: Path, step: int) -> Path:
    """A bit flipped in the middle of a step's manifest: it no longer parses or matches its checksum."""
    manifest = root / f"step-{step:012d}" / "manifest.json"
    flip_byte(manifest, len(manifest.read_bytes()) // 2)
    return manifest


def dead_attempt(root: Path, step: int) -> Path:
    """What a writer killed before publishing leaves: an attempt directory with data and no manifest."""
    attempt = root / f"step-{step:012d}" / DEAD_ID
    attempt.mkdir(parents=True)
    (attempt / "00000.safetensors").write_bytes(b"partial")
    return attempt


# -- ls --------------------------------------------------------------------------------------------------------
def test_ls_lists_every_step_with_time_size_metrics_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    infos = make_run(tmp_path / "run")
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    assert code == 0
    for step, info in infos.items():
        line = row(out, str(step))
        assert f"loss={LOSS[step]}" in line
        assert datetime.fromtimestamp(info.created).astimezone().isoformat(timespec="seconds") in line
        assert line.rstrip().endswith("committed (not verified)")
        assert (f"{info.nbytes} B" if info.nbytes < 1024 else f"{info.nbytes / 1024:.1f} KiB") in line
    assert "note:" not in out


def test_ls_flags_a_truncated_file_as_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    victim = payload(tmp_path / "run", 200)
    with open(victim, "r+b") as handle:
        handle.truncate(10)
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    assert code == 0
    assert "damaged:" in row(out, "200")
    assert victim.name in row(out, "200")
    assert row(out, "100").rstrip().endswith("committed (not verified)")
    assert row(out, "300").rstrip().endswith("committed (not verified)")


def test_ls_checks_sizes_but_never_reads_payloads_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run")
    flip_last_byte(payload(tmp_path / "run", 200))  # same size: only reading the bytes could tell
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    assert code == 0
    # a damaged step must not look checked: the status says what was not done
    assert row(out, "200").rstrip().endswith("committed (not verified)")
    assert "`safepoint ls --verify` reads every byte" in row(out, "statuses")


def test_ls_verify_reads_every_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    victim = payload(tmp_path / "run", 200)
    flip_last_byte(victim)
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"), "--verify")
    assert code == 0
    assert "INVALID:" in row(out, "200")
    assert victim.name in row(out, "200")
    assert row(out, "100").rstrip().endswith("valid (verified)")
    assert row(out, "300").rstrip().endswith("valid (verified)")
    assert out.splitlines()[-1].endswith("1 invalid")


def test_ls_notes_an_uncommitted_step_below_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    dead_attempt(tmp_path / "run", 400)
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    assert code == 0
    assert not [line for line in out.splitlines() if line.split()[:1] == ["400"]]
    note = row(out, "note:")
    assert "step-000000000400" in note
    assert "uncommitted" in note


def test_ls_shows_a_single_checkpoint_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safepoint.save(tmp_path / "ckpt", {"w": torch.ones(2)}, step=7, metrics={"acc": 0.75})
    code, out, _ = run(capsys, "ls", str(tmp_path / "ckpt"))
    assert code == 0
    assert "acc=0.75" in row(out, "7")
    assert row(out, "7").rstrip().endswith("committed (not verified)")


# -- inspect ---------------------------------------------------------------------------------------------------
def test_inspect_shows_keys_kinds_dtypes_shapes_and_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {
        "model": torch.nn.Linear(3, 2),
        "table": torch.zeros(4, 5, dtype=torch.int16),
        "mask": np.ones(6, dtype=np.uint8),
    }
    info = safepoint.save(tmp_path / "ckpt", state, step=42, metrics={"loss": 0.5}, state_version=3)
    code, out, _ = run(capsys, "inspect", str(tmp_path / "ckpt"))
    assert code == 0
    assert row(out, "model/weight").split() == ["model/weight", "tensor", "float32", "[2,", "3]", "24"]
    assert row(out, "model/bias").split() == ["model/bias", "tensor", "float32", "[2]", "8"]
    assert row(out, "table").split() == ["table", "tensor", "int16", "[4,", "5]", "40"]
    assert row(out, "mask").split() == ["mask", "ndarray", "uint8", "[6]", "6"]
    assert row(out, "step").split() == ["step", "42"]
    assert row(out, "state_version").split() == ["state_version", "3"]
    assert info.save_id in row(out, "save")
    assert "loss=0.5" in row(out, "metrics")
    assert "torch.nn.modules.linear.Linear" in row(out, "state")


def test_inspect_shows_every_value_not_only_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.25)
    state = {
        "model": model,
        "scheduler": scheduler,
        "progress": {"step": 1200, "epoch": 3, "done": False, "best": None},
        "rng": {"python": random.Random(5).getstate()},
        "note": "x" * 500,
        "raw": b"\x00\x01",
        "history": {},
        "queue": [],
    }
    safepoint.save(tmp_path / "ckpt", state, step=1200)
    code, out, _ = run(capsys, "inspect", str(tmp_path / "ckpt"))
    assert code == 0
    assert row(out, "model/weight").split() == ["model/weight", "tensor", "float32", "[2,", "2]", "16"]
    assert row(out, "progress/step").split() == ["progress/step", "int", "1200"]
    assert row(out, "progress/epoch").split() == ["progress/epoch", "int", "3"]
    assert row(out, "progress/done").split() == ["progress/done", "bool", "False"]
    assert row(out, "progress/best").split() == ["progress/best", "none", "None"]
    assert row(out, "scheduler/step_size").split() == ["scheduler/step_size", "int", "3"]
    assert row(out, "scheduler/gamma").split() == ["scheduler/gamma", "float", "0.25"]
    assert row(out, "scheduler/base_lrs").split() == ["scheduler/base_lrs", "list[1]", "[0.5]"]
    assert row(out, "raw").split() == ["raw", "bytes", "b'\\x00\\x01'"]
    assert row(out, "history").split() == ["history", "dict", "{}"]
    assert row(out, "queue").split() == ["queue", "list", "[]"]
    # 625 numbers of a Python RNG state are one row, cut short, with the full length named
    rng = row(out, "rng/python/1").rstrip().split(maxsplit=2)
    assert rng[:2] == ["rng/python/1", "tuple[625]"]
    assert rng[2].startswith("(")
    assert rng[2].endswith(" chars)")
    assert len(rng[2]) < 120
    note = row(out, "note").rstrip().split(maxsplit=2)
    assert note[:2] == ["note", "str"]
    assert note[2].startswith("'xxx")
    assert note[2].endswith("(502 chars)")


def test_inspect_names_the_type_of_typed_top_level_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"counts": collections.Counter(a=2), "where": PurePosixPath("runs/a"), "n": 3}
    safepoint.save(tmp_path / "ckpt", state)
    code, out, _ = run(capsys, "inspect", str(tmp_path / "ckpt"))
    assert code == 0
    assert "counts (collections.Counter), where (pathlib.PurePosixPath), n (int)" in row(out, "state")


def test_inspect_picks_the_newest_step_or_the_one_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    infos = make_run(tmp_path / "run")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "run"))
    assert code == 0
    assert row(out, "step").split() == ["step", "300"]
    assert infos[300].save_id in out
    code, out, _ = run(capsys, "inspect", str(tmp_path / "run"), "--step", "100")
    assert code == 0
    assert row(out, "step").split() == ["step", "100"]
    assert infos[100].save_id in out
    assert infos[300].save_id not in out


def test_inspect_an_uncommitted_step_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    code, out, err = run(capsys, "inspect", str(tmp_path / "run"), "--step", "150")
    assert code == 2
    assert out == ""
    assert err.startswith("error: step 150 is not committed")
    assert "100, 200, 300" in err


def test_inspect_a_corrupt_manifest_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    (tmp_path / "run" / "step-000000000300" / "manifest.json").write_text('{"step": 300')
    code, _, err = run(capsys, "inspect", str(tmp_path / "run"))
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert "manifest.json" in err


# -- verify ----------------------------------------------------------------------------------------------------
def test_verify_passes_when_every_checkpoint_is_intact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    code, out, _ = run(capsys, "verify", str(tmp_path / "run"))
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("valid")] == [
        ["valid", "step", str(step)] for step in STEPS
    ]
    assert "INVALID" not in out


def test_verify_fails_on_a_flipped_byte_and_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    victim = payload(tmp_path / "run", 200)
    flip_last_byte(victim)
    code, out, _ = run(capsys, "verify", str(tmp_path / "run"))
    assert code == 1
    assert "INVALID step 200" in out
    assert f"bad file: {victim}" in out
    assert "valid  step 100" in out
    assert "valid  step 300" in out


def test_verify_reports_staging_leftovers_as_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    dead_attempt(tmp_path / "run", 400)
    code, out, _ = run(capsys, "verify", str(tmp_path / "run"))
    assert code == 0
    assert "step-000000000400" in row(out, "note:")
    assert "INVALID" not in out


def test_verify_a_single_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safepoint.save(tmp_path / "ckpt", {"w": torch.arange(10)}, step=5)
    code, out, _ = run(capsys, "verify", str(tmp_path / "ckpt"))
    assert code == 0
    assert "valid  step 5" in out
    flip_last_byte(next((tmp_path / "ckpt").glob("*/00000.safetensors")))
    code, out, _ = run(capsys, "verify", str(tmp_path / "ckpt"))
    assert code == 1
    assert "INVALID step 5" in out


def test_verify_on_a_damaged_manifest_names_a_command_that_removes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run")
    damage_manifest(tmp_path / "run", 200)
    code, out, _ = run(capsys, "verify", str(tmp_path / "run"))
    assert code == 1
    assert "INVALID step 200" in out
    assert "gc" not in out  # gc leaves a checkpoint whose manifest cannot be read alone: it must not be offered
    hint = row(out, "to").split(": ", 1)[1]
    assert hint == f"safepoint rm {shlex.quote(str(tmp_path / 'run'))} --step 200"
    code, out, err = run(capsys, *shlex.split(hint)[1:], "--yes")  # what verify said to run, as it said it
    assert code == 0, err
    assert not (tmp_path / "run" / "step-000000000200").exists()
    code, out, _ = run(capsys, "verify", str(tmp_path / "run"))
    assert code == 0
    assert "all 2 committed checkpoint(s) are valid" in out


# -- rm --------------------------------------------------------------------------------------------------------
def test_rm_removes_a_checkpoint_whose_manifest_is_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    infos = make_run(tmp_path / "run")
    manifest = damage_manifest(tmp_path / "run", 200)
    code, out, _ = run(capsys, "gc", str(tmp_path / "run"))
    assert code == 0
    assert out.startswith("nothing to collect")  # gc is right to leave it: that is rm's job
    code, out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "200", "--yes")
    assert code == 0, err
    assert [line.split() for line in out.splitlines()[:4]] == [
        ["unpublished", "step-000000000200/manifest.json"],
        ["removed", f"step-000000000200/{infos[200].save_id}"],
        ["removed", "step-000000000200"],
        ["removed", "step", "200", f"({manifest.parent})"],
    ]
    assert not manifest.parent.exists()
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == [100, 300]
        assert manager.verify().ok


def test_an_interrupted_rm_leaves_nothing_visible_and_gc_finishes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    infos = make_run(tmp_path / "run")
    data = tmp_path / "run" / "step-000000000200" / infos[200].save_id
    # the disk fails once the manifest is gone, before the data (the fault point raises the raw OSError)
    with faults.armed({"gc.delete.before": "eio"}), pytest.raises(OSError, match=r"injected at gc\.delete\.before"):
        main(["rm", str(tmp_path / "run"), "--step", "200", "--yes"])
    assert data.exists()  # the data is still there, but no reader sees it: unpublished first
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["100", "300"]
    assert "uncommitted" in row(out, "note:")
    code, out, _ = run(capsys, "gc", str(tmp_path / "run"))
    assert code == 0
    removed = [line.split()[1] for line in out.splitlines() if line.startswith("removed")]
    assert removed == [f"step-000000000200/{infos[200].save_id}", "step-000000000200"]
    assert not data.exists()


def test_rm_removes_a_checkpoint_with_a_truncated_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    with open(payload(tmp_path / "run", 300), "r+b") as handle:
        handle.truncate(10)
    # the newest step, but damaged: removing it loses nothing a resume could use
    code, _out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "300", "--yes")
    assert code == 0, err
    assert not (tmp_path / "run" / "step-000000000300").exists()
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == [100, 200]


def test_rm_removes_a_healthy_old_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    code, _out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "100", "--yes")
    assert code == 0, err
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == [200, 300]
        assert manager.verify().ok


def test_rm_refuses_the_newest_valid_checkpoint_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run")
    code, out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "300", "--yes")
    assert code == 2
    assert out == ""
    assert "step 300 is the newest valid checkpoint" in err
    assert "--force" in err
    assert (tmp_path / "run" / "step-000000000300" / "manifest.json").exists()
    code, _, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "300", "--yes", "--force")
    assert code == 0, err
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == [100, 200]


def test_rm_protects_an_older_step_when_every_newer_one_is_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run")
    flip_last_byte(payload(tmp_path / "run", 300))  # only reading every byte finds this one
    code, _, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "200", "--yes")
    assert code == 2
    assert "step 200 is the newest valid checkpoint" in err
    assert (tmp_path / "run" / "step-000000000200" / "manifest.json").exists()


def test_rm_without_a_terminal_needs_yes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    code, out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "100")
    assert code == 2
    assert out == ""
    assert "pass --yes" in err
    assert (tmp_path / "run" / "step-000000000100" / "manifest.json").exists()


class _Terminal:
    """A stdin that is a terminal on which the user types ``answer``."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.answer


def test_rm_asks_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run(tmp_path / "run")
    damage_manifest(tmp_path / "run", 100)
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "100")
    assert code == 0
    assert out == "nothing removed\n"
    assert err.startswith(f"remove step 100 ({tmp_path / 'run' / 'step-000000000100'}), damaged: ")
    assert err.endswith("? [y/N] ")
    assert (tmp_path / "run" / "step-000000000100" / "manifest.json").exists()
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out, _ = run(capsys, "rm", str(tmp_path / "run"), "--step", "100")
    assert code == 0
    assert not (tmp_path / "run" / "step-000000000100").exists()


def test_rm_a_single_checkpoint_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safepoint.save(tmp_path / "ckpt", {"w": torch.ones(3)}, step=7)
    code, _, err = run(capsys, "rm", str(tmp_path / "ckpt"), "--yes")
    assert code == 2  # the only checkpoint there is, and it is valid
    assert "newest valid checkpoint" in err
    flip_byte(tmp_path / "ckpt" / "manifest.json", 40)
    code, _out, err = run(capsys, "rm", str(tmp_path / "ckpt"), "--yes")
    assert code == 0, err
    assert not (tmp_path / "ckpt").exists()


def test_rm_names_the_step_and_refuses_what_is_not_committed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run")
    dead_attempt(tmp_path / "run", 400)
    code, _, err = run(capsys, "rm", str(tmp_path / "run"), "--yes")
    assert code == 2
    assert "--step N" in err  # rm never picks a step by itself
    code, _, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "150", "--yes")
    assert code == 2
    assert "step 150 is not committed" in err
    assert "100, 200, 300" in err
    code, _, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "400", "--yes")
    assert code == 2
    assert "`safepoint gc`" in err
    assert (tmp_path / "run" / "step-000000000400" / DEAD_ID).exists()


def test_rm_never_deletes_files_safepoint_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    foreign = tmp_path / "run" / "step-000000000100" / "notes.txt"
    foreign.write_text("mine")
    code, out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "100", "--yes")
    assert code == 0, err
    assert "files safepoint did not write" in row(out, "left")
    assert foreign.read_text() == "mine"
    assert not (tmp_path / "run" / "step-000000000100" / "manifest.json").exists()


def test_rm_leaves_the_attempt_of_a_save_in_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    infos = make_run(tmp_path / "run")
    attempt = dead_attempt(tmp_path / "run", 200)  # another writer's attempt at the same step, still running
    lock = open_storage(tmp_path / "run").lock_attempt(f"step-000000000200/{DEAD_ID}.lock")
    try:
        code, out, err = run(capsys, "rm", str(tmp_path / "run"), "--step", "200", "--yes")
    finally:
        lock.release(remove=False)
    assert code == 0, err
    assert "writer is alive" in row(out, "left")
    assert attempt.exists()
    assert not (tmp_path / "run" / "step-000000000200" / infos[200].save_id).exists()
    assert not (tmp_path / "run" / "step-000000000200" / "manifest.json").exists()


# -- gc --------------------------------------------------------------------------------------------------------
def test_gc_removes_a_dead_attempt_and_keeps_committed_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run")
    attempt = dead_attempt(tmp_path / "run", 400)
    code, out, _ = run(capsys, "gc", str(tmp_path / "run"))
    assert code == 0
    assert not attempt.exists()
    assert not attempt.parent.exists()
    removed = [line.split()[1] for line in out.splitlines() if line.startswith("removed")]
    assert removed == [f"step-000000000400/{DEAD_ID}", "step-000000000400"]
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        assert manager.steps() == list(STEPS)
        assert manager.verify().ok


def test_gc_leaves_an_attempt_whose_writer_is_alive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    attempt = dead_attempt(tmp_path / "run", 400)
    lock = open_storage(tmp_path / "run").lock_attempt(f"step-000000000400/{DEAD_ID}.lock")
    try:
        code, out, _ = run(capsys, "gc", str(tmp_path / "run"))
        assert code == 0
        assert attempt.exists()
        assert "writer is alive" in row(out, "left")
    finally:
        lock.release(remove=False)
    code, out, _ = run(capsys, "gc", str(tmp_path / "run"))
    assert code == 0
    assert not attempt.exists()


def test_gc_refuses_a_directory_that_is_not_safepoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # someone's data that merely looks like an attempt name must survive a mistyped path
    foreign = tmp_path / "datasets" / DEAD_ID
    foreign.mkdir(parents=True)
    (foreign / "shard.bin").write_bytes(b"precious")
    code, out, err = run(capsys, "gc", str(tmp_path / "datasets"))
    assert code == 2
    assert out == ""
    assert "does not look like a safepoint directory" in err
    assert (foreign / "shard.bin").read_bytes() == b"precious"


def test_gc_with_nothing_to_do_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run")
    code, out, _ = run(capsys, "gc", str(tmp_path / "run"))
    assert code == 0
    assert out.startswith("nothing to collect")


# -- usage -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["ls", "inspect", "verify", "gc", "rm"])
def test_a_missing_path_exits_2_with_one_error_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    code, out, err = run(capsys, command, str(missing))
    assert code == 2
    assert out == ""
    assert err == f"error: {missing} does not exist\n"
    assert not missing.exists()


@pytest.mark.parametrize("command", ["ls", "inspect", "verify", "gc", "demo", "diff", "rm"])
def test_help_says_what_a_command_does_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: safepoint {command}")
    example = out.split("example:\n", 1)[1]
    assert example.strip().startswith(f"safepoint {command} ")


def test_no_command_and_bad_options_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            capsys,
        )[0]
        == 2
    )
    code, _, err = run(capsys, "inspect", ".", "--step", "-3")
    assert code == 2
    assert "negative" in err


def test_the_module_runs_as_a_program_without_tracebacks(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    flip_last_byte(payload(tmp_path / "run", 300))
    env = dict(os.environ, COLUMNS="300")
    bad = subprocess.run(
        [sys.executable, "-m", "safepoint._cli", "verify", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1, bad.stderr
    assert "INVALID step 300" in bad.stdout
    assert "Traceback" not in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "safepoint._cli", "ls", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr == f"error: {tmp_path / 'missing'} does not exist\n"
