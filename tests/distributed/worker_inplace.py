"""One rank of the in-place restore tests: ``python -m tests.distributed.worker_inplace DIR OUT``.

Plain DTensors (``distribute_tensor`` on ``init_device_mesh("cpu", (world,))``) in plain dicts: the local shards a
restore reads into directly, behind backups. Step 1 holds ``m`` (``a`` and ``b``, saved split by rows); step 2
holds ``m``, ``extra`` (``c``) and ``counter`` (an object). Rank 0 then flips a byte of step 2's last rows of
``m/b``, which only the last rank reads back (``b`` restores split by rows as it was saved); ``m/a`` and
``extra/c`` restore split by columns (a resharded read). So when the last rank finds the corruption, it has
written ``m/a`` in place, and every other rank has written all three. Each case records plain facts in
``OUT/rank<N>.json``; the tests decide what is right. Last, a module with a DTensor parameter restores in
place, and is put back when its own load_state_dict does not keep the values; and an optimizer object holding
state already restores its DTensor moments in place, and is put back when a later object fails. The package
never imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import safepoint

TIMEOUT = 30.0
SHAPES = {"a": (300, 200), "b": (50, 40), "c": (60, 30)}


def values(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def live_state(mesh: DeviceMesh, seed: int, *, rows: bool) -> dict[str, Any]:
    """``{"m": {"a", "b"}, "extra": {"c"}}`` of the values of ``seed``; ``rows``: every tensor split by rows (as
    saved), else ``a`` and ``c`` by columns (as restored)."""
    full = values(seed)
    other = Shard(0) if rows else Shard(1)
    a = distribute_tensor(full["a"], mesh, [other])
    b = distribute_tensor(full["b"], mesh, [Shard(0)])
    c = distribute_tensor(full["c"], mesh, [other])
    return {"m": {"a": a, "b": b}, "extra": {"c": c}}


def locals_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A copy of this rank's local shards, by key path."""
    found = {}
    for group, tensors in state.items():
        for name, tensor in tensors.items():
            assert isinstance(tensor, DTensor)
            found[f"{group}/{name}"] = tensor.to_local().clone()
    return found


def expected_locals(mesh: DeviceMesh, seed: int) -> dict[str, torch.Tensor]:
    return locals_of(live_state(mesh, seed, rows=False))


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, bool]:
    """For each key path of ``a``: whether ``b`` holds the same bits."""
    return {
        key: b[key].shape == value.shape and torch.equal(value.view(torch.int32), b[key].view(torch.int32))
        for key, value in a.items()
    }


def corrupt_last_rows_of_b(step: Path) -> str:
    """Flip one byte in the last row of the box of ``m/b`` that holds its last rows; the file's name."""
    body = json.loads((step / "manifest.json").read_text())
    files = [f["path"] for f in body["files"]]
    m = next(child for key, child in body["tree"]["v"] if key == "m")
    b = next(child for key, child in m["v"] if key == "b")
    box = max(b["boxes"], key=lambda box: box["offsets"][0])
    path = step / files[body["entries"][box["e"]]["file"]]
    data = bytearray(path.read_bytes())
    data[box["at"] + box["sizes"][0] * box["sizes"][1] * 4 - 8] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name


class FailsOnRank:
    """An object whose load_state_dict raises on one rank: a failure in the apply phase, after the reads."""

    def __init__(self, rank: int, failing: int) -> None:
        self.rank, self.failing, self.value = rank, failing, 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.rank == self.failing:
            raise ValueError(f"rank {self.rank} refuses")
        self.value = state["value"]


class Holder(torch.nn.Module):
    """A module with a DTensor parameter (its state_dict() shares the parameter's local memory); ``resets``: its
    load_state_dict zeroes the parameter after loading (a load_state_dict that does not keep what it was given)."""

    def __init__(self, weight: DTensor, *, resets: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.resets = resets

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state, strict=strict, assign=assign)
        if self.resets:
            self.weight.to_local().detach().zero_()
        return result


def modules(directory: Path, mesh: DeviceMesh) -> dict[str, Any]:
    """A module's DTensor parameter, saved split by rows, restored split by columns: in place, checked, and put
    back when the module's load_state_dict does not keep it."""
    found: dict[str, Any] = {}
    with safepoint.CheckpointManager(directory / "modules", timeout=TIMEOUT) as manager:
        manager.save(1, {"net": Holder(distribute_tensor(values(1)["a"], mesh, [Shard(0)]))})
    expected = distribute_tensor(values(1)["a"], mesh, [Shard(1)]).to_local()
    for resets in (False, True):
        net = Holder(distribute_tensor(values(9)["a"], mesh, [Shard(1)]), resets=resets)
        parameter, before = net.weight, net.weight.to_local().clone()
        with safepoint.CheckpointManager(directory / "modules", timeout=TIMEOUT) as manager:
            found[f"resets={resets}"] = outcome(lambda net=net: manager.restore({"net": net}))
        after = net.weight.to_local()
        found[f"resets={resets} same_parameter"] = net.weight is parameter
        found[f"resets={resets} is_step1"] = torch.equal(after.view(torch.int32), expected.view(torch.int32))
        found[f"resets={resets} unchanged"] = torch.equal(after.view(torch.int32), before.view(torch.int32))
    return found


def adam(weight: DTensor, grad_seed: int, lr: float) -> tuple[Holder, torch.optim.Adam]:
    """A module holding ``weight`` and an Adam over it with state: one step taken with the gradient of
    ``grad_seed`` (laid out as the weight)."""
    net = Holder(weight)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    grad = values(grad_seed)["a"]
    net.weight.grad = distribute_tensor(grad, weight.device_mesh, list(weight.placements))
    optimizer.step()
    return net, optimizer


def moments(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A copy of this rank's local shards of the optimizer's moments."""
    (state,) = optimizer.state.values()
    return {name: state[name].to_local().clone() for name in ("exp_avg", "exp_avg_sq")}


def optimizers(directory: Path, mesh: DeviceMesh, rank: int, world: int) -> dict[str, Any]:
    """An optimizer object whose state is held already (Adam after a step) restores its DTensor moments in place,
    resharded (saved split by rows, restored split by columns): the same tensors, the same memory, the saved
    values. When another object fails in the apply phase on the last rank, after the optimizer took its state, that
    rank's optimizer is put back: the same tensors, the bits and learning rate it had."""
    found: dict[str, Any] = {}
    saved_net, saved_optimizer = adam(distribute_tensor(values(1)["a"], mesh, [Shard(0)]), 2, lr=0.1)
    with safepoint.CheckpointManager(directory / "optimizers", timeout=TIMEOUT) as manager:
        manager.save(1, {"net": saved_net, "optim": saved_optimizer, "counter": FailsOnRank(rank, -1)})
    (saved_state,) = saved_optimizer.state.values()
    expected = {
        name: distribute_tensor(saved_state[name].full_tensor(), mesh, [Shard(1)]).to_local()
        for name in ("exp_avg", "exp_avg_sq")
    }
    for case, failing in (("clean", -1), ("apply_fails", world - 1)):
        net, optimizer = adam(distribute_tensor(values(9)["a"], mesh, [Shard(1)]), 8, lr=0.5)
        (state,) = optimizer.state.values()
        tensors = {name: state[name] for name in ("exp_avg", "exp_avg_sq")}
        addresses = {name: tensor.to_local().data_ptr() for name, tensor in tensors.items()}
        before = moments(optimizer)
        live = {"net": net, "optim": optimizer, "counter": FailsOnRank(rank, failing)}
        with safepoint.CheckpointManager(directory / "optimizers", timeout=TIMEOUT) as manager:
            found[f"optim {case}"] = outcome(lambda live=live: manager.restore(live, strict=False))
        (state,) = optimizer.state.values()
        after = moments(optimizer)
        found[f"optim {case} same_tensors"] = all(state[name] is tensor for name, tensor in tensors.items())
        found[f"optim {case} same_memory"] = {
            name: state[name].to_local().data_ptr() == address for name, address in addresses.items()
        }
        found[f"optim {case} is_saved"] = same_bits(expected, after)
        found[f"optim {case} unchanged"] = same_bits(before, after)
        found[f"optim {case} lr"] = optimizer.param_groups[0]["lr"]
    return found


def open_payloads() -> list[str]:
    """The payload files this process holds open (a restore's ranged reads hold them until it ends)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith(".safetensors"):
                found.append(target)
    return sorted(found)


def outcome(call: Any) -> dict[str, Any]:
    try:
        result = call()
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None, "step": getattr(result, "step", None),
            "skipped": [s.step for s in getattr(result, "skipped", ())]}  # fmt: skip


def run(directory: Path, rank: int, world: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world,))
    root = directory / "run"
    with safepoint.CheckpointManager(root, timeout=TIMEOUT) as manager:
        saved1 = live_state(mesh, 1, rows=True)
        manager.save(1, {"m": saved1["m"]})
        manager.save(2, {**live_state(mesh, 2, rows=True), "counter": FailsOnRank(rank, -1)})
    dist.barrier()
    if rank == 0:
        shutil.copytree(root, directory / "corrupt")
        found["corrupted"] = corrupt_last_rows_of_b(directory / "corrupt" / "step-000000000002")
    dist.barrier()
    step1, step2 = expected_locals(mesh, 1), expected_locals(mesh, 2)

    # the step asked for is corrupt on the last rank only: an error everywhere, every live shard as it was
    state = live_state(mesh, 9, rows=False)
    before = locals_of(state)
    with safepoint.CheckpointManager(directory / "corrupt", timeout=TIMEOUT) as manager:
        found["explicit"] = outcome(lambda: manager.restore(state, step=2, strict=False))
        found["open_after_explicit"] = open_payloads()
    found["explicit_unchanged"] = same_bits(before, locals_of(state))

    # newest first: every rank falls back to step 1; extra/c, which step 1 lacks, keeps its own values
    state = live_state(mesh, 9, rows=False)
    before = locals_of(state)
    with safepoint.CheckpointManager(directory / "corrupt", timeout=TIMEOUT) as manager:
        found["fallback"] = outcome(lambda: manager.restore(state, strict=False))
        found["open_after_fallback"] = open_payloads()
    after = locals_of(state)
    found["fallback_m_is_step1"] = same_bits({k: step1[k] for k in ("m/a", "m/b")}, after)
    found["fallback_extra_unchanged"] = same_bits({"extra/c": before["extra/c"]}, after)

    # every shard read and verified, then one rank's object fails in the apply phase: that rank puts its
    # shards back (the others applied, and are told so)
    state = {**live_state(mesh, 9, rows=False), "counter": FailsOnRank(rank, world - 1)}
    before = locals_of({k: v for k, v in state.items() if k != "counter"})
    with safepoint.CheckpointManager(root, timeout=TIMEOUT) as manager:
        found["apply_fails"] = outcome(lambda: manager.restore(state))
        found["open_after_apply_fails"] = open_payloads()
    after = locals_of({k: v for k, v in state.items() if k != "counter"})
    found["apply_fails_unchanged"] = same_bits(before, after)
    found["apply_fails_is_step2"] = same_bits(step2, after)

    # and a clean restore of step 2 into the same live tensors: every shard in place, the same objects
    state = live_state(mesh, 9, rows=False)
    objects = {key: id(tensor) for key, tensor in {**state["m"], **state["extra"]}.items()}
    with safepoint.CheckpointManager(root, timeout=TIMEOUT) as manager:
        found["clean"] = outcome(lambda: manager.restore(state, strict=False))
        found["open_after_clean"] = open_payloads()
    found["clean_is_step2"] = same_bits(step2, locals_of(state))
    found["clean_same_objects"] = objects == {key: id(t) for key, t in {**state["m"], **state["extra"]}.items()}
    found.update(modules(directory, mesh))
    found.update(optimizers(directory, mesh, rank, world))
    return found


def main() -> int:
    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    found = run(directory, rank, world)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
