"""Sharded state (DTensor, FSDP2) saved by every rank and restored on the same or another world size.

Real gloo groups of FSDP2 models on the CPU (see worker_sharded.py): a 3-rank group saves (13 rows split 5/5/3,
2 rows split 1/1/0), restores on the same world, round-trips get_state_dict/set_state_dict, and sees a plan whose
boxes overlap refused; a 2-rank and a 4-rank group then restore its checkpoint (3 -> 2, 3 -> 4: 2 rows over 4 ranks,
empty shards), counting the bytes they read, restore a plain single-process checkpoint into their DTensors, refuse
a model of other shapes, fall back over a corrupt shard only the last rank reads, and save on their own world
size for a single-process load here. The disk is checked independently of the ranks.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from tests.distributed.group import RankResult, run_group
from tests.distributed.worker_sharded import SIZES
from tests.helpers import assert_same

MODULE = "tests.distributed.worker_sharded"


def _ok(ranks: list[RankResult]) -> list[dict[str, Any]]:
    for rank, result in enumerate(ranks):
        assert result.returncode == 0, f"rank {rank} exited {result.returncode}:\n{result.output[-4000:]}"
    return [result.results for result in ranks]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("sharded3")
    found = _ok(run_group("save_same_world", 3, base, base / "out", worker=MODULE))
    # a plain checkpoint of the same model, written by one process, for the ranks to restore into DTensors
    torch.manual_seed(21)
    plain = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in itertools.pairwise(SIZES)])
    with safepoint.CheckpointManager(base / "plain") as manager:
        manager.save(1, {"model": plain})
    torch.save({k: v.detach().clone() for k, v in plain.state_dict().items()}, base / "plain.pt")
    return base, found


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["3-to-2", "3-to-4"])
def resharded(
    request: pytest.FixtureRequest, saved: tuple[Path, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, Path, list[dict[str, Any]]]:
    world: int = request.param
    source, _ = saved
    base = tmp_path_factory.mktemp(f"reshard{world}")
    env = {rank: {"SHARDED_SOURCE": str(source)} for rank in range(world)}
    return world, base, _ok(run_group("reshard", world, base, base / "out", worker=MODULE, extra_env=env))


def _step(base: Path, step: int) -> Path:
    return base / "run" / f"step-{step:012d}"


# -- saving on 3 ranks ---------------------------------------------------------------------------------------------
def test_fsdp2_shards_are_uneven_and_empty_where_the_rows_run_out(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    _, found = saved
    assert [f["local_rows"]["1.weight"] for f in found] == [[5, 1500], [5, 1500], [3, 1500]]
    assert [f["local_rows"]["2.weight"] for f in found] == [[1, 13], [1, 13], [0, 13]]


def test_every_rank_writes_only_its_own_shards(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    base, found = saved
    files = found[0]["files"]
    assert "r00000-rep-00000.safetensors" in files  # rank 0: the replicated entries (the optimizer's steps)
    assert {f"r0000{rank}-shd-00000.safetensors" for rank in range(3)} <= set(files)
    body = json.loads((_step(base, 1) / "manifest.json").read_text())
    assert body["format_version"] == 3
    assert body["world_size"] == 3
    sizes = {f["path"].rsplit("/", 1)[1]: f["size"] for f in body["files"]}
    third = 500 * 1024 * 4  # a third of the large weight (1500 rows over 3 ranks)
    # each rank's shard file holds its third of the large weight and of its two Adam moments, and small shards
    for rank in range(3):
        assert 3 * third < sizes[f"r0000{rank}-shd-00000.safetensors"] < 3.1 * third


def test_each_sharded_tensor_is_covered_by_boxes_of_every_rank(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    base, _ = saved
    manifest = json.loads((_step(base, 1) / "manifest.json").read_text())
    model = dict(manifest["tree"]["v"])["model"]["v"]["v"]["v"]
    node = dict(model)["1.weight"]
    assert node["k"] == "sharded"
    assert node["shape"] == [13, 1500]
    assert [(b["offsets"], b["sizes"]) for b in node["boxes"]] == [([0, 0], [5, 1500]), ([5, 0], [5, 1500]),
                                                                     ([10, 0], [3, 1500])]  # fmt: skip
    empty_rank = dict(model)["2.weight"]
    assert [(b["offsets"], b["sizes"]) for b in empty_rank["boxes"]] == [([0, 0], [1, 13]), ([1, 0], [1, 13])]


def test_same_world_restore_is_bitwise_equal_to_full_tensor(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    _, found = saved
    for rank, observed in enumerate(found):
        assert observed["background_step"] == 2, rank
        assert observed["changed_after_background_save"] is True, rank  # else the restore would prove nothing
        assert observed["restored_step"] == 2, rank
        assert observed["restored_equal"] is True, rank
        assert observed["steps"] == [1, 2], rank


def test_a_background_save_holds_the_values_of_its_call(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    base, _ = saved
    loaded = safepoint.load(_step(base, 2))
    expected = torch.load(base / "out" / "step2.pt", weights_only=True)
    assert_same(dict(loaded["model"]), expected["model"])
    assert_same(loaded["optim"]["state"], expected["optim"]["state"])


def test_get_state_dict_and_set_state_dict_round_trip(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    base, found = saved
    for rank, observed in enumerate(found):
        assert observed["state_dict_step"] == 3, rank
        assert observed["state_dict_equal"] is True, rank
    loaded = safepoint.load(base / "dcp-style" / "step-000000000003")
    assert set(loaded["optim"]["state"]) == {f"{i}.{p}" for i in range(3) for p in ("weight", "bias")}  # FQN keys


def test_a_plan_whose_boxes_overlap_is_refused_and_nothing_is_visible(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    base, found = saved
    for rank, observed in enumerate(found):
        assert observed["broken_plan"]["error"] in ("InvalidStateError", "CoordinationError"), observed
        assert "'bias'" in observed["broken_plan"]["message"]
        assert "overlap" in observed["broken_plan"]["message"]
        assert observed["broken_steps"] == [], rank
    assert not list((base / "broken").glob("step-*/manifest.json"))


def test_single_process_load_returns_the_full_tensors_saved(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    base, _ = saved
    loaded = safepoint.load(_step(base, 1))
    expected = torch.load(base / "out" / "step1.pt", weights_only=True)
    assert_same(dict(loaded["model"]), expected["model"])
    assert type(loaded["model"]["1.weight"]) is torch.Tensor
    assert_same(loaded["optim"]["state"], expected["optim"]["state"])
    assert safepoint.verify(base / "run").ok


# -- restoring on other world sizes --------------------------------------------------------------------------------
def test_a_resharded_restore_is_bitwise_equal(resharded: tuple[int, Path, list[dict[str, Any]]]) -> None:
    _, _, found = resharded
    for rank, observed in enumerate(found):
        assert observed["restored_step"] == 2, rank
        assert observed["restored_equal"] is True, rank


def test_a_resharded_restore_reads_little_more_than_it_needs(resharded: tuple[int, Path, list[dict[str, Any]]]) -> None:
    world, _, found = resharded
    for rank, observed in enumerate(found):
        needed, read = observed["needed_bytes"], observed["range_bytes"]
        assert needed > 1_000_000, observed  # the large weight's share, and its two Adam moments
        assert needed <= read <= 1.1 * needed, (world, rank, read, needed)


def test_a_sharded_checkpoint_restores_into_plain_tensors(resharded: tuple[int, Path, list[dict[str, Any]]]) -> None:
    _, _, found = resharded
    for rank, observed in enumerate(found):
        assert observed["unsharded_equal"] is True, rank


def test_a_plain_checkpoint_restores_into_dtensors(resharded: tuple[int, Path, list[dict[str, Any]]]) -> None:
    _, _, found = resharded
    for rank, observed in enumerate(found):
        assert observed["plain_step"] == 1, rank
        assert observed["plain_equal"] is True, rank


def test_other_shapes_are_a_restore_error_naming_the_key(resharded: tuple[int, Path, list[dict[str, Any]]]) -> None:
    _, _, found = resharded
    for rank, observed in enumerate(found):
        assert observed["mismatch"]["error"] == "RestoreError", observed["mismatch"]
        assert "model/1.weight" in observed["mismatch"]["message"]
        assert "[14, 1500]" in observed["mismatch"]["message"]
        assert "[13, 1500]" in observed["mismatch"]["message"]
        assert observed["mismatch_unchanged"] is True, rank


def test_a_corrupt_shard_read_by_one_rank_makes_every_rank_fall_back(
    resharded: tuple[int, Path, list[dict[str, Any]]],
) -> None:
    world, _, found = resharded
    assert found[0]["corrupted"] == "r00002-shd-00000.safetensors"
    for rank, observed in enumerate(found):
        assert observed["fallback_step"] == 1, rank
        assert observed["fallback_equal"] is True, rank
        # the restore went into a fresh optimizer (no state yet): its moments come back sharded like its parameters
        assert observed["fresh_optimizer_state"] == {"step": "Tensor", "exp_avg": "DTensor", "exp_avg_sq": "DTensor"}
        assert observed["fresh_optimizer_local"] is True, rank
        assert observed["step_after_restore"]["error"] is None, observed["step_after_restore"]
        ((step, reason),) = observed["fallback_skipped"]
        assert step == 2
        assert f"rank {world - 1}:" in reason  # only the last rank reads the corrupt rows
        assert "checksum" in reason


def test_a_checkpoint_of_another_world_loads_in_one_process(resharded: tuple[int, Path, list[dict[str, Any]]]) -> None:
    world, base, _ = resharded
    loaded = safepoint.load(base / "small" / "step-000000000005")
    expected = torch.load(base / "out" / "step5.pt", weights_only=True)
    assert_same(dict(loaded["model"]), expected["model"])
    assert_same(loaded["optim"]["state"], expected["optim"]["state"])
    body = json.loads((base / "small" / "step-000000000005" / "manifest.json").read_text())
    assert body["world_size"] == world


@pytest.mark.slow
def test_fsdp_over_tensor_parallel_round_trips(tmp_path: Path) -> None:
    found = _ok(run_group("fsdp_tp", 4, tmp_path, tmp_path / "out", worker=MODULE))
    assert found[0]["placements"]["0.weight"] == ["_StridedShard(dim=0, sf=2)", "Shard(dim=0)"]
    assert found[0]["placements"]["2.bias"] == ["Shard(dim=0)", "Replicate()"]
    for rank, observed in enumerate(found):
        assert observed["restored_step"] == 1, rank
        assert observed["restored_equal"] is True, rank
    checkpoint = tmp_path / "run" / "step-000000000001"
    loaded = safepoint.load(checkpoint)
    expected = torch.load(tmp_path / "out" / "step1.pt", weights_only=True)
    assert_same(dict(loaded["model"]), expected["model"])
    assert_same(loaded["optim"]["state"], expected["optim"]["state"])
    body = json.loads((checkpoint / "manifest.json").read_text())
    model = dict(dict(body["tree"]["v"])["model"]["v"]["v"]["v"])
    # FSDP's _StridedShard over TP's Shard(0): the rows of each TP half are split again by data-parallel rank
    boxes = model["0.weight"]["boxes"]
    assert [(b["offsets"][0], b["sizes"][0]) for b in boxes] == [(0, 3), (3, 2), (5, 3), (8, 2)]
    # the bias replicated over TP is written once per box, by one of its two holders
    assert len(model["2.bias"]["boxes"]) == 2
    # the layer TP does not split lives on the dp slice: its two shards are each written once, by one TP rank
    assert found[0]["placements"]["3.weight"] == ["Shard(dim=0)"]
    assert [(b["offsets"], b["sizes"]) for b in model["3.weight"]["boxes"]] == [([0, 0], [3, 6]), ([3, 0], [2, 6])]
