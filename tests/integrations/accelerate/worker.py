"""A small Accelerate training run that checkpoints through safepoint's integration (or Accelerate's own
save_state, the control), for the kill-and-resume tests and the benchmark. The package never imports it.

``python -m tests.integrations.accelerate.worker PROJECT OUT --steps 15 --save-every 4 --total-limit 2``
trains a tiny model on the CPU with dropout, AdamW, a scheduler, a shuffling StatefulDataLoader and a registered
object; it first resumes with ``load_state`` when ``PROJECT/checkpoints`` has a checkpoint, and at the end writes
its final model, optimizer, scheduler and counters to OUT (a safepoint checkpoint) for the test to compare.

Crashes, all SIGKILL of this process, chosen by environment variables:
- ``ACCEL_KILL_AT_STEP=N``: after the optimizer step N (mid-run, not in a save);
- ``SAFEPOINT_FAULTS=point@n=kill``: at one of safepoint's own fault points, i.e. inside a save;
- ``ACCEL_KILL_IN=rename|rmtree`` (with ``ACCEL_KILL_NTH=n``, default 1): at the n-th ``os.replace`` (the
  publication of a checkpoint's name, or the first step of a removal) or ``shutil.rmtree`` of this process;
- ``ACCEL_KILL_IN=torch.save``: at the n-th ``torch.save`` (Accelerate's own save_state, the control);
- ``ACCEL_KILL_RANK=r``: under ``torch.distributed.run``, only rank r crashes (the others are disarmed).
"""

from __future__ import annotations

import os

if os.environ.get("ACCEL_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    # the crash is another rank's: disarm this one before safepoint reads SAFEPOINT_FAULTS at import
    for _name in ("SAFEPOINT_FAULTS", "ACCEL_KILL_AT_STEP", "ACCEL_KILL_IN"):
        os.environ.pop(_name, None)

import argparse
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

import safepoint
from safepoint.integrations.accelerate import load_state, save_state
from tests.helpers import end_rank


class Progress:
    """A registered object: the run's counters and a loss history."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.losses = list(state["losses"])


def _kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_kill(where: str, nth: int) -> None:
    """Wrap one function of this process so that its n-th call is a SIGKILL (before it runs)."""
    module, name = {"rename": (os, "replace"), "rmtree": (shutil, "rmtree"), "torch.save": (torch, "save")}[where]
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth:
            _kill_self()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def build(project: Path, total_limit: int | None) -> tuple[Accelerator, Any, Any, Any, Any, Progress]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=str(project), automatic_checkpoint_naming=True, total_limit=total_limit
        ),
        # a seedable sampler reshuffles by epoch number; the stateful loader skips what this epoch already yielded
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True),
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    # 9 batches an epoch (5 a rank with two ranks): no save (every 4 steps up to 12) falls on the end of an epoch,
    # where the loop would have to count the epoch as done before saving
    data = torch.utils.data.TensorDataset(torch.randn(36, 8), torch.randn(36, 1))
    # its own generator: the iterator a resumed run starts mid-epoch must not draw from the global RNG (dropout)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    # each rank its own dropout stream from here on, so a resume that gave a rank another's RNG would show
    torch.manual_seed(1000 + accelerator.process_index)
    return accelerator, model, optimizer, scheduler, loader, progress


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("project", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--total-limit", type=int, default=None)
    parser.add_argument("--accelerate", action="store_true", help="Accelerate's own save_state (the control)")
    args = parser.parse_args()
    accelerator, model, optimizer, scheduler, loader, progress = build(args.project, args.total_limit)
    save = accelerator.save_state if args.accelerate else lambda: save_state(accelerator)
    # a checkpoint_<i> name appears only once complete: its existence is the test (a crashed first save leaves
    # at most a hidden .checkpoint_0.partial, and then the run rightly starts from scratch)
    if any((args.project / "checkpoints").glob("checkpoint_*")):
        if args.accelerate:
            accelerator.load_state()
        else:
            report = load_state(accelerator)
            print(f"resumed from {report.path} at step {progress.step}", flush=True)
    if os.environ.get("ACCEL_KILL_IN"):
        _arm_kill(os.environ["ACCEL_KILL_IN"], int(os.environ.get("ACCEL_KILL_NTH", "1")))
    kill_at = int(os.environ.get("ACCEL_KILL_AT_STEP", "-1"))
    while progress.step < args.steps:
        loader.set_epoch(progress.epoch)  # Accelerate does not save the loader's epoch: the loop knows it
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.step += 1
            progress.losses.append(loss.item())
            if progress.step == kill_at:
                _kill_self()
            if progress.step % args.save_every == 0:
                save()
            if progress.step >= args.steps:
                break
        else:
            progress.epoch += 1
    # with many processes, each writes its own final state: out/rank<i>
    out = args.out if accelerator.num_processes == 1 else args.out / f"rank{accelerator.process_index}"
    safepoint.save(
        out,
        {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "progress": progress.state_dict(),
            "accelerator_step": accelerator.step,
            "rng": safepoint.RNGState(),
        },
    )


if __name__ == "__main__":
    main()
    end_rank()
