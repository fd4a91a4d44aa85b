"""Saves and restores across real gloo process groups of 2 and 4 ranks (processes on 127.0.0.1).

Each group runs a batch of scenarios (see worker.py) and reports what every rank observed; these tests check
the observations against the guarantees, and check the disk independently of the ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint._faults import POINTS
from tests.distributed.group import RankResult, run_group
from tests.distributed.worker import TIMEOUT, build, tensors


def _ok(ranks: list[RankResult]) -> list[dict[str, Any]]:
    for rank, result in enumerate(ranks):
        assert result.returncode == 0, f"rank {rank} exited {result.returncode}:\n{result.output[-4000:]}"
    return [result.results for result in ranks]


def _same_everywhere(found: list[dict[str, Any]], name: str) -> dict[str, Any]:
    first = found[0][name]
    for rank, observed in enumerate(found):
        assert observed[name]["error"] == first["error"], (rank, observed[name])
        assert observed[name]["message"] == first["message"], (rank, observed[name])
    return dict(first)


def _manifest(checkpoint: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((checkpoint / "manifest.json").read_text())
    return body


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def group(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, list[Any]]:
    world: int = request.param
    base = tmp_path_factory.mktemp(f"basics{world}")
    found = _ok(run_group("basics", world, base / "ckpt", base / "out"))
    return world, base / "ckpt", found


def test_every_rank_saves_under_one_save_id_and_sees_retention(group: tuple[int, Path, list[Any]]) -> None:
    world, _, found = group
    assert len({tuple(f["save_ids"]) for f in found}) == 1
    assert len(set(found[0]["save_ids"])) == 3
    assert [f["steps"] for f in found] == [[2, 3]] * world  # keep_last=2, applied before any rank returned


def test_restore_round_trips_replicated_and_per_rank_entries(group: tuple[int, Path, list[Any]]) -> None:
    world, _, found = group
    for rank, observed in enumerate(found):
        assert observed["restored_step"] == 3
        assert observed["model_and_optimizer_equal"] is True
        assert observed["loader"] == {"position": 100 + rank, "epoch": 2}
        assert observed["count"] == 7 + rank  # an int inside PerRank: restored by assignment into the wrapper
        assert observed["shard"] == [float(rank)] * 4
        assert observed["draw_after_restore"] == observed["draw_after_save"]
    assert len({tuple(f["draw_after_save"]) for f in found}) == world  # each rank restored its own generator


def test_a_committed_step_is_the_same_error_on_every_rank(group: tuple[int, Path, list[Any]]) -> None:
    _, _, found = group
    exists = _same_everywhere(found, "exists")
    assert exists["error"] == "CheckpointExistsError"
    assert "step 3 is already committed" in exists["message"]
    assert "it verifies" in exists["message"]


def test_ranks_disagreeing_on_the_step_fail_together_and_commit_nothing(group: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, found = group
    disagree = _same_everywhere(found, "disagree")
    assert disagree["error"] == "CoordinationError"
    assert "disagree on the step" in disagree["message"]
    assert "rank 0: 10" in disagree["message"]
    assert "rank 1: 11" in disagree["message"]
    assert disagree["ranks"] == list(range(1, world))
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000000002", "step-000000000003"]


def test_a_failure_on_one_rank_is_every_ranks_error_and_leaves_nothing(group: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, found = group
    failed = _same_everywhere(found, "eio")
    assert failed["error"] == "CoordinationError"
    assert failed["message"].startswith(f"rank {world - 1}: ")
    assert "Input/output error" in failed["message"]
    assert failed["ranks"] == [world - 1]
    assert all(f["steps_after_failures"] == [2, 3] for f in found)
    assert not (ckpt / "step-000000000004").exists()  # every rank's files of the failed save were removed


def test_an_explicit_step_restores_on_every_rank(group: tuple[int, Path, list[Any]]) -> None:
    _, _, found = group
    assert [f["explicit"]["value"] for f in found] == ["2"] * len(found)


def test_corruption_only_one_rank_reads_makes_every_rank_fall_back(group: tuple[int, Path, list[Any]]) -> None:
    world, _, found = group
    for observed in found:
        assert observed["fallback"]["step"] == 2
        [(step, reason)] = observed["fallback"]["skipped"]
        assert step == 3
        assert reason.startswith(f"rank {world - 1}: ")
        assert f"r{world - 1:05d}-own-00000.safetensors" in reason
    assert len({json.dumps(f["fallback"]) for f in found}) == 1


def test_a_rank_that_skips_a_save_is_named_within_the_timeout(group: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, found = group
    for observed in found[:-1]:
        skipped = observed["skipped"]
        assert skipped["error"] == "CoordinationError"
        assert f"rank {world - 1} did not join" in skipped["message"]
        assert skipped["ranks"] == [world - 1]
        assert TIMEOUT <= skipped["seconds"] < TIMEOUT * 3 + 5
    assert all(f["steps_at_end"] == [2, 3] for f in found)
    assert not (ckpt / "step-000000000020").exists()


def test_the_manifest_records_the_world_size_and_which_rank_wrote_what(group: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, _ = group
    step = ckpt / "step-000000000003"
    body = _manifest(step)
    assert body["world_size"] == world
    assert body["format_version"] == safepoint.FORMAT_VERSION  # many ranks write the one format of one rank
    names = [f["path"].split("/")[1] for f in body["files"]]
    assert [n for n in names if "-rep-" in n] == ["r00000-rep-00000.safetensors"]
    assert sorted(n for n in names if "-own-" in n) == [f"r{r:05d}-own-00000.safetensors" for r in range(world)]
    per_rank = {
        key: node for key, node in body["tree"]["v"] if node["k"] == "object" and node["type"] == "safepoint.PerRank"
    }
    assert sorted(per_rank) == ["count", "loader", "rng", "shard"]
    assert [key for key, _ in per_rank["count"]["v"]["v"]] == list(range(world))
    assert sorted(p.name for p in step.iterdir()) == sorted(["manifest.json", body["save_id"]])  # no leftovers


def test_the_checkpoint_verifies_and_loads_as_plain_values(group: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, _ = group
    report = safepoint.verify(ckpt)
    assert [c.step for c in report.checkpoints] == [2, 3]
    assert all(c.ok for c in report.checkpoints)
    loaded = safepoint.load(ckpt / "step-000000000003")
    assert loaded["count"] == {rank: 7 + rank for rank in range(world)}
    assert torch.equal(loaded["shard"][world - 1], torch.full((4,), float(world - 1)))


def test_replicated_entries_restore_at_another_world_size(group: tuple[int, Path, list[Any]]) -> None:
    _, ckpt, _ = group
    expected = tensors(build(0))
    live = build(0, fresh=True)
    replicated = {"model": live["model"], "optimizer": live["optimizer"], "progress": live["progress"]}
    with safepoint.CheckpointManager(ckpt) as manager:  # one process: world size 1
        report = manager.restore(replicated, strict=False)
    assert report is not None
    assert report.step == 3
    assert sorted(report.unexpected) == ["count", "loader", "rng", "shard"]
    assert live["progress"] == {"step": 3}
    restored = tensors(live)
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[k], expected[k]) for k in expected)


def test_per_rank_entries_at_another_world_size_are_refused(group: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, _ = group
    live = build(0, fresh=True)
    before = tensors(live)
    with safepoint.CheckpointManager(ckpt) as manager, pytest.raises(safepoint.RestoreError) as caught:
        manager.restore(live)
    message = str(caught.value)
    assert f"saved by {world} rank(s)" in message
    assert "restored by 1 rank(s)" in message
    assert "'loader'" in message
    assert live["loader"].value == {"position": 0, "epoch": 0}
    after = tensors(live)
    assert all(torch.equal(after[k], before[k]) for k in before)


KILLS = [
    pytest.param(2, 1, "data.write.after@2=kill", id="2-ranks-rank-1"),
    # rank 0 hosts the store and holds the attempt: the others lose contact; gc collects what it wrote
    pytest.param(3, 0, "data.write.after@3=kill", id="3-ranks-rank-0", marks=pytest.mark.slow),
    pytest.param(4, 2, "data.write.after@2=kill", id="4-ranks-rank-2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("world", "victim", "faults"), KILLS)
def test_a_rank_killed_mid_save_commits_nothing_and_is_named(
    tmp_path: Path, world: int, victim: int, faults: str
) -> None:
    """The victim dies (SIGKILL, from the fault seam) writing its files of the second save."""
    ckpt = tmp_path / "ckpt"
    ranks = run_group("killed", world, ckpt, tmp_path / "out", extra_env={victim: {"SAFEPOINT_FAULTS": faults}})
    assert ranks[victim].returncode == -9
    survivors = [rank for rank in range(world) if rank != victim]
    for rank in survivors:
        assert ranks[rank].returncode == 0, ranks[rank].output[-4000:]
        found = ranks[rank].results
        assert found["first"]["value"] == "1"
        second = found["second"]
        assert second["error"] == "CoordinationError"
        assert victim in second["ranks"]
        assert second["seconds"] < TIMEOUT * 3 + 10
        assert found["steps"] == [1]
    if victim != 0:
        message = ranks[0].results["second"]["message"]
        assert f"rank {victim} did not join save.commit" in message
        assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000000001"]  # every rank's files removed
    with safepoint.CheckpointManager(ckpt) as manager:
        manager.gc()  # the leftovers of a dead coordinator: its lock died with it
        assert manager.steps() == [1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000000001"]
    assert safepoint.verify(ckpt).ok


#: How often a save reaches each fault point on rank 0 (a replicated file and its own file) and on rank 1 (its
#: own file) in the "killed" scenario; the kill lands on the second save, after the first one committed.
RANK_0_HITS = {point: 2 if point.startswith("data.") else 1 for point in POINTS if point.split(".")[0] in
               ("save", "staging", "data", "manifest", "commit")}  # fmt: skip
SWEEP = [(0, point, hits + 1) for point, hits in RANK_0_HITS.items()]
SWEEP += [(1, point, 2) for point in POINTS if point.startswith("data.")]


@pytest.mark.slow
@pytest.mark.parametrize(("victim", "point", "nth"), SWEEP, ids=[f"rank{v}-{p}" for v, p, _ in SWEEP])
def test_kill_at_every_fault_point_of_a_two_rank_save(tmp_path: Path, victim: int, point: str, nth: int) -> None:
    """Whatever the moment a rank dies, the other rank gets an error or the outcome, never hangs, and every
    checkpoint that is visible verifies."""
    ckpt = tmp_path / "ckpt"
    faults = {victim: {"SAFEPOINT_FAULTS": f"{point}@{nth}=kill"}}
    ranks = run_group("killed", 2, ckpt, tmp_path / "out", extra_env=faults)
    assert ranks[victim].returncode == -9, ranks[victim].output[-3000:]
    survivor = ranks[1 - victim]
    assert survivor.returncode == 0, survivor.output[-3000:]
    second = survivor.results["second"]
    assert second["seconds"] < TIMEOUT * 3 + 10
    assert second["error"] in ("CoordinationError", None), second
    with safepoint.CheckpointManager(ckpt) as manager:
        manager.gc()
        steps = manager.steps()
    assert steps in ([1], [1, 2])
    assert steps == [1] or (point.startswith("commit.") and point != "commit.publish.before")
    report = safepoint.verify(ckpt)
    assert report.ok
    assert report.notes == ()  # gc left nothing of the dead attempt


# -- background saves ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, list[Any]]:
    world: int = request.param
    base = tmp_path_factory.mktemp(f"background{world}")
    found = _ok(run_group("background", world, base / "ckpt", base / "out"))
    return world, base / "ckpt", found


def test_background_saves_commit_once_every_rank_wrote_and_hold_the_staged_values(
    background: tuple[int, Path, list[Any]],
) -> None:
    world, ckpt, found = background
    assert len({tuple(f["save_ids"]) for f in found}) == 1  # one save id per step, the same on every rank
    assert len(set(found[0]["save_ids"])) == 3
    for rank, observed in enumerate(found):
        assert observed["steps"] == [2, 3], rank  # keep_last=2
        assert observed["restored_step"] == 3, rank
        assert observed["model_and_optimizer_equal"] is True, rank  # not the values changed after save() returned
        assert observed["shard"] == [float(rank)] * 4, rank
        assert observed["count"] == 7 + rank, rank
        assert observed["restored_during_save"] in (3, 4), rank
        assert observed["fourth"] == 4, rank
    manifest = _manifest(ckpt / "step-000000000006")
    assert manifest["world_size"] == world
    assert safepoint.verify(ckpt).ok


def test_a_background_failure_on_one_rank_reaches_every_rank_once(background: tuple[int, Path, list[Any]]) -> None:
    world, ckpt, found = background
    for rank, observed in enumerate(found):
        assert observed["eio_call"]["error"] is None, rank  # staged: the failure comes later
        failed = observed["eio_wait"]
        assert failed["error"] == "BackgroundSaveError", rank
        assert failed["cause"] == "CoordinationError", rank  # an OSError crosses ranks as a CoordinationError
        assert failed["cause_ranks"] == [world - 1], rank
        assert f"rank {world - 1}: " in failed["message"], rank
        assert "Input/output error" in failed["message"], rank
        assert "step 5" in failed["message"], rank
        assert observed["eio_again"]["error"] is None, rank  # reported once, then cleared
        assert observed["after_failure"]["value"] == "6", rank
        assert observed["steps_at_end"] == [4, 6], rank
    assert not (ckpt / "step-000000000005").exists()  # every rank's files of the failed attempt removed


KILLED_BACKGROUND = [
    pytest.param(2, 1, "data.write.after@2=kill", id="2-ranks-rank-1"),
    pytest.param(4, 2, "data.write.after@2=kill", id="4-ranks-rank-2", marks=pytest.mark.slow),
    pytest.param(2, 0, "data.write.after@3=kill", id="2-ranks-rank-0", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("world", "victim", "faults"), KILLED_BACKGROUND)
def test_a_rank_killed_mid_background_save_is_a_coordination_error_everywhere(
    tmp_path: Path, world: int, victim: int, faults: str
) -> None:
    """kill -9 (from the fault seam) of a rank while its background thread writes the second save."""
    ckpt = tmp_path / "ckpt"
    ranks = run_group(
        "killed_background", world, ckpt, tmp_path / "out", extra_env={victim: {"SAFEPOINT_FAULTS": faults}}
    )
    assert ranks[victim].returncode == -9, ranks[victim].output[-3000:]
    for rank in (r for r in range(world) if r != victim):
        assert ranks[rank].returncode == 0, ranks[rank].output[-4000:]
        found = ranks[rank].results
        assert found["first"]["value"] == "1"
        assert found["second_call"]["error"] is None  # the call returned once this rank's state was staged
        failed = found["second_wait"]
        assert failed["error"] == "BackgroundSaveError"
        assert failed["cause"] == "CoordinationError"
        assert victim in failed["cause_ranks"]
        assert found["second_seconds"] < TIMEOUT * 3 + 10
        assert found["second_again"]["error"] is None
        assert found["steps"] == [1]
    with safepoint.CheckpointManager(ckpt) as manager:
        manager.gc()
        assert manager.steps() == [1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000000001"]
    assert safepoint.verify(ckpt).ok


def test_distributed_false_saves_on_one_rank_while_the_others_never_call(tmp_path: Path) -> None:
    """Lightning saves on global rank 0 only: a manager with distributed=False must neither wait for the other
    ranks nor split the state by rank, and every rank can read the result on its own."""
    ranks = _ok(run_group("alone", 2, tmp_path / "ckpt", tmp_path / "out"))
    first = ranks[0]
    assert first["sync"]["error"] is None
    assert first["sync"]["seconds"] < TIMEOUT  # nobody waited for rank 1
    assert first["background"]["error"] is None
    assert first["steps"] == [1, 2]
    for found in ranks:
        assert found["loaded_step"] == 2
        assert found["loaded_weights"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # rank 0's values, not the reader's
        assert found["loaded_count"] == 0
    manifest = json.loads(next((tmp_path / "ckpt").glob("step-000000000002/manifest.json")).read_text())
    assert manifest["world_size"] == 1
