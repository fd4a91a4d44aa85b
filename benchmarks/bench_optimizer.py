"""Restoring a model and an optimizer object that holds state already, in one process: time and peak memory.

The live state is ``{"model": model, "optim": optimizer}``: ``--layers`` linear layers of 1024 x 1024 float32 and an
AdamW that has taken a step, so it holds its moments (twice the parameters' bytes), as after training for a while
(a restore to an earlier step after a loss spike). Methods, each into the same live objects:

- ``safepoint``: ``safepoint.restore(path, state)``: every byte verified, total or nothing.
- ``torch``: ``torch.load(path, weights_only=True)`` of the two state dicts ``torch.save`` wrote, then the model's and
  the optimizer's ``load_state_dict``: nothing verified, nothing rolled back.

Each timed call follows an eviction of the checkpoint's pages (``posix_fadvise(DONTNEED)``, after a sync), so reads
are cold, and a garbage collection. Peak memory is the growth of the process's resident set during the call
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux). Repeats rotate the methods' order;
medians are reported, with torch's time over safepoint's.

    .venv/bin/python benchmarks/bench_optimizer.py --quick    # 4 layers, 3 repeats
    .venv/bin/python benchmarks/bench_optimizer.py            # 64 MiB of parameters, 192 MiB with AdamW, 9 repeats
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _durable import evict_tree

import safepoint

MIB = 1 << 20
WIDTH = 1024


def build(layers: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW that has taken one step (so it holds its moments), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
            parameter.grad = torch.randn(parameter.shape, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    return model, optimizer


def resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def timed(call: Callable[[], Any], root: Path) -> tuple[float, float]:
    """Seconds and peak resident growth (MiB) of one cold call."""
    evict_tree(root)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    before = resident_mib("VmRSS:")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return seconds, max(0.0, resident_mib("VmHWM:") - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="linear layers of 1024 x 1024 (4 MiB each)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 layers, 3 repeats")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.repeats = 4, 3
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-optimizer-", dir=args.dir))
    try:
        saved_model, saved_optimizer = build(args.layers, seed=1)
        safepoint.save(root / "safepoint", {"model": saved_model, "optim": saved_optimizer})
        torch.save({"model": saved_model.state_dict(), "optim": saved_optimizer.state_dict()}, root / "torch.pt")
        del saved_model, saved_optimizer
        model, optimizer = build(args.layers, seed=2)

        def with_torch() -> None:
            loaded = torch.load(root / "torch.pt", weights_only=True)
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optim"])

        methods: dict[str, Callable[[], Any]] = {
            "safepoint": lambda: safepoint.restore(root / "safepoint", {"model": model, "optim": optimizer}),
            "torch": with_torch,
        }
        found: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        names = list(methods)
        for repeat in range(args.repeats):
            for name in names[repeat % 2 :] + names[: repeat % 2]:
                found[name].append(timed(methods[name], root))
        state_mib = args.layers * (WIDTH * WIDTH + WIDTH) * 4 * 3 / MIB
        print(f"model + AdamW holding state: {state_mib:.0f} MiB, cold, medians of {args.repeats} repeats\n")
        print("| method | seconds | peak resident growth MiB | torch / safepoint |")
        print("| --- | --- | --- | --- |")
        medians = {name: statistics.median(s for s, _ in runs) for name, runs in found.items()}
        for name, runs in found.items():
            growth = statistics.median(g for _, g in runs)
            print(f"| {name} | {medians[name]:.3f} | {growth:.0f} | {medians['torch'] / medians['safepoint']:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
