"""One rank of a test group: ``python -m tests.distributed.worker SCENARIO DIR OUT`` (env:// variables set).

Each scenario runs several checks in one process group (starting processes and importing torch is the slow
part), records what it observed in ``OUT/rank<N>.json``, and exits. Observations are plain facts (types,
messages, values, timings); the tests decide what is right. The package never imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import safepoint
from safepoint import _faults as faults

TIMEOUT = 5.0  # seconds a rank waits for the others in these tests


def build(rank: int, *, fresh: bool = False) -> dict[str, Any]:
    """Replicated model and optimizer (identical on every rank), and per-rank entries that differ by rank."""
    torch.manual_seed(99 if fresh else 0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if not fresh:
        model(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.manual_seed(1000 + rank)
    return {
        "model": model,
        "optimizer": optimizer,
        "progress": {"step": 0 if fresh else 3},
        "rng": safepoint.PerRank(safepoint.RNGState()),
        "loader": safepoint.PerRank({"position": 0 if fresh else 100 + rank, "epoch": 0 if fresh else 2}),
        "count": safepoint.PerRank(0 if fresh else 7 + rank),
        "shard": safepoint.PerRank(torch.zeros(4) if fresh else torch.full((4,), float(rank))),
    }


def tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    found = {f"model/{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for index, values in state["optimizer"].state_dict()["state"].items():
        found.update({f"optimizer/{index}/{k}": v.clone() for k, v in values.items() if isinstance(v, torch.Tensor)})
    return found


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """What a call did: its result's repr, or its error's type, message and attributes, and how long it took."""
    start = time.monotonic()
    try:
        value = call()
    except safepoint.SafepointError as error:
        return {
            "error": type(error).__name__,
            "message": str(error),
            "ranks": list(getattr(error, "ranks", ())),
            "seconds": time.monotonic() - start,
        }
    return {"error": None, "value": repr(value), "seconds": time.monotonic() - start}


def basics(directory: Path, rank: int, world: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    state = build(rank)
    saved = tensors(state)
    with safepoint.CheckpointManager(directory, keep_last=2, timeout=TIMEOUT) as manager:
        infos = [manager.save(step, state, metrics={"loss": 1.0 / step}) for step in (1, 2, 3)]
        found["save_ids"] = [info.save_id for info in infos]
        found["steps"] = manager.steps()
        found["draw_after_save"] = torch.rand(3).tolist()

        fresh = build(rank, fresh=True)
        report = manager.restore(fresh)
        assert report is not None
        found["restored_step"] = report.step
        found["model_and_optimizer_equal"] = same(tensors(fresh), saved)
        found["loader"] = fresh["loader"].value
        found["count"] = fresh["count"].value
        found["shard"] = fresh["shard"].value.tolist()
        found["draw_after_restore"] = torch.rand(3).tolist()

        found["exists"] = outcome(lambda: manager.save(3, state))
        found["disagree"] = outcome(lambda: manager.save(10 + rank, state))
        with faults.armed({"data.write.after": "eio"} if rank == world - 1 else {}):
            found["eio"] = outcome(lambda: manager.save(4, state))
        found["explicit"] = outcome(lambda: manager.restore(build(rank, fresh=True), step=2).step)  # type: ignore[union-attr]
        found["steps_after_failures"] = manager.steps()
        found["fallback"] = fallback(directory, rank, world)
        # last: a rank that skips a save leaves its exchanges out of step with the others for good
        if rank != world - 1:
            found["skipped"] = outcome(lambda: manager.save(20, state))
        else:
            time.sleep(TIMEOUT + 2)  # stays alive (and silent) while the others wait for it
        # nobody leaves before every rank has seen its own timeout: rank 0 hosts the store, and a loaded machine
        # can let it time out, finish and exit while the others still wait on that store ("connection reset")
        dist.barrier()
        found["steps_at_end"] = manager.steps()
    return found


def fallback(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """On a copy whose newest step has one flipped byte in the last rank's own file, which only that rank reads:
    every rank must still fall back to the same older step."""
    copy = directory.parent / "corrupt-copy"
    if rank == 0:
        shutil.copytree(directory, copy)
        own = next((copy / "step-000000000003").glob(f"*/r{world - 1:05d}-own-*.safetensors"))
        data = bytearray(own.read_bytes())
        data[-1] ^= 0xFF
        own.write_bytes(bytes(data))
    dist.barrier()
    with safepoint.CheckpointManager(copy, timeout=TIMEOUT) as manager:
        report = manager.restore(build(rank, fresh=True))
    assert report is not None
    return {"step": report.step, "skipped": [[s.step, s.reason] for s in report.skipped]}


def killed(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """Rank 1 carries SAFEPOINT_FAULTS=data.write.after@2=kill: it dies writing the second save."""
    found: dict[str, Any] = {}
    state = build(rank)
    with safepoint.CheckpointManager(directory, timeout=TIMEOUT) as manager:
        found["first"] = outcome(lambda: manager.save(1, state).step)
        found["second"] = outcome(lambda: manager.save(2, state).step)
        found["steps"] = manager.steps()
    return found


def background(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """Background saves of replicated and PerRank entries on every rank, a restore made while one is in
    flight, and a failure on the last rank that must reach every rank exactly once."""
    found: dict[str, Any] = {}
    state = build(rank)
    saved = tensors(state)
    with safepoint.CheckpointManager(directory, keep_last=2, timeout=TIMEOUT, max_in_flight=2) as manager:
        handles = [manager.save(step, state, metrics={"loss": 1.0 / step}, blocking=False) for step in (1, 2, 3)]
        with torch.no_grad():  # the saves hold copies: changing the live tensors now must not reach them
            for parameter in state["model"].parameters():
                parameter.add_(1.0)
        state["shard"].value.add_(1.0)
        found["save_ids"] = [handle.result(timeout=60).save_id for handle in handles]
        manager.wait()
        found["steps"] = manager.steps()

        fresh = build(rank, fresh=True)
        report = manager.restore(fresh)
        assert report is not None
        found["restored_step"] = report.step
        found["model_and_optimizer_equal"] = same(tensors(fresh), saved)
        found["shard"] = fresh["shard"].value.tolist()
        found["count"] = fresh["count"].value

        handle = manager.save(4, state, blocking=False)
        during = manager.restore(build(rank, fresh=True))  # on the caller's thread while step 4 is written
        found["restored_during_save"] = None if during is None else during.step
        found["fourth"] = handle.result(timeout=60).step

        with faults.armed({"data.write.after": "eio"} if rank == world - 1 else {}):
            found["eio_call"] = outcome(lambda: manager.save(5, state, blocking=False).step)
            found["eio_wait"] = cause_of(manager.wait)
        found["eio_again"] = outcome(manager.wait)
        found["after_failure"] = outcome(lambda: manager.save(6, state, blocking=False).result(timeout=60).step)
        found["steps_at_end"] = manager.steps()
        dist.barrier()  # rank 0 hosts the store: nobody leaves before every rank has read its last outcome
    return found


def cause_of(call: Callable[[], Any]) -> dict[str, Any]:
    """``outcome`` of a call, plus the type, message and ranks of its error's cause."""
    try:
        call()
    except safepoint.SafepointError as error:
        cause = error.__cause__
        return {
            "error": type(error).__name__,
            "message": str(error),
            "cause": type(cause).__name__,
            "cause_ranks": list(getattr(cause, "ranks", ())),
        }
    return {"error": None}


def killed_background(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """As ``killed``, with background saves: the victim dies writing its files of the second save."""
    found: dict[str, Any] = {}
    state = build(rank)
    with safepoint.CheckpointManager(directory, timeout=TIMEOUT) as manager:
        found["first"] = outcome(lambda: manager.save(1, state, blocking=False).result(timeout=60).step)
        start = time.monotonic()
        found["second_call"] = outcome(lambda: manager.save(2, state, blocking=False).step)
        found["second_wait"] = cause_of(manager.wait)
        found["second_seconds"] = time.monotonic() - start
        found["second_again"] = outcome(manager.wait)
        found["steps"] = manager.steps()
    return found


def alone(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """distributed=False inside a group: rank 0 saves on its own (as Lightning does, on global rank 0 only) while
    the other ranks never call the manager; then every rank reads the checkpoint on its own."""
    found: dict[str, Any] = {}
    state = {"weights": torch.arange(6, dtype=torch.float32) * (rank + 1), "count": rank}
    if rank == 0:
        with safepoint.CheckpointManager(directory, distributed=False, timeout=TIMEOUT) as manager:
            found["sync"] = outcome(lambda: manager.save(1, state).step)
            found["background"] = outcome(lambda: manager.save(2, state, blocking=False).result(timeout=60).step)
            found["steps"] = manager.steps()
    dist.barrier()
    with safepoint.CheckpointManager(directory, distributed=False, timeout=TIMEOUT) as manager:
        values, report = manager.load()
    found["loaded_step"] = report.step
    found["loaded_weights"] = values["weights"].tolist()
    found["loaded_count"] = values["count"]
    return found


SCENARIOS = {
    "alone": alone,
    "basics": basics,
    "killed": killed,
    "background": background,
    "killed_background": killed_background,
}


def main() -> int:
    scenario, directory, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    found = SCENARIOS[scenario](directory, rank, world)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    sys.stdout.flush()
    # no destroy_process_group: after a rank died, gloo's teardown can wait on it; the results are written
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
