"""Accelerate checkpoints: ``Accelerator.save_state`` against ``safepoint.integrations.accelerate.save_state``.

The same Accelerator (CPU, one process) with the same model, AdamW (with its state), scheduler, registered object
and RNG, side by side in one run. Timed from the call until the checkpoint is durable:

- ``accelerate``: ``accelerator.save_state(dir)``, then ``fsync`` of every file it wrote and of every directory
  (Accelerate itself never fsyncs; ``accelerate (no fsync)`` is its call alone, for reference: not durable).
- ``safepoint``: ``save_state(accelerator, dir)``, durable when it returns (files, manifest, the rename of the
  folder to its name and the parent directory, all fsynced).

Loading is timed too, as a resume: a freshly built Accelerator (new model, optimizer without state) loads with
``accelerator.load_state(dir)`` or ``load_state(accelerator, dir)`` (which verifies every byte first, backs the
optimizer up and checks every tensor after applying). Methods alternate within each repeat, in an order rotated
per repeat; outputs are deleted and ``os.sync()`` called before each timed call. Medians are reported, with the
ratio safepoint / accelerate.

    .venv/bin/python benchmarks/bench_accelerate.py --quick          # 16 MiB of parameters, 3 repeats
    .venv/bin/python benchmarks/bench_accelerate.py --size-mib 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import accelerate
import torch
from _durable import fsync_tree
from accelerate import Accelerator

from safepoint.integrations.accelerate import load_state, save_state

OUT = Path(__file__).resolve().parent / "out"


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def build(size_mib: int, *, train: bool = True) -> Accelerator:
    torch.manual_seed(0)
    width = 1024
    layers = max(1, size_mib * 2**20 // (4 * width * width))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(Progress())
    if not train:
        return accelerator
    loss = model(torch.randn(2, width)).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()  # AdamW's exp_avg and exp_avg_sq exist: the state is three times the parameters
    scheduler.step()
    optimizer.zero_grad()
    return accelerator


def nbytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=128, help="MiB of fp32 parameters (state is ~3x)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="16 MiB, 3 repeats")
    parser.add_argument("--dir", type=Path, default=OUT / "scratch-accelerate", help="scratch directory")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.repeats = 16, 3
    accelerator = build(args.size_mib)
    scratch = args.dir
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)

    def accelerate_save(path: Path) -> Callable[[], object]:
        return lambda: (accelerator.save_state(str(path)), fsync_tree(path))

    methods: dict[str, tuple[Callable[[Path], Callable[[], object]], Callable[[Accelerator, Path], object]]] = {
        "accelerate": (accelerate_save, lambda fresh, path: fresh.load_state(str(path))),
        "safepoint": (lambda path: lambda: save_state(accelerator, path), load_state),
    }
    times: dict[str, list[float]] = {f"{name} {what}": [] for name in methods for what in ("save", "load")}
    times["accelerate (no fsync) save"] = []
    sizes: dict[str, int] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        order = list(methods)[repeat % 2 :] + list(methods)[: repeat % 2]
        for name in order:
            save, load = methods[name]
            path = scratch / f"{name}-{repeat}"
            os.sync()
            seconds = timed(save(path))
            sizes[name] = nbytes(path)
            fresh = build(args.size_mib, train=False)  # the resume of a new process
            os.sync()
            loaded = timed(lambda load=load, path=path, fresh=fresh: load(fresh, path))
            if repeat:
                times[f"{name} save"].append(seconds)
                times[f"{name} load"].append(loaded)
            shutil.rmtree(path)
        path = scratch / f"nofsync-{repeat}"
        os.sync()
        seconds = timed(lambda path=path: accelerator.save_state(str(path)))
        if repeat:
            times["accelerate (no fsync) save"].append(seconds)
        os.sync()
        shutil.rmtree(path)
    shutil.rmtree(scratch, ignore_errors=True)

    medians = {key: statistics.median(values) for key, values in times.items()}
    lines = [
        f"# bench_accelerate: {args.size_mib} MiB of parameters, {args.repeats} repeats, median seconds",
        "",
        f"accelerate {accelerate.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs; "
        f"on disk: accelerate {sizes['accelerate'] / 2**20:.1f} MiB, safepoint {sizes['safepoint'] / 2**20:.1f} MiB",
        "",
        "| what | median s | all runs |",
        "| --- | ---: | --- |",
    ]
    for key, values in times.items():
        lines.append(f"| {key} | {medians[key]:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    save_ratio = medians["safepoint save"] / medians["accelerate save"]
    load_ratio = medians["safepoint load"] / medians["accelerate load"]
    lines += ["", f"save until durable, safepoint / accelerate: {save_ratio:.2f}x",
              f"load (safepoint verifies every byte first), safepoint / accelerate: {load_ratio:.2f}x"]  # fmt: skip
    report = "\n".join(lines)
    print(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_accelerate.md").write_text(report + "\n")
    record = {
        "command": [sys.executable, *sys.argv],
        "when": datetime.now(timezone.utc).isoformat(),
        "size_mib": args.size_mib,
        "times": times,
        "bytes": sizes,
    }
    (OUT / "bench_accelerate.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
