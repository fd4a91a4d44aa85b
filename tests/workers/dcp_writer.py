"""Writes a real multi-rank ``torch.distributed.checkpoint`` checkpoint of an FSDP2 model and its AdamW state:
``python -m tests.workers.dcp_writer DCP_DIR OUT``, one process per rank with the env:// variables of a gloo group
(tests/distributed/group.py starts them).

Besides the DCP directory, rank 0 writes ``OUT/expected.pt``: the full values gathered with ``full_tensor()`` in
this run, so the import test compares with what the training run held, never with the code under test.
The model has uneven shards (13 rows over 2 ranks: 7 and 6) and a tensor of one row (1 and 0 rows: an empty shard).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def full(value: Any) -> Any:
    """The value with every DTensor gathered into a plain tensor (a collective: every rank calls it)."""
    if isinstance(value, DTensor):
        return value.full_tensor().clone()
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    if isinstance(value, tuple):
        return tuple(full(v) for v in value)
    return value


def main() -> int:
    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.ReLU(), torch.nn.Linear(13, 1))
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        torch.manual_seed(100 + rank)
        model(torch.randn(4, 5)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "progress": {"step": 2, "name": "fsdp"}}
    dcp.save(state, checkpoint_id=directory)
    expected = full(state)
    if rank == 0:
        torch.save(expected, out / "expected.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world}))
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: gloo's teardown can wait on the other rank; the results are written


if __name__ == "__main__":
    sys.exit(main())
