"""A tiny Lightning run for the crash tests, started as a subprocess (never imported by the package).

``python train.py DIR OUT [--resume] [--background] [--epochs N]`` trains on the CPU with SafepointCheckpointIO,
checkpointing into DIR at the end of every epoch (``save_top_k=1`` and ``save_last=True``, so every epoch also
removes the previous top-1 checkpoint), then writes the final weights, optimizer state and global step to OUT
with ``safepoint.save``. ``--resume`` starts with ``trainer.fit(ckpt_path="last")``.

Crashes, armed by environment variables (the process kills itself with SIGKILL, as a pre-emption would):
- ``KILL_AFTER_STEP=k``: after global step k.
- ``KILL_IN_SAVE=s:n``: during the s-th save (1-based) of this process, at its n-th ``os.fsync``,
  ``os.rename`` or ``os.link`` call: inside safepoint's commit, the rename to the Lightning name, or the removal
  of the previous top-k checkpoint that follows the save.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import safepoint
from safepoint.integrations.lightning import SafepointCheckpointIO


class TinyModel(LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.01, name: str = "tiny", data: Path = Path("data")) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]


def quiet(**overrides: Any) -> dict[str, Any]:
    """Arguments of a small, quiet CPU Trainer, with ``overrides``."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
    options.update(overrides)
    return options


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8, shuffle=False)


class StartStep(Callback):
    """Records the global step training starts from: 0 from scratch, the checkpoint's step when resumed."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        self.step = trainer.global_step


class KillAfterStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInSave(SafepointCheckpointIO):
    """Kills at the n-th file-system call (fsync, rename, link) of the s-th save: from its start until the next
    save starts, so a background save's calls and a top-k removal that follows it count too."""

    def __init__(self, save: int, call: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saves, self.save_to_kill, self.calls = 0, save, 0
        for name in ("fsync", "rename", "link"):
            setattr(os, name, self._counted(getattr(os, name)))

    def _counted(self, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.saves == self.save_to_kill:
                self.calls += 1
                if self.calls == CALL:
                    os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return call

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.wait()  # the previous save's background calls belong to it
        self.saves += 1
        super().save_checkpoint(checkpoint, path, storage_options)


CALL = 0


def train(
    directory: Path,
    out: Path,
    *,
    resume: bool = False,
    epochs: int = 4,
    plugin: SafepointCheckpointIO | None = None,
    callbacks: tuple[Callback, ...] = (),
    devices: int = 1,
) -> int:
    """Train (or resume) in this process, write the final state to ``out``; the global step it started from."""
    torch.manual_seed(0)
    start = StartStep()
    checkpointing = ModelCheckpoint(dirpath=directory, save_top_k=1, save_last=True)
    trainer = Trainer(
        **quiet(
            max_epochs=epochs,
            plugins=[plugin or SafepointCheckpointIO()],
            callbacks=[checkpointing, start, *callbacks],
            default_root_dir=directory,
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
        )
    )
    model = TinyModel()
    trainer.fit(model, loader(), ckpt_path="last" if resume else None)
    final = {
        "state_dict": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "global_step": trainer.global_step,
        "start_step": start.step,
    }
    if trainer.global_rank == 0:  # with DDP every rank holds the same values
        safepoint.save(out, final)
    assert start.step is not None
    return start.step


def main() -> None:
    global CALL
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1, help="more than 1: DDP with that many CPU processes")
    args = parser.parse_args()
    plugin: SafepointCheckpointIO
    callbacks: tuple[Callback, ...] = ()
    if "KILL_IN_SAVE" in os.environ:
        save, CALL = (int(part) for part in os.environ["KILL_IN_SAVE"].split(":"))
        plugin = KillInSave(save, CALL, blocking=not args.background)
    else:
        plugin = SafepointCheckpointIO(blocking=not args.background)
    if "KILL_AFTER_STEP" in os.environ:
        callbacks = (KillAfterStep(int(os.environ["KILL_AFTER_STEP"])),)
    train(
        args.dir, args.out, resume=args.resume, epochs=args.epochs, plugin=plugin, callbacks=callbacks,
        devices=args.devices,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
