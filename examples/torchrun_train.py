"""Training on several processes with torchrun, checkpointed by safepoint, resumed exactly after a crash.

Run it on one machine with two processes (gloo on CPU, nccl when every process has a GPU)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 examples/torchrun_train.py --dir runs/ddp

Stop it at any moment (Ctrl-C, ``kill -9`` of any process, a pre-empted node) and run the same command again: it
resumes from the newest checkpoint that verifies, and ends with exactly the weights an uninterrupted run has.

What safepoint needs from a distributed program is what this file does:

1. every rank constructs the ``CheckpointManager`` after ``init_process_group``, on the same directory;
2. every rank calls ``restore(state)`` and ``save(step, state)`` at the same steps (the same step on every rank);
3. state that differs between ranks (each rank's random generators, its position in its data) is wrapped in
   ``safepoint.PerRank``; everything else (the model, the optimizer) is identical on every rank and written once.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import safepoint


def batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch for this step: a pure function of (step, rank), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(1_000_003 * step + rank)
    inputs = torch.randn(64, 16, generator=generator)
    targets = inputs[:, :4] * 2.0 - inputs[:, 4:8] + 0.1 * torch.randn(64, 4, generator=generator)
    return inputs.to(device), targets.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory, shared by every rank")
    parser.add_argument("--steps", type=int, default=60, help="train until this step")
    parser.add_argument("--every", type=int, default=10, help="save every this many steps")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for the others")
    parser.add_argument("--out", help="where rank 0 writes the final weights (a checkpoint directory)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress = {"step": -1}
    data = {"samples_seen": 0}  # restored in place, like every dict in the state
    torch.manual_seed(100 + rank)  # each rank's own random stream
    state = {
        "model": model,  # the module itself, not the DDP wrapper: its keys do not depend on the wrapping
        "optimizer": optimizer,
        "progress": progress,
        "rng": safepoint.PerRank(safepoint.RNGState()),
        "data": safepoint.PerRank(data),
    }

    with safepoint.CheckpointManager(args.dir, keep_last=3, timeout=args.timeout) as manager:
        report = manager.restore(state)  # every rank restores the same step, or every rank raises
        if rank == 0:
            print(f"resumed from step {report.step}" if report else "starting fresh", flush=True)
        for step in range(progress["step"] + 1, args.steps):
            inputs, targets = batch(step, rank, device)
            loss = torch.nn.functional.mse_loss(ddp(inputs), targets)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients across ranks here
            optimizer.step()
            progress["step"] = step
            data["samples_seen"] += len(inputs)
            if (step + 1) % args.every == 0:
                manager.save(step, state, metrics={"loss": loss.item()})
                if rank == 0:
                    print(f"saved step {step} (loss {loss.item():.4f})", flush=True)

    if rank == 0 and args.out:
        safepoint.save(args.out, {"model": model})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
