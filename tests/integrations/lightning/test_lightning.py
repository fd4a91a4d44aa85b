"""SafepointCheckpointIO and load_from_checkpoint with the real Lightning Trainer and Fabric, on the CPU.

What each Lightning path is on disk, when it is visible, what resume does with a damaged one, that nothing is
pickled, the background option, Fabric, S3 (moto on loopback) and the lazy import.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import safepoint
from safepoint.integrations.lightning import SafepointCheckpointIO, load_from_checkpoint
from tests.helpers import assert_same, audit_events
from tests.integrations.lightning.train import TinyModel, loader, quiet
from tests.storage.conftest import S3Server

ROOT = Path(__file__).resolve().parents[3]


def flip_middle_of_largest_payload(checkpoint: Path) -> Path:
    """Flip one byte in the middle of the largest payload file of a Lightning path (a manager directory)."""
    payloads = [p for p in checkpoint.rglob("*.safetensors")]
    largest = max(payloads, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    return largest


def fit(directory: Path, epochs: int, plugin: SafepointCheckpointIO | None = None, **fit_args: Any) -> Trainer:
    trainer = Trainer(
        **quiet(
            max_epochs=epochs,
            plugins=[plugin or SafepointCheckpointIO()],
            callbacks=[ModelCheckpoint(dirpath=directory, save_top_k=1, save_last=True)],
            default_root_dir=directory,
        )
    )
    trainer.fit(TinyModel(), loader(), **fit_args)
    return trainer


def checkpoint_step(path: Path) -> int:
    value = SafepointCheckpointIO().load_checkpoint(path)["global_step"]
    assert isinstance(value, int)
    return value


# -- what is on disk, and when -----------------------------------------------------------------------------------
@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "background"])
def test_every_lightning_path_is_a_verified_checkpoint_directory(tmp_path: Path, blocking: bool) -> None:
    fit(tmp_path, 2, SafepointCheckpointIO(blocking=blocking))
    assert sorted(os.listdir(tmp_path)) == ["epoch=1-step=8.ckpt", "last.ckpt"]  # no hidden leftovers either
    for name in ("epoch=1-step=8.ckpt", "last.ckpt"):
        report = safepoint.verify(tmp_path / name)
        assert [status.ok for status in report.checkpoints] == [True], name  # one step, retention removed the rest
        assert checkpoint_step(tmp_path / name) == 8


def test_a_new_path_is_absent_until_its_checkpoint_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "run" / "epoch=0-step=4.ckpt"
    seen: list[bool] = []
    real_fsync = os.fsync

    def watching(fd: int) -> None:
        seen.append(os.path.lexists(target))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching)
    SafepointCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, target)
    monkeypatch.undo()
    assert len(seen) >= 4  # payload, manifest, directories: all before the rename, then the parent after it
    assert not any(seen[:-1])
    assert seen[-1] is True
    assert checkpoint_step(target) == 4


def test_overwriting_keeps_the_previous_checkpoint_until_the_new_one_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = SafepointCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(4)}, last)
    seen: list[int] = []
    real_link = os.link

    def watching(src: Any, dst: Any, **kwargs: Any) -> None:  # safepoint publishes a manifest with link()
        seen.append(checkpoint_step(last))
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", watching)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(4)}, last)
    monkeypatch.undo()
    assert seen == [1]
    assert checkpoint_step(last) == 2
    assert len(list(last.glob("step-*"))) == 1  # the previous step went once the new one was durable


def test_a_file_url_is_the_local_path(tmp_path: Path) -> None:
    io = SafepointCheckpointIO()
    io.save_checkpoint({"global_step": 5}, f"file://{tmp_path}/a.ckpt")
    assert checkpoint_step(tmp_path / "a.ckpt") == 5
    assert io.load_checkpoint(f"file://{tmp_path}/a.ckpt")["global_step"] == 5
    io.remove_checkpoint(f"file://{tmp_path}/a.ckpt")
    assert os.listdir(tmp_path) == []


def test_remove_checkpoint_leaves_nothing_and_ignores_a_missing_path(tmp_path: Path) -> None:
    io = SafepointCheckpointIO()
    path = tmp_path / "epoch=0-step=4.ckpt"
    io.save_checkpoint({"global_step": 4}, path)
    io.remove_checkpoint(path)
    assert os.listdir(tmp_path) == []
    io.remove_checkpoint(path)  # Lightning's own plugin does nothing for a missing path either
    assert os.listdir(tmp_path) == []


def test_a_link_made_by_save_last_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    trainer = Trainer(
        **quiet(
            max_epochs=2,
            plugins=[SafepointCheckpointIO()],
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=1, save_last="link")],
        )
    )
    trainer.fit(TinyModel(), loader())
    last = tmp_path / "last.ckpt"
    assert last.is_symlink()
    assert os.readlink(last) == "epoch=1-step=8.ckpt"
    SafepointCheckpointIO().save_checkpoint({"global_step": 99}, last)
    assert not last.is_symlink()
    assert checkpoint_step(last) == 99
    assert checkpoint_step(tmp_path / "epoch=1-step=8.ckpt") == 8  # the link's target is untouched


def test_a_directory_still_linked_is_removed_only_once_the_link_moves_on(tmp_path: Path) -> None:
    """ModelCheckpoint(save_last="link") removes the previous top-k before it re-links last.ckpt to the new one:
    removed at once, last.ckpt would dangle in between, and Lightning resumes from scratch over a dangling link."""
    io = SafepointCheckpointIO()
    old, new, last = tmp_path / "epoch=0.ckpt", tmp_path / "epoch=1.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4}, old)
    os.symlink("epoch=0.ckpt", last)
    io.save_checkpoint({"global_step": 8}, new)
    io.remove_checkpoint(old)
    assert checkpoint_step(last) == 4  # still there while last.ckpt names it
    os.remove(last)  # what ModelCheckpoint._link_checkpoint does next
    os.symlink("epoch=1.ckpt", last)
    io.save_checkpoint({"global_step": 12}, tmp_path / "epoch=2.ckpt")  # the next call removes what is due
    assert sorted(os.listdir(tmp_path)) == ["epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt"]
    io.remove_checkpoint(last)  # a link itself goes at once
    assert sorted(os.listdir(tmp_path)) == ["epoch=1.ckpt", "epoch=2.ckpt"]


def test_every_n_train_steps_names_and_resume(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = Trainer(**quiet(max_steps=7, plugins=[SafepointCheckpointIO()], callbacks=[callback]))
    trainer.fit(TinyModel(), loader())
    names = sorted(os.listdir(tmp_path))
    assert names == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    assert checkpoint_step(tmp_path / "last.ckpt") == 6
    resumed = Trainer(
        **quiet(max_steps=9, plugins=[SafepointCheckpointIO()], callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    )
    resumed.fit(TinyModel(), loader(), ckpt_path="last")
    assert resumed.global_step == 9


# -- resume -----------------------------------------------------------------------------------------------------
def test_resume_from_last_is_exact(tmp_path: Path) -> None:
    first = fit(tmp_path, 2)
    saved = first.lightning_module.state_dict()
    resumed_model = TinyModel(hidden=16)
    trainer = Trainer(**quiet(max_epochs=2, plugins=[SafepointCheckpointIO()], default_root_dir=tmp_path))
    trainer.fit(resumed_model, loader(), ckpt_path=str(tmp_path / "last.ckpt"))  # nothing left to train
    assert trainer.global_step == 8
    assert_same(resumed_model.state_dict(), saved)


def test_damaged_last_falls_back_to_the_newest_valid_checkpoint_with_a_warning(tmp_path: Path) -> None:
    fit(tmp_path, 2)
    last = tmp_path / "last.ckpt"
    flip_middle_of_largest_payload(last)
    safepoint.save(tmp_path / "stranger.ckpt", {"x": 1})  # a directory next to it that is not one of ours
    with pytest.warns(UserWarning, match="safepoint: ") as record:
        trainer = fit(tmp_path, 3, ckpt_path="last")
    messages = [str(warning.message) for warning in record]
    fallback = [m for m in messages if "last.ckpt cannot be used" in m]
    assert len(fallback) == 1
    assert "checksum" in fallback[0]
    assert "resuming from" in fallback[0]
    assert fallback[0].endswith("epoch=1-step=8.ckpt instead, the newest checkpoint next to it that verifies")
    assert any("skipping" in m and "stranger.ckpt" in m for m in messages)
    assert trainer.global_step == 12  # continued from step 8, not from scratch
    assert checkpoint_step(last) == 12  # and last.ckpt holds the new step


def test_damaged_last_with_nothing_valid_next_to_it_raises(tmp_path: Path) -> None:
    fit(tmp_path, 1)
    for name in ("last.ckpt", "epoch=0-step=4.ckpt"):
        flip_middle_of_largest_payload(tmp_path / name)
    model = TinyModel()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = Trainer(
        **quiet(
            max_epochs=2,
            plugins=[SafepointCheckpointIO()],
            default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        )
    )
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(safepoint.CorruptCheckpointError) as info:
        trainer.fit(model, loader(), ckpt_path="last")
    assert "refusing to start from scratch" in str(info.value)
    assert trainer.global_step == 0
    assert_same(dict(model.state_dict()), before)


def test_a_damaged_explicit_path_is_refused_not_replaced(tmp_path: Path) -> None:
    fit(tmp_path, 2)
    flip_middle_of_largest_payload(tmp_path / "epoch=1-step=8.ckpt")
    trainer = Trainer(**quiet(max_epochs=3, plugins=[SafepointCheckpointIO()], default_root_dir=tmp_path))
    with pytest.raises(safepoint.CorruptCheckpointError, match="checksum"):
        trainer.fit(TinyModel(), loader(), ckpt_path=str(tmp_path / "epoch=1-step=8.ckpt"))
    assert trainer.global_step == 0


def test_a_torch_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, path)
    with audit_events() as events, pytest.raises(safepoint.CheckpointNotFoundError, match="not a checkpoint written"):
        SafepointCheckpointIO().load_checkpoint(path)
    assert [event for event, _ in events if event.startswith("pickle.")] == []


def test_nothing_written_is_a_pickle_and_nothing_is_unpickled_on_resume(tmp_path: Path) -> None:
    with audit_events() as events:
        fit(tmp_path, 2)
        fit(tmp_path, 3, ckpt_path="last")
    assert [event for event, _ in events if event.startswith("pickle.")] == []
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written
    for path in written:
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{path} starts like a pickle"
        assert head != b"PK", f"{path} is a zip (torch.save's format)"


# -- what the checkpoint dict may hold ------------------------------------------------------------------------
class Fittable(LightningModule):
    """The least a module needs for ``trainer.fit`` on ``loader()``."""

    layer: torch.nn.Module

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class HyperModel(Fittable):
    def __init__(self, config: argparse.Namespace, extra: AttributeDict, size: int = 8, **rest: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(size, 1)
        self.loaded_with: dict[str, Any] | None = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_with = checkpoint


def test_usual_hyper_parameters_come_back_exactly_through_load_from_checkpoint(tmp_path: Path) -> None:
    config = argparse.Namespace(lr=0.1, layers=[1, 2], name="x", nothing=None, where=Path("data/train"))
    extra = AttributeDict(dropout=0.5, nested={"a": [1.5, "b"]})
    model = HyperModel(config, extra, size=8, tag="first")
    trainer = Trainer(**quiet(max_epochs=0, plugins=[SafepointCheckpointIO()], default_root_dir=tmp_path))
    trainer.fit(model, loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = load_from_checkpoint(HyperModel, path, tag="second")
    assert type(loaded) is HyperModel
    assert_same(loaded.hparams["config"], config)
    assert_same(loaded.hparams["extra"], extra)
    assert loaded.hparams["size"] == 8
    assert loaded.hparams["tag"] == "second"  # kwargs override the saved values, as in Lightning
    assert_same(loaded.state_dict(), model.state_dict())
    assert loaded.loaded_with is not None
    assert loaded.loaded_with["global_step"] == 0  # on_load_checkpoint saw the checkpoint


def test_the_whole_lightning_dict_comes_back_exactly(tmp_path: Path) -> None:
    config = argparse.Namespace(lr=0.1, where=Path("data"), nothing=None)
    model = HyperModel(config, AttributeDict(dropout=0.5), size=8)
    callback = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="step", mode="max", save_top_k=2)
    trainer = Trainer(**quiet(max_epochs=2, plugins=[SafepointCheckpointIO()], callbacks=[callback]))
    trainer.fit(model, loader())
    expected = trainer._checkpoint_connector.dump_checkpoint()  # what Lightning hands to any CheckpointIO
    path = tmp_path / "all.ckpt"
    SafepointCheckpointIO().save_checkpoint(expected, path)
    loaded = SafepointCheckpointIO().load_checkpoint(path)
    for key in (
        "state_dict",
        "optimizer_states",
        "lr_schedulers",
        "loops",
        "callbacks",
        "hparams_name",
        "hyper_parameters",
        "pytorch-lightning_version",
        "epoch",
        "global_step",
    ):
        assert key in loaded, key
    assert_same(loaded, expected, "checkpoint")


def test_load_from_checkpoint_is_strict_by_default(tmp_path: Path) -> None:
    path = tmp_path / "tiny.ckpt"
    model = TinyModel(hidden=4)
    trainer = Trainer(**quiet(max_epochs=0, plugins=[SafepointCheckpointIO()], default_root_dir=tmp_path))
    trainer.fit(model, loader())
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_from_checkpoint(TinyModel, path, hidden=5)  # the override builds a model the weights do not fit
    loaded = load_from_checkpoint(TinyModel, path, map_location="cpu")
    assert loaded.hparams["hidden"] == 4
    assert_same(loaded.state_dict(), model.state_dict())


class LossInHyperParameters(Fittable):
    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(8, 1)


def test_a_value_that_cannot_be_stored_exactly_is_refused_naming_key_and_opt_in(tmp_path: Path) -> None:
    model = LossInHyperParameters(torch.nn.MSELoss())
    trainer = Trainer(**quiet(max_epochs=0, plugins=[SafepointCheckpointIO()], default_root_dir=tmp_path))
    trainer.fit(model, loader())
    path = tmp_path / "model.ckpt"
    with pytest.raises(safepoint.InvalidStateError) as info:
        trainer.save_checkpoint(path)
    assert info.value.key == "hyper_parameters/loss"
    assert "pickle_keys=['hyper_parameters/loss']" in str(info.value)
    assert os.listdir(tmp_path) == []  # nothing visible, no leftover

    opted_in = SafepointCheckpointIO(pickle_keys=["hyper_parameters/loss"])
    trainer = Trainer(**quiet(max_epochs=0, plugins=[opted_in], default_root_dir=tmp_path))
    trainer.fit(model, loader())
    trainer.save_checkpoint(path)
    with pytest.raises(safepoint.UnsafeCheckpointError, match="hyper_parameters/loss"):
        load_from_checkpoint(LossInHyperParameters, path)  # unpickled only where the reader opts in too
    loaded = load_from_checkpoint(LossInHyperParameters, path, pickle_keys=["hyper_parameters/loss"])
    assert type(loaded.hparams["loss"]) is torch.nn.MSELoss


# -- background saves ----------------------------------------------------------------------------------------
def test_a_background_failure_is_raised_once_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = SafepointCheckpointIO(blocking=False)
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the background writer's
            raise OSError(errno.EIO, "injected I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    io.save_checkpoint({"w": torch.ones(1000), "global_step": 1}, tmp_path / "a.ckpt")  # returns before writing
    with pytest.raises(safepoint.BackgroundSaveError) as info:
        io.wait()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert info.value.errno == errno.EIO
    assert "a.ckpt" in str(info.value)
    io.wait()  # raised once: not again
    io.teardown()
    assert os.listdir(tmp_path) == []


def test_background_load_and_remove_wait_for_the_save_in_flight(tmp_path: Path) -> None:
    io = SafepointCheckpointIO(blocking=False)
    path = tmp_path / "a.ckpt"
    weights = torch.arange(1 << 20, dtype=torch.float32)
    io.save_checkpoint({"w": weights, "global_step": 3}, path)
    weights.zero_()  # the checkpoint holds the values of the call
    loaded = io.load_checkpoint(path)
    assert_same(loaded["w"], torch.arange(1 << 20, dtype=torch.float32))
    io.save_checkpoint({"global_step": 4}, path)
    io.remove_checkpoint(path)
    assert os.listdir(tmp_path) == []
    io.teardown()


# -- Fabric and S3 -------------------------------------------------------------------------------------------
def test_fabric_save_and_load_round_trip(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[SafepointCheckpointIO()])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "state.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2, "config": argparse.Namespace(lr=0.1)})

    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh, fresh_optimizer = fabric.setup(fresh, fresh_optimizer)
    remainder = fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer})
    assert remainder["step"] == 2
    assert_same(remainder["config"], argparse.Namespace(lr=0.1))
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fresh_optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert [p.name for p in path.iterdir()] == ["step-000000000001"]


def test_trainer_on_s3_with_storage_options(s3_server: S3Server, tmp_path: Path) -> None:
    dirpath = s3_server.url("lightning-run")
    plugin = SafepointCheckpointIO(storage_options=s3_server.options)
    trainer = Trainer(
        **quiet(
            max_epochs=2,
            plugins=[plugin],
            callbacks=[ModelCheckpoint(dirpath=dirpath, save_top_k=1, save_last=True)],
            default_root_dir=tmp_path,
        )
    )
    trainer.fit(TinyModel(), loader())
    keys = {
        obj["Key"].split("/")[1]
        for obj in s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="lightning-run/")["Contents"]
    }
    assert keys == {"epoch=1-step=8.ckpt", "last.ckpt"}  # the top-1 of epoch 0 was removed
    assert safepoint.verify(f"{dirpath}/last.ckpt", storage_options=s3_server.options).ok

    resumed = Trainer(**quiet(max_epochs=3, plugins=[plugin], default_root_dir=tmp_path))
    resumed.fit(TinyModel(), loader(), ckpt_path=f"{dirpath}/last.ckpt")
    assert resumed.global_step == 12
    extra = f"{dirpath}/extra.ckpt"
    resumed.save_checkpoint(extra, storage_options={"default_block_size": 5 * 2**20})  # per call, added
    assert plugin.load_checkpoint(extra)["global_step"] == 12
    plugin.remove_checkpoint(extra)
    assert not safepoint.CheckpointManager(extra, storage_options=s3_server.options).steps()


# -- packaging -----------------------------------------------------------------------------------------------
def test_importing_without_lightning_names_the_extra() -> None:
    code = "import sys; sys.modules['lightning'] = None; import safepoint.integrations.lightning"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "ImportError" in result.stderr
    assert "pip install 'safepoint[lightning]'" in result.stderr


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(safepoint.ConfigError, match="blocking"):
        SafepointCheckpointIO(blocking="yes")  # type: ignore[arg-type]
    with pytest.raises(safepoint.ConfigError, match="pickle_keys"):
        SafepointCheckpointIO(pickle_keys="hyper_parameters/loss")
    with pytest.raises(safepoint.ConfigError, match="storage_options"):
        SafepointCheckpointIO().save_checkpoint({}, tmp_path / "a.ckpt", storage_options="my options")
    with pytest.raises(safepoint.ConfigError, match="map_location"):
        SafepointCheckpointIO().load_checkpoint(tmp_path / "a.ckpt", map_location=lambda storage, loc: storage)
    with pytest.raises(safepoint.ConfigError, match="LightningModule"):
        load_from_checkpoint(torch.nn.Linear, tmp_path / "a.ckpt")  # type: ignore[type-var]
