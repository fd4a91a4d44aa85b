"""One rank of a sharded-state test group: ``python -m tests.distributed.worker_fsdp SCENARIO:BACKEND DIR OUT``.

Every scenario saves and restores DTensor states (FSDP2, HSDP, tensor parallel, FSDP + TP) through a backend
chosen on the command line, behind the same two calls: ``save(directory, step, state, blocking)`` and
``restore(directory, state)``:

- ``dcp``: ``torch.distributed.checkpoint`` (``save``/``async_save`` and ``load``), the reference. Its results
  prove that the scenarios, the comparisons and the tolerances are right.
- ``safepoint``: ``CheckpointManager.save``/``restore`` on every rank, the code under test.

``DIR`` is shared by the groups of one test: checkpoints go to ``DIR/<name>/`` (one ``step-<12 digits>`` folder per
step for both backends) and the expected values to ``DIR/expected-<name>.pt``: the full tensors gathered with
``DTensor.full_tensor()`` (a collective, not the code under test) on the run that saved, written with
``torch.save``. Restoring runs compare their live state, gathered the same way, with those files. Each rank
records its observations in ``OUT/rank<N>.json``; the tests decide what is right. The package never imports this
module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import format_utils
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save_sync
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import safepoint
from safepoint import _faults as faults
from tests.distributed.worker import outcome

TIMEOUT = 10.0  # seconds a safepoint rank waits for the others in these tests
ROWS = 13  # the first layer's rows: 5/5/3 over 3 ranks, 4/4/4/1 over 4, 7/6 over 2 (FSDP only: see TP_PLAN)
HIDDEN = 16  # the tensor-parallel pair's inner size: tensor parallelism needs it to divide evenly
OUT_ROWS = 2  # the last layer's rows: 1/1/0/0 over 4 ranks (empty shards), 1/1/0 over 3
IN = 8
TRAIN_STEPS = 6  # the training-resume run: steps 1..6, saved after step 3, killed after step 4
SAVED_AT = 3
BATCH = 12  # the global batch of the training-resume run: divides evenly over 1, 2, 3, 4 ranks

State = dict[str, Any]


# -- the two backends ---------------------------------------------------------------------------------------------
def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:012d}"


@dataclass(frozen=True)
class Backend:
    """``save`` returns a wait: a no-op for a blocking save, the completion of a background one."""

    name: str
    save: Callable[[Path, int, State, bool], Callable[[], None]]
    restore: Callable[[Path, State], int]
    load_full: Callable[[Path], State]  # one process, no process group: the full values of one step


def dcp_save(directory: Path, step: int, state: State, blocking: bool) -> Callable[[], None]:
    target = step_dir(directory, step)
    if blocking:
        dcp_save_sync(state, checkpoint_id=target)
        return lambda: None
    future = dcp_async_save(state, checkpoint_id=target)
    return future.result  # type: ignore[union-attr]


def dcp_steps(directory: Path) -> list[int]:
    """Steps whose ``.metadata`` exists: the point at which DCP's checkpoint is complete."""
    return sorted(int(p.name.split("-")[1]) for p in directory.glob("step-*") if (p / ".metadata").exists())


def dcp_restore(directory: Path, state: State) -> int:
    step = dcp_steps(directory)[-1]
    dcp_load(state, checkpoint_id=step_dir(directory, step))
    return step


def dcp_load_full(path: Path) -> State:
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "full.pt"
        format_utils.dcp_to_torch_save(path, target)
        loaded: State = torch.load(target, weights_only=False)
        return loaded


def safepoint_save(directory: Path, step: int, state: State, blocking: bool) -> Callable[[], None]:
    manager = safepoint.CheckpointManager(directory, timeout=TIMEOUT)
    try:
        handle = manager.save(step, state, blocking=blocking)
    except BaseException:
        manager.close()
        raise
    if blocking:
        manager.close()
        return lambda: None

    def wait() -> None:
        with manager:
            handle.result(timeout=120)  # type: ignore[union-attr]

    return wait


def safepoint_restore(directory: Path, state: State) -> int:
    with safepoint.CheckpointManager(directory, timeout=TIMEOUT) as manager:
        report = manager.restore(state)
    if report is None:
        raise FileNotFoundError(f"no checkpoint to restore in {directory}")
    return report.step


def safepoint_load_full(path: Path) -> State:
    loaded: State = safepoint.load(path)
    return loaded


BACKENDS = {
    "dcp": Backend("dcp", dcp_save, dcp_restore, dcp_load_full),
    "safepoint": Backend("safepoint", safepoint_save, safepoint_restore, safepoint_load_full),
}


# -- models, meshes, states ---------------------------------------------------------------------------------------
def plain_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(IN, ROWS), torch.nn.Tanh(), torch.nn.Linear(ROWS, HIDDEN), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(HIDDEN, OUT_ROWS))


#: The middle layer column-parallel (``Shard(0)``), the last row-parallel (``Shard(1)``); the first layer stays a
#: plain tensor under tensor parallelism alone (DTensor's TP ops assume even shards, and 13 rows are not).
TP_PLAN = {"2": ColwiseParallel(), "4": RowwiseParallel()}


def parallel_model(kind: str, seed: int) -> torch.nn.Sequential:
    """The same module tree under each parallelism; every rank starts from the same full weights (``seed``).

    ``fsdp``: FSDP2 ``Shard(0)`` over all ranks; ``hsdp``: ``fully_shard`` on a 2 x (world/2) mesh, which gives
    ``(Replicate(), Shard(0))``; ``tp``: ``TP_PLAN`` over all ranks; ``fsdp+tp``: ``TP_PLAN`` on the inner mesh
    dimension, then FSDP2 on the outer one (``_StridedShard`` on the column-parallel weight).
    """
    model = plain_model(seed)
    world = dist.get_world_size()
    if kind == "tp":
        parallelize_module(model, init_device_mesh("cpu", (world,)), TP_PLAN)
        return model
    mesh: DeviceMesh
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
    elif kind == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    elif kind == "fsdp+tp":
        mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh2d["tp"], TP_PLAN)
        mesh = mesh2d["dp"]
    else:
        raise ValueError(kind)
    for index in (0, 2, 4):
        fully_shard(model[index], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same for every world size), and this rank's equal slice of it."""
    generator = torch.Generator().manual_seed(10_000 + step)
    inputs, targets = torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, OUT_ROWS, generator=generator)
    share = BATCH // world
    return inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, *, sliced: bool) -> None:
    """``sliced``: each rank takes its slice of the global batch (data parallel); otherwise every rank the whole
    batch (what tensor parallel needs, and harmless under FSDP)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if sliced else (0, 1)
    for step in steps:
        inputs, targets = batch(step, rank, world)
        torch.autograd.backward(torch.nn.functional.mse_loss(model(inputs), targets))
        optimizer.step()
        optimizer.zero_grad()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def init_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A fresh optimizer's state (step 1, zero moments), so that a restore has tensors to fill in place: one step
    with zero gradients and a learning rate of 0 leaves the parameters as they are."""
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    optimizer.zero_grad()


def trained(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The state that gets saved: two AdamW steps from seed 0."""
    model = parallel_model(kind, seed=0)
    optimizer = adamw(model)
    train(model, optimizer, range(1, 3), sliced=False)
    return model, optimizer


def fresh(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """What a restore fills: other weights (seed 99) and an optimizer state that differs from the saved one."""
    model = parallel_model(kind, seed=99) if kind != "plain" else plain_model(99)
    optimizer = adamw(model)
    init_optimizer_state(model, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = 0.5  # a param_groups entry the restore must bring back
    return model, optimizer


def full(value: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor as a full plain tensor, keyed as ``model/<fqn>`` and
    ``optim/<param index>/<name>`` (the same keys under every parallelism: the module tree does not change)."""
    found = {f"model/{key}": full(value) for key, value in model.state_dict().items()}
    for index, values in optimizer.state_dict()["state"].items():
        found.update({f"optim/{index}/{k}": full(v) for k, v in values.items() if isinstance(v, torch.Tensor)})
    return found


def layout(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """How each parameter is split on this rank: its placements and the shape of its local shard."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            found[key] = {"placements": [repr(p) for p in value.placements], "local": list(value.to_local().shape)}
        else:
            found[key] = {"placements": [], "local": list(value.shape)}
    return found


def compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bitwise comparison, key by key: the keys that differ (dtype, shape or any bit) and those missing."""
    return {
        "compared": len(expected),
        "missing": sorted(expected.keys() - actual.keys()),
        "unexpected": sorted(actual.keys() - expected.keys()),
        "mismatched": sorted(
            k
            for k in expected.keys() & actual.keys()
            if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])
        ),
    }


def expected_path(directory: Path, name: str) -> Path:
    return directory / f"expected-{name}.pt"


def read_expected(directory: Path, name: str) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(expected_path(directory, name), weights_only=True)
    return loaded


def write_expected(directory: Path, name: str, values: dict[str, torch.Tensor]) -> None:
    if dist.get_rank() == 0:
        torch.save(values, expected_path(directory, name))
    dist.barrier()


# -- the steps the scenarios are made of --------------------------------------------------------------------------
def plain_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> State:
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "extra": extra}


def apply_plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: State) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])


def save_trained(
    backend: Backend, directory: Path, name: str, kind: str, *, via: str = "plain", blocking: bool = True
) -> dict[str, Any]:
    """Train, gather the expected full tensors, save as step 2 (with ``blocking=False``: change every live
    parameter after the call returns and before the save completes, which must not reach the checkpoint).

    ``via="plain"``: ``model.state_dict()`` and ``optimizer.state_dict()``; ``via="dcp-state-dict"``:
    ``get_state_dict(model, optimizer)`` (optimizer state keyed by parameter name)."""
    model, optimizer = trained(kind)
    expected = full_state(model, optimizer)
    write_expected(directory, name, expected)
    extra = {"step": 2, "name": name}
    if via == "plain":
        state = plain_state(model, optimizer, extra)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "extra": extra}
    start = time.monotonic()
    wait = backend.save(directory / name, 2, state, blocking)
    if not blocking:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
    wait()
    return {"layout": layout(model), "save_seconds": time.monotonic() - start}


def restore_into(
    backend: Backend, directory: Path, source: str, kind: str, *, via: str = "plain"
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A fresh model of ``kind`` restored from checkpoint ``source``, compared with ``source``'s expected values.

    ``via="plain"``: ``model.state_dict()`` / ``optimizer.state_dict()`` restored in place, then loaded back;
    ``via="dcp-state-dict"``: the same through ``get_state_dict`` / ``set_state_dict``; ``via="objects"`` (safepoint
    only): the model and the optimizer themselves, as the README shows."""
    expected = read_expected(directory, source)
    model, optimizer = fresh(kind)
    equal_before = [k for k, v in full_state(model, optimizer).items() if k in expected and torch.equal(v, expected[k])]
    start = time.monotonic()
    extra: dict[str, Any] = {"step": 0, "name": ""}
    if via == "plain":
        state = plain_state(model, optimizer, extra)
        step = backend.restore(directory / source, state)
        apply_plain(model, optimizer, state)
    elif via == "objects":
        state = {"model": model, "optim": optimizer, "extra": extra}
        step = backend.restore(directory / source, state)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "extra": extra}
        step = backend.restore(directory / source, state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    seconds = time.monotonic() - start
    found = {
        "step": step,
        "extra": state["extra"],
        "lr": [group["lr"] for group in optimizer.param_groups],
        "equal_before": equal_before,
        "restore_seconds": seconds,
        "layout": layout(model),
        **compare(full_state(model, optimizer), expected),
    }
    return model, optimizer, found


def save_restored(backend: Backend, directory: Path, source: str, kind: str, name: str) -> dict[str, Any]:
    """Restore ``source`` into ``kind``, compare, then save what was restored as checkpoint ``name``."""
    model, optimizer, found = restore_into(backend, directory, source, kind)
    write_expected(directory, name, full_state(model, optimizer))
    wait = backend.save(directory / name, 2, plain_state(model, optimizer, {"step": 2, "name": name}), True)
    wait()
    return found


def same_world(
    backend: Backend, directory: Path, name: str, kind: str, *, via: str = "plain", blocking: bool = True
) -> dict[str, Any]:
    saved = save_trained(backend, directory, name, kind, via=via, blocking=blocking)
    _, _, restored = restore_into(backend, directory, name, kind, via=via)
    return {"saved": saved, "restored": restored}


# -- scenarios ------------------------------------------------------------------------------------------------------
def four(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """4 ranks: FSDP2 (uneven 4/4/4/1 rows, empty shards of the 2-row layer), HSDP 2x2 (a background save),
    FSDP + TP 2x2; each saved and restored on the same world. ``fsdp4`` starts the resharding chain."""
    return {
        "fsdp4": same_world(backend, directory, "fsdp4", "fsdp"),
        "hsdp": same_world(backend, directory, "hsdp", "hsdp", blocking=False),
        "fsdptp": same_world(backend, directory, "fsdptp", "fsdp+tp"),
    }


def two(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """2 ranks: ``fsdp4`` resharded into FSDP2 on 2 (then saved as ``chain2``) and into tensor parallel; TP alone
    saved and restored (through get_state_dict / set_state_dict)."""
    _, _, to_tp = restore_into(backend, directory, "fsdp4", "tp")
    return {
        "chain2": save_restored(backend, directory, "fsdp4", "fsdp", "chain2"),
        "fsdp4_to_tp": to_tp,
        "tp2": same_world(backend, directory, "tp2", "tp", via="dcp-state-dict"),
    }


def three(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """3 ranks: FSDP2 with 5/5/3 and 1/1/0 shards through get_state_dict / set_state_dict; ``chain2`` resharded
    into FSDP2 on 3, then saved as ``chain3``."""
    return {
        "fsdp3": same_world(backend, directory, "fsdp3", "fsdp", via="dcp-state-dict"),
        "chain3": save_restored(backend, directory, "chain2", "fsdp", "chain3"),
    }


def killed(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """Step 1 saved; the last rank is killed (SIGKILL from safepoint's fault seam) after writing its first data
    file of step 2. Safepoint only: the seam is safepoint's, and DCP promises nothing here."""
    model, optimizer = trained("fsdp")
    state = plain_state(model, optimizer, {"step": 1, "name": "killed"})

    def save(step: int) -> None:
        backend.save(directory / "killed", step, state, True)()

    found: dict[str, Any] = {"first": outcome(lambda: save(1))}
    with faults.armed({"data.write.after": "kill"} if rank == world - 1 else {}):
        found["second"] = outcome(lambda: save(2))
    with safepoint.CheckpointManager(directory / "killed", timeout=TIMEOUT) as manager:
        found["steps"] = manager.steps()
    return found


def corrupt(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """Steps 1 and 2 saved (2 after one more training step); rank 0 flips the middle and the last byte of the
    largest file of step 2 other than its manifest (a shard's data, whatever the layout puts first or last);
    every rank restores. Safepoint only: DCP has no checksums."""
    model, optimizer = trained("fsdp")
    write_expected(directory, "corrupt", full_state(model, optimizer))  # what the fallback must restore
    backend.save(directory / "corrupt", 1, plain_state(model, optimizer, {"step": 1, "name": "corrupt"}), True)()
    train(model, optimizer, range(3, 4), sliced=False)
    backend.save(directory / "corrupt", 2, plain_state(model, optimizer, {"step": 2, "name": "corrupt"}), True)()
    damaged = ""
    if rank == 0:
        files = [p for p in step_dir(directory / "corrupt", 2).rglob("*") if p.is_file() and p.suffix != ".json"]
        target = max(files, key=lambda p: (p.stat().st_size, p.name))
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        damaged = target.name
    dist.barrier()
    model, optimizer, found = restore_into(backend, directory, "corrupt", "fsdp")
    del found["layout"]
    found["damaged"] = damaged
    return found


def train_and_kill(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """The uninterrupted FSDP2 run (steps 1..6, each rank its slice of a fixed global batch), its full tensors
    after step 5 and step 6 written as expected values; then the same run again, saved after step 3, one more
    step, and every rank SIGKILLs itself (the json is written first)."""
    model = parallel_model("fsdp", seed=0)
    optimizer = adamw(model)
    train(model, optimizer, range(1, TRAIN_STEPS), sliced=True)
    write_expected(directory, "train-before-last", full_state(model, optimizer))
    train(model, optimizer, range(TRAIN_STEPS, TRAIN_STEPS + 1), sliced=True)
    write_expected(directory, "train-final", full_state(model, optimizer))

    model = parallel_model("fsdp", seed=0)
    optimizer = adamw(model)
    train(model, optimizer, range(1, SAVED_AT + 1), sliced=True)
    write_expected(directory, "train", full_state(model, optimizer))  # the checkpoint's own values
    backend.save(
        directory / "train", SAVED_AT, plain_state(model, optimizer, {"step": SAVED_AT, "name": "train"}), True
    )()
    train(model, optimizer, range(SAVED_AT + 1, SAVED_AT + 2), sliced=True)
    dist.barrier()
    (Path(sys.argv[3]) / f"rank{rank}.json").write_text(json.dumps({"saved_at": SAVED_AT}))
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def resume(backend: Backend, directory: Path, rank: int, world: int) -> dict[str, Any]:
    """A fresh process group of any size resumes the killed run from its checkpoint and trains to the end; rank 0
    writes the final full tensors to ``OUT/resumed.pt`` for the test to compare with the uninterrupted run's. With
    safepoint, a second resume restores into the model and optimizer objects themselves (the optimizer holding
    state, so its moments are read in place): ``OUT/resumed-objects.pt``, and its findings under ``"objects"``."""
    results: dict[str, Any] = {}
    for via in ("plain", "objects") if backend.name == "safepoint" else ("plain",):
        model, optimizer, found = restore_into(backend, directory, "train", "fsdp", via=via)
        del found["layout"]
        train(model, optimizer, range(int(found["extra"]["step"]) + 1, TRAIN_STEPS + 1), sliced=True)
        resumed = full_state(model, optimizer)
        if rank == 0:
            torch.save(resumed, Path(sys.argv[3]) / ("resumed.pt" if via == "plain" else f"resumed-{via}.pt"))
        if via == "plain":
            results.update(found)
        else:
            results[via] = found
    return results


SCENARIOS: dict[str, Callable[[Backend, Path, int, int], dict[str, Any]]] = {
    "four": four,
    "two": two,
    "three": three,
    "killed": killed,
    "corrupt": corrupt,
    "train": train_and_kill,
    "resume": resume,
}


def main() -> int:
    name, backend = sys.argv[1].split(":")
    directory, out = Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.monotonic()
    try:
        found = SCENARIOS[name](BACKENDS[backend], directory, rank, world)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # at once: an interpreter exit would tear the process group down and wait for the others
    found["seconds"] = time.monotonic() - start
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    if name != "killed":  # with a rank dead, a barrier would wait for it
        dist.barrier()  # rank 0 hosts the store: nobody leaves before every rank is done with it
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: after a rank died, gloo's teardown can wait on it


if __name__ == "__main__":
    sys.exit(main())
