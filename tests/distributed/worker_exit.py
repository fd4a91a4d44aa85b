"""One rank of a script that ends with a background save in flight: ``python -m tests.distributed.worker_exit
SCENARIO DIR OUT``.

Each rank starts ``manager.save(7, state, blocking=False)`` of a row-sharded DTensor, a replicated tensor and a
``PerRank`` tensor (the values of :func:`values`), writes ``OUT/rank<N>.json`` and returns from its script: no
``wait()``, no ``close()``, and, unlike the other workers, no ``os._exit``: the interpreter exits normally, so
safepoint's exit hook has to finish the save on every rank while the interpreters are still whole. Scenarios:
``unclosed`` (only that) and ``destroyed`` (``dist.destroy_process_group()`` right after the save, as training
scripts end). ``interrupted`` is another ending: rank 0's main thread, waiting in a save for a rank 1 that never
comes, gets Ctrl-C (SIGINT) and its script ends there, while the wait it gave up on is still blocked in the store;
rank 1 sleeps, then ends. The package never imports this module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import safepoint

ROWS, COLUMNS = 4096, 1024  # 16 MiB of float32 in each tensor: the save is still in flight when the script ends


def values(rank: int) -> dict[str, torch.Tensor]:
    """The full values every rank saves: ``sharded`` (split by rows), ``replicated``, and this rank's ``own``."""
    generator = torch.Generator().manual_seed(13)
    return {
        "sharded": torch.randn(ROWS, COLUMNS, generator=generator),
        "replicated": torch.randn(ROWS, COLUMNS, generator=generator),
        "own": torch.full((ROWS, COLUMNS), float(rank)),
    }


def interrupted(directory: Path, out: Path, rank: int) -> None:
    """Rank 0 saves; rank 1 never does. SIGINT reaches rank 0 one second into the save's first wait."""
    found: dict[str, object] = {}
    if rank == 0:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            with safepoint.CheckpointManager(directory, timeout=60) as manager:
                manager.save(1, {"weights": torch.ones(4)})
        except KeyboardInterrupt:
            found["interrupted_after"] = time.monotonic() - start
    else:
        time.sleep(5)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    print(f"rank {rank}: the script ends", flush=True)


def main() -> None:
    scenario, directory, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    if scenario == "interrupted":
        interrupted(directory, out, rank)
        return
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = values(rank)
    state = {
        "model": {"sharded": distribute_tensor(full["sharded"], mesh, [Shard(0)]), "replicated": full["replicated"]},
        "own": safepoint.PerRank(full["own"]),
    }
    dist.barrier()  # the last collective, well before the exit (see benchmarks/_ranks.py's end_rank)
    manager = safepoint.CheckpointManager(directory, timeout=60)
    handle = manager.save(7, state, blocking=False)
    if scenario == "destroyed":
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps({"returned_before_done": not handle.done()}))
    print(f"rank {rank}: the script ends", flush=True)


if __name__ == "__main__":
    main()
