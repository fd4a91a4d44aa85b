"""The Lightning case: a real ``lightning.pytorch.Trainer`` checkpoints through a CheckpointIO plugin.

The plugin is Lightning's public way to own checkpoint files: ``save_checkpoint`` gets the dict the Trainer built
(state_dict, optimizer_states, lr_schedulers, loops, callbacks, hyper_parameters, ...) and writes it with
``safepoint.save``; ``load_checkpoint`` returns ``safepoint.load``. A ModelCheckpoint callback saves the best
epoch through the plugin as well, and a callback keeps the RNG state in the checkpoint, so dropout and shuffling
continue exactly. The reference run fits 4 epochs; the interrupted one fits 2, checkpoints, and a new process
resumes with ``fit(ckpt_path=...)`` to 4. The resumed process also compares the dict ``safepoint.load`` returns
with the one the Trainer built (saved with torch.save).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import safepoint
from tests.zoo.cases import mlp, seed_everything
from tests.zoo.compare import diffs, plain

EPOCHS, STOP_EPOCHS, BATCHES_PER_EPOCH = 4, 2, 6


def lightning_run(mode: str, work: Path) -> None:
    import lightning.pytorch as pl
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.05, name: str = "tiny") -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = mlp()
            self.trace: list[list[float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, target = batch
            loss = F.cross_entropy(self.net(inputs), target)
            self.trace.append([loss.item()])
            self.log("train_loss", loss, on_step=False, on_epoch=True)  # ModelCheckpoint's monitor
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def train_dataloader(self) -> Any:
            generator = torch.Generator().manual_seed(7)
            data = torch.utils.data.TensorDataset(torch.randn(22, 6, generator=generator), torch.arange(22) % 3)
            return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)

    class KeepRNG(pl.Callback):
        def state_dict(self) -> dict[str, Any]:
            return safepoint.RNGState().state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            safepoint.RNGState().load_state_dict(state_dict)

    class SafepointIO(CheckpointIO):
        def __init__(self) -> None:
            self.saved: dict[str, Any] | None = None

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            self.saved = checkpoint
            safepoint.save(path, checkpoint)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
            return safepoint.load(path)

        def remove_checkpoint(self, path: Any) -> None:
            shutil.rmtree(path)

    def trainer(epochs: int, plugins: list[Any], run: str) -> pl.Trainer:
        # ModelCheckpoint saves every epoch through the plugin too, and its state (best score, paths) is in the dict
        best = ModelCheckpoint(dirpath=work / run, monitor="train_loss", save_top_k=1, mode="min")
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=[KeepRNG(), best],
            plugins=plugins,
            logger=False,
            enable_checkpointing=True,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )

    def dump(path: Path, module: Tiny, fitted: pl.Trainer, start: int, **extra: Any) -> None:
        state = {
            "model": module,
            "optimizer": fitted.optimizers[0],
            "scheduler": fitted.lr_scheduler_configs[0].scheduler,
            "rng": safepoint.RNGState(),
            "progress": {"global_step": fitted.global_step, "epoch": fitted.current_epoch},
        }
        torch.save({"start": start, "trace": module.trace, "state": plain(state), **extra}, path)

    warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, ...) is noise here
    if mode == "reference":
        seed_everything(0)
        module = Tiny()
        fitted = trainer(EPOCHS, [], "full")
        fitted.fit(module)
        dump(work / "full.pt", module, fitted, 0)

        seed_everything(0)
        module = Tiny()
        io = SafepointIO()
        fitted = trainer(STOP_EPOCHS, [io], "first")
        fitted.fit(module)
        fitted.save_checkpoint(work / "ckpt")
        assert io.saved is not None
        torch.save(io.saved, work / "control.pt")
        dump(work / "first.pt", module, fitted, 0)
        return

    seed_everything(0)
    module = Tiny()
    extra: dict[str, Any] = {}
    if mode == "resume-safepoint":
        original = torch.load(work / "control.pt", weights_only=False)
        extra["roundtrip"] = diffs(original, safepoint.load(work / "ckpt"))
        fitted = trainer(EPOCHS, [SafepointIO()], "resume-safepoint")
        fitted.fit(module, ckpt_path=work / "ckpt")
    else:
        fitted = trainer(EPOCHS, [], mode)
        fitted.fit(module, ckpt_path=work / "control.pt", weights_only=False)  # numpy RNG state
    dump(work / f"{mode}.pt", module, fitted, STOP_EPOCHS * BATCHES_PER_EPOCH, **extra)


LIGHTNING_CASES: dict[str, Callable[[str, Path], None]] = {"lightning-trainer": lightning_run}
