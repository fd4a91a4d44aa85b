"""One rank of a sharded-state test group: ``python -m tests.distributed.worker_sharded SCENARIO DIR OUT``.

FSDP2 (``fully_shard``) on the CPU over gloo, with ``init_device_mesh("cpu", (world,))``. Each scenario records
plain facts in ``OUT/rank<N>.json`` (and rank 0 the full tensors it saved, ``OUT/<name>.pt``); the tests decide
what is right. The package never imports this module.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

import safepoint
from safepoint import _pipeline
from safepoint._sharded import local_pieces
from safepoint._storage import LocalStorage
from safepoint._storage.base import RangeFiles

TIMEOUT = 30.0
#: 1024 -> 1500 is ~6 MB of float32: boxes of MBs, so reading part of one costs whole 64 KiB chunks at its ends.
#: 1500 -> 13 -> 2: 13 rows split unevenly, 2 rows leave some ranks an empty shard.
SIZES = (1024, 1500, 13, 2)


def build(mesh: DeviceMesh, seed: int, sizes: Sequence[int] = SIZES) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    model = torch.nn.Sequential(*layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(3, SIZES[0])).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def full(value: Any) -> Any:
    """Plain full tensors of a state (collective: every rank calls it)."""
    if isinstance(value, DTensor):
        return value.full_tensor().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": full(model.state_dict()), "optim": full(optimizer.state_dict())}


def bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same_bits = torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        return a.dtype == b.dtype and a.shape == b.shape and bool(same_bits)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def local_bytes(value: Any) -> int:
    """The bytes of this rank's local shards of the DTensors in a state: what a resharding restore needs."""
    if isinstance(value, DTensor):
        local = value.to_local()
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(local_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(local_bytes(v) for v in value)
    return 0


class CountingStorage(LocalStorage):
    """The real local storage, counting the bytes of the ranged reads that restore makes of sharded tensors."""

    range_bytes = 0

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        super().read_range(path, offset, buffer)
        type(self).range_bytes += buffer.nbytes

    def range_files(self) -> CountingFiles:  # type: ignore[override]
        return CountingFiles(super().range_files())


class CountingFiles:
    """The files a restore holds open for its ranged reads, counting their bytes with CountingStorage's."""

    def __init__(self, files: RangeFiles) -> None:
        self.files = files

    def read_range(self, path: str, offset: int, buffer: memoryview) -> None:
        self.files.read_range(path, offset, buffer)
        CountingStorage.range_bytes += buffer.nbytes

    def close(self) -> None:
        self.files.close()


def outcome(call: Any) -> dict[str, Any]:
    try:
        result = call()
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None, "value": repr(result)}


def save_same_world(directory: Path, out: Path, rank: int, world: int) -> dict[str, Any]:
    """Save steps 1 (sync) and 2 (background) of an FSDP2 model and its AdamW; restore step 2 on the same world;
    round-trip get_state_dict/set_state_dict as step 3 in another directory; a plan whose boxes overlap."""
    found: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world,))
    model, optimizer = build(mesh, seed=0)
    found["local_rows"] = {k: list(v.to_local().shape) for k, v in model.state_dict().items()}
    train(model, optimizer, seed=1)
    expected: dict[int, dict[str, Any]] = {}
    with safepoint.CheckpointManager(directory / "run", timeout=TIMEOUT) as manager:
        manager.save(1, {"model": model, "optim": optimizer})
        expected[1] = snapshot(model, optimizer)
        train(model, optimizer, seed=2)
        expected[2] = snapshot(model, optimizer)
        handle = manager.save(2, {"model": model, "optim": optimizer}, blocking=False)
        train(model, optimizer, seed=3)  # changes the live shards while step 2 is written from its staged copies
        found["background_step"] = handle.result(timeout=60).step
        moved = snapshot(model, optimizer)
        found["changed_after_background_save"] = not bitwise_equal(moved, expected[2])
        report = manager.restore({"model": model, "optim": optimizer})
        found["restored_step"] = None if report is None else report.step
        found["restored_equal"] = bitwise_equal(snapshot(model, optimizer), expected[2])
        found["steps"] = manager.steps()
    # get_state_dict / set_state_dict (FQN-keyed optimizer state)
    with safepoint.CheckpointManager(directory / "dcp-style", timeout=TIMEOUT) as manager:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        manager.save(3, {"model": model_sd, "optim": optim_sd})
        expected[3] = snapshot(model, optimizer)
        train(model, optimizer, seed=4)
        live_model, live_optim = get_state_dict(model, optimizer)
        report = manager.restore({"model": live_model, "optim": live_optim})
        set_state_dict(model, optimizer, model_state_dict=live_model, optim_state_dict=live_optim)
        found["state_dict_step"] = None if report is None else report.step
        found["state_dict_equal"] = bitwise_equal(snapshot(model, optimizer), expected[3])
    # a plan whose boxes overlap: every replica of a Replicate DTensor writes its box (the owner choice broken on
    # purpose); rank 0's exact-cover check refuses it before anything is visible
    replicated = {"bias": distribute_tensor(torch.arange(6.0), mesh, [Replicate()])}
    chosen = _pipeline.owned_pieces
    _pipeline.owned_pieces = lambda dtensor, key, world_size: local_pieces(dtensor, key)  # type: ignore[assignment]
    try:
        with safepoint.CheckpointManager(directory / "broken", timeout=TIMEOUT) as manager:
            found["broken_plan"] = outcome(lambda: manager.save(1, replicated).step)
            found["broken_steps"] = manager.steps()
    finally:
        _pipeline.owned_pieces = chosen
    if rank == 0:
        for step, values in expected.items():
            torch.save(values, out / f"step{step}.pt")
        found["files"] = sorted(p.name for p in (directory / "run" / "step-000000000002").glob("*/*.safetensors"))
    dist.barrier()
    return found


def reshard(directory: Path, out: Path, rank: int, world: int) -> dict[str, Any]:
    """Restore the checkpoints of ``save_same_world`` (another world size) into a fresh FSDP2 model, counting the
    bytes read; a plain single-process checkpoint into DTensors; a mismatched model; a corrupt shard; then save
    on this world for a single-process load."""
    found: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world,))
    source = Path(os.environ["SHARDED_SOURCE"])
    model, optimizer = build(mesh, seed=7)
    train(model, optimizer, seed=8)  # optimizer state exists, with other values
    storage = CountingStorage(str(source / "run"))
    with safepoint.CheckpointManager(storage, timeout=TIMEOUT) as manager:
        report = manager.restore({"model": model, "optim": optimizer}, step=2)
    found["restored_step"] = None if report is None else report.step
    found["range_bytes"] = CountingStorage.range_bytes
    found["needed_bytes"] = local_bytes(model.state_dict()) + local_bytes(optimizer.state_dict())
    expected = torch.load(source / "out" / "step2.pt", weights_only=True)
    found["restored_equal"] = bitwise_equal(snapshot(model, optimizer), expected)
    # the sharded checkpoint restored into a plain (not sharded) model on every rank: each assembles whole tensors
    torch.manual_seed(14)
    unsharded = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in itertools.pairwise(SIZES)])
    with safepoint.CheckpointManager(source / "run", timeout=TIMEOUT) as manager:
        manager.restore({"model": unsharded}, step=2, strict=False)
    found["unsharded_equal"] = bitwise_equal(full(unsharded.state_dict()), expected["model"])
    # a plain (not sharded) checkpoint written by one process, restored into the DTensors
    plain = torch.load(source / "plain.pt", weights_only=True)
    fresh, _ = build(mesh, seed=9)
    with safepoint.CheckpointManager(source / "plain", timeout=TIMEOUT) as manager:
        report = manager.restore({"model": fresh})
    found["plain_step"] = None if report is None else report.step
    found["plain_equal"] = bitwise_equal(full(fresh.state_dict()), plain)
    # a model of other shapes: a RestoreError naming the key, nothing changed
    other, other_optimizer = build(mesh, seed=10, sizes=(1024, 1500, 14, 2))
    before = snapshot(other, other_optimizer)
    with safepoint.CheckpointManager(source / "run", timeout=TIMEOUT) as manager:
        found["mismatch"] = outcome(lambda: manager.restore({"model": other}, step=2))
    found["mismatch_unchanged"] = bitwise_equal(snapshot(other, other_optimizer), before)
    found.update(fall_back(directory, source, mesh, rank))
    # saved on this world size, for a single-process load in the test
    model, optimizer = build(mesh, seed=12)
    train(model, optimizer, seed=13)
    with safepoint.CheckpointManager(directory / "small", timeout=TIMEOUT) as manager:
        manager.save(5, {"model": model, "optim": optimizer})
    values = snapshot(model, optimizer)
    if rank == 0:
        torch.save(values, out / "step5.pt")
    dist.barrier()
    return found


def fall_back(directory: Path, source: Path, mesh: DeviceMesh, rank: int) -> dict[str, Any]:
    """A copy of the checkpoints with a corrupt shard of step 2 that only the last rank reads: every rank falls
    back to step 1."""
    found: dict[str, Any] = {}
    corrupt = directory / "corrupt"
    if rank == 0:
        shutil.copytree(source / "run", corrupt)
        checkpoint = corrupt / "step-000000000002"
        body = json.loads((checkpoint / "manifest.json").read_text())
        files = [f["path"] for f in body["files"]]
        entries = body["entries"]
        weight = next(node for key, node in _items(body["tree"]) if key == "model/0.weight")
        victim = max(weight["boxes"], key=lambda box: box["offsets"][0])  # the last rows: the last rank's
        path = checkpoint / files[entries[victim["e"]]["file"]]
        data = bytearray(path.read_bytes())
        data[victim["at"] + victim["sizes"][0] * victim["sizes"][1] * 4 - 100] ^= 0x01  # in the last row
        path.write_bytes(bytes(data))
        found["corrupted"] = path.name
    dist.barrier()
    model, optimizer = build(mesh, seed=11)
    with safepoint.CheckpointManager(corrupt, timeout=TIMEOUT) as manager:
        report = manager.restore({"model": model, "optim": optimizer})
    found["fallback_step"] = None if report is None else report.step
    found["fallback_skipped"] = [] if report is None else [(s.step, s.reason) for s in report.skipped]
    expected1 = torch.load(source / "out" / "step1.pt", weights_only=True)
    found["fallback_equal"] = bitwise_equal(snapshot(model, optimizer), expected1)
    # the optimizer was fresh (no state before its first step): its restored state is sharded as its parameters
    restored = optimizer.state_dict()["state"][0]
    found["fresh_optimizer_state"] = {name: type(value).__name__ for name, value in restored.items()}
    parameter = next(iter(model.parameters()))
    found["fresh_optimizer_local"] = list(restored["exp_avg"].to_local().shape) == list(parameter.to_local().shape)
    found["step_after_restore"] = outcome(lambda: train(model, optimizer, seed=15))
    return found


def _items(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(key path, node) of every tensor-like node of a manifest's tree."""
    kind = node["k"]
    if kind == "dict":
        return [item for key, child in node["v"] for item in _items(child, f"{path}/{key}".lstrip("/"))]
    if kind in ("object", "typed"):
        return _items(node["v"], path)
    if kind in ("list", "tuple"):
        return [item for i, child in enumerate(node["v"]) for item in _items(child, f"{path}/{i}".lstrip("/"))]
    return [(path, node)]


def fsdp_tp(directory: Path, out: Path, rank: int, world: int) -> dict[str, Any]:
    """FSDP over tensor parallelism on a (2, 2) mesh: ``_StridedShard`` rows, Shard(1) columns, a bias replicated over
    the TP dimension, and a layer FSDP alone shards (on the dp slice of the mesh, the same shards on both TP ranks).
    Save, restore on the same mesh, and save the full tensors."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    found: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6), torch.nn.Linear(6, 5))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])  # layer 3 is not split by TP: a DTensor on the dp slice, copied over tp
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    found["placements"] = {k: [repr(p) for p in v.placements] for k, v in model.state_dict().items()}
    expected = snapshot(model, optimizer)
    with safepoint.CheckpointManager(directory / "run", timeout=TIMEOUT) as manager:
        manager.save(1, {"model": model, "optim": optimizer})
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        report = manager.restore({"model": model, "optim": optimizer})
    found["restored_step"] = None if report is None else report.step
    found["restored_equal"] = bitwise_equal(snapshot(model, optimizer), expected)
    if rank == 0:
        torch.save(expected, out / "step1.pt")
    dist.barrier()
    return found


SCENARIOS = {"save_same_world": save_same_world, "reshard": reshard, "fsdp_tp": fsdp_tp}


def main() -> int:
    scenario, directory, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    found = SCENARIOS[scenario](directory, out, rank, world)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
