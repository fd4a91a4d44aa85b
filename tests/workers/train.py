"""A deterministic training run for the resume tests: ``python -m tests.workers.train DIR STEPS OUT [--every K]``.

It resumes from the newest valid checkpoint in DIR if there is one, trains to STEPS, checkpointing every K steps
and printing ``committed N`` after each durable save, then writes its final state to OUT with safepoint.save.
Data comes from the checkpointed RNG, so a resumed run sees the same batches and dropout masks.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import safepoint


def build() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": safepoint.RNGState(),
        "progress": {"step": -1, "seen": 0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, so a killer can land mid-run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    state = build()
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    assert isinstance(model, torch.nn.Module)
    assert isinstance(optimizer, torch.optim.Optimizer)
    progress = state["progress"]
    assert isinstance(progress, dict)
    with safepoint.CheckpointManager(args.directory, keep_last=2) as manager:
        report = manager.restore(state)
        start = report.step + 1 if report else 0
        print(f"resumed {report.step if report else 'none'}", flush=True)
        for step in range(start, args.steps):
            inputs = torch.randn(32, 16)
            target = torch.randint(0, 4, (32,))
            loss = torch.nn.functional.cross_entropy(model(inputs), target)
            loss.backward()
            optimizer.step()
            scheduler.step()  # type: ignore[attr-defined]
            optimizer.zero_grad()
            progress["step"] = step
            progress["seen"] += 32
            if args.sleep:
                time.sleep(args.sleep)
            if step % args.every == 0 or step == args.steps - 1:
                manager.save(step, state, metrics={"loss": loss.item()})
                print(f"committed {step}", flush=True)
    safepoint.save(args.out, {"model": model, "optimizer": optimizer, "progress": progress})
    return 0


if __name__ == "__main__":
    sys.exit(main())
