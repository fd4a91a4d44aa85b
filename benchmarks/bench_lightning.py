"""Lightning checkpoints: the default CheckpointIO against SafepointCheckpointIO, sync and background.

One process, one model and optimizer (a Lightning module trained a few steps so Adam has its state), and
``trainer.save_checkpoint(path)`` called as ModelCheckpoint calls it, to the same ``last.ckpt`` each time (the
overwrite every run does most) unless said otherwise. Methods interleave within each repeat; medians are reported.

- ``default``: Lightning's ``TorchCheckpointIO`` (torch.save through fsspec, temp file + move, no fsync).
  Reported as it is (``durable`` = returned, though the data may still be in the page cache) and with an fsync of
  the file and its directory added afterwards (``default+fsync``), which is what durable costs it.
- ``safepoint``: ``SafepointCheckpointIO()``, durable when it returns.
- ``safepoint.bg``: ``SafepointCheckpointIO(blocking=False)``; blocked = until ``save_checkpoint`` returns,
  durable = until ``wait()`` returns.
- ``safepoint.bg.new``: the same, to a new path each time (as a top-k checkpoint is): a new manager, so its
  staging buffers are fresh pages rather than reused ones.
- ``memcpy``: the checkpoint's tensors copied into reused, already-touched buffers: the floor of a background
  save's stall on the CPU.

``blocked`` is how long the training loop waits; ``durable`` is how long until the checkpoint survives power
loss. Run ``python benchmarks/bench_lightning.py --help``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from safepoint.integrations.lightning import SafepointCheckpointIO


class Model(LightningModule):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU()
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


def fsync(path: Path) -> None:
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY)):
        fd = os.open(target, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def trainer_with(plugin: CheckpointIO, model: Model, root: Path, hidden: int) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    data = DataLoader(TensorDataset(torch.randn(8, hidden)), batch_size=4)
    trainer.fit(model, data)
    return trainer


Timings = dict[str, list[float]]


def measure(
    plugins: dict[str, CheckpointIO], trainers: dict[str, Trainer], root: Path, repeats: int
) -> tuple[Timings, Timings]:
    """(blocked, durable) seconds of every method, ``repeats`` times after one warm-up round."""
    checkpoint = trainers["default"]._checkpoint_connector.dump_checkpoint()
    state = tensors(checkpoint)
    buffers = [torch.empty_like(t) for t in state]
    for buffer in buffers:
        buffer.fill_(0)  # touched: the pages exist, as a background save's reused staging buffers do
    blocked: Timings = {name: [] for name in (*plugins, "default+fsync", "memcpy")}
    durable: Timings = {name: [] for name in blocked}

    def record(name: str, start: float, returned: float, done: float) -> None:
        blocked[name].append(returned - start)
        durable[name].append(done - start)

    order = ["default", "safepoint", "safepoint.bg", "safepoint.bg.new", "memcpy"]
    for repeat in range(repeats + 1):  # the first round warms up (page cache, buffers, managers)
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            # .new: a new path each time, as a top-k checkpoint is (a fresh manager, so fresh staging buffers)
            path = root / name / (f"epoch={repeat}.ckpt" if name.endswith(".new") else "last.ckpt")
            start = time.perf_counter()
            if name == "memcpy":
                for buffer, tensor in zip(buffers, state, strict=True):
                    buffer.copy_(tensor)
                record(name, start, time.perf_counter(), time.perf_counter())
                continue
            trainers[name].save_checkpoint(path)
            returned = time.perf_counter()
            if name == "default":
                record(name, start, returned, returned)  # durable only once the page cache is written back
                fsync(path)
                record("default+fsync", start, returned, time.perf_counter())
            else:
                plugin = plugins[name]
                assert isinstance(plugin, SafepointCheckpointIO)
                plugin.wait()
                record(name, start, returned, time.perf_counter())
        if repeat == 0:
            for series in (*blocked.values(), *durable.values()):
                series.clear()
    return blocked, durable


def report(blocked: Timings, durable: Timings, nbytes: int, count: int, repeats: int) -> None:
    med = {name: (statistics.median(blocked[name]), statistics.median(durable[name])) for name in blocked}
    print(f"state: {nbytes / 2**20:.0f} MiB in {count} tensors; median of {repeats} saves of last.ckpt")
    print(f"{'method':<15} {'blocked (s)':>12} {'durable (s)':>12}")
    for name in ("memcpy", "default", "default+fsync", "safepoint", "safepoint.bg", "safepoint.bg.new"):
        print(f"{name:<15} {med[name][0]:>12.3f} {med[name][1]:>12.3f}")
    ratios = {
        "sync durable / default+fsync durable": med["safepoint"][1] / med["default+fsync"][1],
        "sync durable / default durable (no fsync)": med["safepoint"][1] / med["default"][1],
        "background durable / default+fsync durable": med["safepoint.bg"][1] / med["default+fsync"][1],
        "background blocked / memcpy": med["safepoint.bg"][0] / med["memcpy"][0],
        "background blocked, new path / memcpy": med["safepoint.bg.new"][0] / med["memcpy"][0],
        "background blocked / default blocked": med["safepoint.bg"][0] / med["default"][0],
    }
    print()
    for label, ratio in ratios.items():
        print(f"{label:<45} {ratio:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="width of the model (2048: about 200 MiB of state)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory, on the disk to measure")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="bench-lightning-", dir=args.dir))
    torch.manual_seed(0)
    model = Model(args.hidden)
    plugins: dict[str, CheckpointIO] = {
        "default": TorchCheckpointIO(),
        "safepoint": SafepointCheckpointIO(),
        "safepoint.bg": SafepointCheckpointIO(blocking=False),
        "safepoint.bg.new": SafepointCheckpointIO(blocking=False),
    }
    trainers = {name: trainer_with(plugin, model, root / name, args.hidden) for name, plugin in plugins.items()}
    state = tensors(trainers["default"]._checkpoint_connector.dump_checkpoint())
    nbytes = sum(t.numel() * t.element_size() for t in state)
    try:
        blocked, durable = measure(plugins, trainers, root, args.repeats)
    finally:
        for plugin in plugins.values():
            plugin.teardown()
    report(blocked, durable, nbytes, len(state), args.repeats)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
