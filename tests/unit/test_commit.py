"""The commit protocol: interrupted and failed saves leave nothing visible, commits are exclusive, gc is safe."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safepoint
from safepoint import _faults as faults
from safepoint._layout import step_dir
from safepoint._storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
PUBLISH = faults.POINTS.index("commit.publish.after")
SAVE_POINTS = [p for p in faults.POINTS if not p.startswith(("retention.", "gc."))]


def attempts(root: Path, step: int) -> list[str]:
    directory = root / step_dir(step)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("point", SAVE_POINTS[: SAVE_POINTS.index("commit.publish.before") + 1])
def test_an_error_before_publication_leaves_nothing(tmp_path: Path, point: str) -> None:
    state = {"x": torch.arange(1000.0), "y": {"z": torch.ones(3, dtype=torch.bfloat16)}}
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, state)
        with faults.armed({point: "eio"}) as armed, pytest.raises(OSError, match="injected"):
            manager.save(2, state)
        assert armed[point].hits == 1
        assert manager.steps() == [1]
        assert not (tmp_path / step_dir(2)).exists()  # staging given back, empty step dir removed
        manager.save(2, state)  # a retry of the same step succeeds
        assert manager.steps() == [1, 2]
    assert safepoint.verify(tmp_path).ok


@pytest.mark.parametrize("point", ["commit.publish.after", "commit.dirsync.after"])
def test_an_error_after_publication_is_ambiguous_and_a_retry_verifies(tmp_path: Path, point: str) -> None:
    """An error right after the link used to run the pre-publication cleanup, deleting the data of a checkpoint
    whose manifest was already visible."""
    state = {"x": torch.arange(10.0)}
    with safepoint.CheckpointManager(tmp_path) as manager:
        with faults.armed({point: "eio"}), pytest.raises(safepoint.AmbiguousCommitError) as caught:
            manager.save(3, state)
        assert "Saving step 3 again is safe" in str(caught.value)
        with pytest.raises(safepoint.CheckpointExistsError) as again:
            manager.save(3, state)
        assert again.value.verified is True
        report = manager.restore({"x": torch.zeros(10)})
        assert report is not None
        assert report.step == 3


def test_kill_at_each_fault_point_leaves_only_verified_checkpoints(tmp_path: Path) -> None:
    """SIGKILL at every named point of a save, in a real subprocess; then a fresh reader checks everything."""
    script = (
        "import sys, torch, safepoint\n"
        "m = safepoint.CheckpointManager(sys.argv[1], keep_last=2)\n"
        "for step in range(3):\n"
        "    m.save(step, {'w': torch.full((5000,), float(step)), 'meta': {'step': step}})\n"
    )
    for point in faults.POINTS:
        directory = tmp_path / point
        # save points: the third time, during step 2; retention and gc run first during step 2's retention
        nth = 1 if point.startswith(("retention.", "gc.")) else 3
        env = {**os.environ, "SAFEPOINT_FAULTS": f"{point}@{nth}=kill"}
        result = subprocess.run([sys.executable, "-c", script, str(directory)], env=env, cwd=ROOT, timeout=120)
        assert result.returncode == -9, f"{point} was never reached"  # every point is exercised
        with safepoint.CheckpointManager(directory) as manager:  # opening collects dead staging
            steps = manager.steps()
            assert manager.verify().ok, point
            for step in steps:
                values = safepoint.load(directory / step_dir(step))
                assert values["meta"] == {"step": step}, point
                assert torch.equal(values["w"], torch.full((5000,), float(step))), point
            assert 1 in steps, point  # the newest step acknowledged before the kill is there
            published = faults.POINTS.index(point) >= PUBLISH and not point.startswith(("retention.", "gc."))
            step_2_visible = 2 in steps
            assert step_2_visible == (published or point.startswith(("retention.", "gc."))), (point, steps)
            for step in steps:
                names = attempts(directory, step)
                assert "manifest.json" in names, (point, names)
                assert not any(n.endswith(".lock") for n in names), (point, names)
            # an empty step directory may stay for gc.EMPTY_DIR_GRACE_S (a save may be starting in it); no bytes
            stray = [p for p in directory.iterdir() if p.name not in {step_dir(s) for s in steps}]
            assert [p for p in stray if not p.is_dir() or any(p.iterdir())] == [], point


def _race(
    directory: str, value: float, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue[str]
) -> None:
    barrier.wait()
    try:
        safepoint.save(directory, {"w": torch.full((20000,), value), "who": value})
        results.put(f"ok {value}")
    except safepoint.CheckpointExistsError:
        results.put("exists")
    except Exception as err:  # reported to the parent, which fails the test
        results.put(f"error {err!r}")


def test_concurrent_saves_of_one_checkpoint_exactly_one_wins(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for trial in range(4):
        directory = str(tmp_path / f"trial{trial}")
        barrier = context.Barrier(4)
        results: multiprocessing.Queue[str] = context.Queue()
        workers = [context.Process(target=_race, args=(directory, float(i), barrier, results)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        outcomes = sorted(results.get(timeout=5) for _ in workers)
        winners = [o for o in outcomes if o.startswith("ok")]
        assert len(winners) == 1, outcomes
        assert outcomes.count("exists") == 3, outcomes
        values = safepoint.load(directory)
        winner = float(winners[0].split()[1])
        assert values["who"] == winner
        assert torch.equal(values["w"], torch.full((20000,), winner))  # entirely one writer's
        assert safepoint.verify(directory).ok


# -- gc -----------------------------------------------------------------------------------------------------------
def test_gc_removes_dead_attempts_and_keeps_live_and_committed_ones(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        committed = manager.save(1, {"x": torch.ones(2)})
    storage = LocalStorage(tmp_path)
    ckpt = step_dir(1)
    dead, live, orphan = "a" * 32, "b" * 32, "c" * 32
    # a dead attempt: a lock file nobody holds, and data
    (tmp_path / ckpt / f"{dead}.lock").write_text("")
    (tmp_path / ckpt / dead).mkdir()
    (tmp_path / ckpt / dead / "00000.safetensors").write_bytes(b"partial")
    # a live attempt: this process holds its lock
    lock = storage.lock_attempt(f"{ckpt}/{live}.lock")
    (tmp_path / ckpt / live).mkdir()
    # an orphan without a lock file, and an uncommitted step directory of a crashed save
    (tmp_path / ckpt / orphan).mkdir()
    (tmp_path / step_dir(2) / dead).mkdir(parents=True)
    (tmp_path / "unrelated").mkdir()
    try:
        with safepoint.CheckpointManager(tmp_path) as manager:  # collects on open
            assert manager.steps() == [1]
            report = manager.gc()
        names = sorted(p.name for p in (tmp_path / ckpt).iterdir())
        assert names == sorted([committed.save_id, "manifest.json", live, f"{live}.lock"])
        assert not (tmp_path / step_dir(2)).exists()
        assert (tmp_path / "unrelated").exists()
        assert report.in_progress == (f"{ckpt}/{live}",)
    finally:
        lock.release(remove=True)
    assert safepoint.verify(tmp_path).ok


def test_gc_leaves_attempts_alone_when_the_manifest_is_unreadable(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        committed = manager.save(1, {"x": torch.ones(2)})
    (tmp_path / step_dir(1) / "manifest.json").write_text("not json")
    with safepoint.CheckpointManager(tmp_path):
        pass
    assert (tmp_path / step_dir(1) / committed.save_id / "00000.safetensors").exists()


def test_retention_unpublishes_before_deleting(tmp_path: Path) -> None:
    """A crash between unpublishing and deleting leaves invisible data that the next open collects."""
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, {"x": torch.ones(2)})
    script = (
        "import sys, torch, safepoint\n"
        "m = safepoint.CheckpointManager(sys.argv[1], keep_last=1)\n"
        "m.save(2, {'x': torch.ones(2)})\n"
    )
    env = {**os.environ, "SAFEPOINT_FAULTS": "retention.unpublish.after=kill"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT, timeout=120)
    assert result.returncode == -9
    assert not (tmp_path / step_dir(1) / "manifest.json").exists()
    assert (tmp_path / step_dir(1)).exists()  # the data is still there, invisible
    with safepoint.CheckpointManager(tmp_path) as manager:
        assert manager.steps() == [2]
    assert not (tmp_path / step_dir(1)).exists()


def test_gc_never_touches_save_id_lookalikes_outside_step_directories(tmp_path: Path) -> None:
    """Regression: a directory merely named like a save id, in a directory that is not ours, was deleted."""
    precious = tmp_path / ("0123456789abcdef" * 2)
    precious.mkdir()
    (precious / "x").write_text("precious")
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.gc()
    from safepoint._gc import collect

    collect(LocalStorage(tmp_path))
    assert (precious / "x").read_text() == "precious"


def test_gc_collects_a_crashed_standalone_save(tmp_path: Path) -> None:
    script = "import sys, torch, safepoint\nsafepoint.save(sys.argv[1], {'w': torch.ones(1000)})\n"
    env = {**os.environ, "SAFEPOINT_FAULTS": "data.fsync.after=kill"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], env=env, cwd=ROOT, timeout=120)
    assert result.returncode == -9
    assert len(list((tmp_path / "c").iterdir())) == 2  # the attempt and its lock file
    from safepoint._gc import collect

    report = collect(LocalStorage(tmp_path / "c"))
    assert len(report.removed) == 1
    assert list((tmp_path / "c").iterdir()) == []


def test_saving_another_step_over_a_single_checkpoint_names_the_step_that_is_there(tmp_path: Path) -> None:
    """Regression: the error said 'step 4 is already committed ... it verifies' and set step=4."""
    path = tmp_path / "ckpt"
    safepoint.save(path, {"x": torch.ones(3)}, step=2)
    with pytest.raises(safepoint.CheckpointExistsError) as caught:
        safepoint.save(path, {"x": torch.zeros(3)}, step=4)
    assert caught.value.step == 2
    assert caught.value.verified is True
    message = str(caught.value)
    assert "the committed checkpoint of step 2, not of step 4" in message
    assert "step 4 is already committed" not in message
    assert safepoint.load(path)["x"].tolist() == [1.0, 1.0, 1.0]  # untouched


def test_saving_over_a_damaged_single_checkpoint_names_its_step_and_says_it_does_not_verify(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    safepoint.save(path, {"x": torch.arange(100.0)}, step=2)
    payload = next(path.glob("*/*.safetensors"))
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x40
    payload.write_bytes(bytes(data))
    with pytest.raises(safepoint.CheckpointExistsError, match="does NOT verify") as caught:
        safepoint.save(path, {"x": torch.zeros(3)}, step=4)
    assert caught.value.step == 2
    assert caught.value.verified is False
    assert "of step 2, not of step 4" in str(caught.value)


def test_saving_the_same_step_over_a_single_checkpoint_says_it_verifies(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    safepoint.save(path, {"x": torch.ones(3)}, step=2)
    with pytest.raises(safepoint.CheckpointExistsError, match="step 2 is already committed") as caught:
        safepoint.save(path, {"x": torch.ones(3)}, step=2)
    assert caught.value.step == 2
    assert caught.value.verified is True


def test_a_step_directory_holding_another_steps_manifest_is_reported_as_not_verifying(tmp_path: Path) -> None:
    """A manifest copied into another step's directory names its own step, and that step directory is corrupt."""
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(2, {"x": torch.ones(3)})
        (tmp_path / step_dir(4)).mkdir()
        (tmp_path / step_dir(4) / "manifest.json").write_bytes((tmp_path / step_dir(2) / "manifest.json").read_bytes())
        with pytest.raises(safepoint.CheckpointExistsError, match="does NOT verify") as caught:
            manager.save(4, {"x": torch.ones(3)})
    assert caught.value.step == 2
    assert caught.value.verified is False
    assert "step 2, not of step 4" in str(caught.value)
