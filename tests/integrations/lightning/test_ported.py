"""Lightning's own CheckpointIO and checkpointing tests, run against SafepointCheckpointIO.

Ported from Lightning's repository (facts and assertions, in our own words), with the plugin in place of
``TorchCheckpointIO``:

From ``tests/tests_pytorch/plugins/test_checkpoint_io_plugin.py``:
- ``test_checkpoint_plugin_called``: ported. Adapted: Lightning wraps its plugin in ``MagicMock`` to count
  calls; here a subclass counts them (the project does not mock the frameworks). The ``.ckpt`` entries are
  directories, which the same globs and ``ModelCheckpoint`` paths name.
- ``test_async_checkpoint_plugin``: adapted. Run twice: with ``SafepointCheckpointIO(blocking=False)`` (our
  background saves) and with Lightning's ``AsyncCheckpointIO`` wrapping our plugin; the counts are Lightning's.
  Added: every checkpoint left verifies, and with ours exactly the top 2 are left. Lightning's wrapper passes
  ``remove_checkpoint`` through at once, while the save of that path may still be queued on its thread, so the
  removed path can reappear (the same happens with its TorchCheckpointIO); ``blocking=False`` waits instead.
- ``test_multi_wrapped_checkpoint_io_initialization``: adapted. Lightning checks that an ``AsyncCheckpointIO``
  without a base plugin gets ``TorchCheckpointIO``; here the base is ours and must stay ours.

From ``tests/tests_pytorch/checkpointing/test_trainer_checkpoint.py``:
- ``test_trainer_save_checkpoint_storage_options``: adapted. Lightning's plugin refuses any ``storage_options``
  with a TypeError; ours uses them (fsspec options), so the test checks they arrive, by keyword, on each call,
  and that a value that is not a dict of options is a ConfigError.
- ``test_finetuning_with_ckpt_path``: ported.

From ``tests/tests_pytorch/checkpointing/test_model_checkpoint.py``:
- ``test_model_checkpoint_topk_zero``, ``test_model_checkpoint_topk_all``, ``test_save_last_versioning``,
  ``test_resume_and_old_checkpoint_files_remain``: ported.
- ``test_ckpt_version_after_rerun_new_trainer`` and ``test_ckpt_version_counter_disabled_after_rerun_new_trainer``:
  ported as one parametrised test; with the counter off, a re-run overwrites each path (a new step inside it).
- ``test_resume_training_preserves_old_ckpt_last``: adapted: ``os.path.isfile(last.ckpt)`` becomes "is a
  checkpoint that verifies" (ours is a directory).
- ``test_save_last_saves_correct_last_model_path``: adapted: ``torch.load`` of the file becomes our
  ``load_checkpoint`` (torch's file format is what it asserted).
- ``test_model_checkpoint_link_checkpoint``: adapted. Lightning's test links plain files and folders directly;
  here ``save_last="link"`` links our checkpoint directories during a run, and the link is read through.

Not ported: tests of ``ModelCheckpoint`` alone (names, arguments, YAML) that never reach a CheckpointIO, the
XLA plugin, and the legacy-checkpoint tests (torch files of old Lightning versions, which this plugin never
reads: it does not unpickle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

import safepoint
from safepoint.integrations.lightning import SafepointCheckpointIO
from tests.integrations.lightning.train import quiet


class CountingCheckpointIO(SafepointCheckpointIO):
    """Our plugin, recording how Lightning calls it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saves: list[tuple[Any, Any]] = []  # (path, storage_options)
        self.loads: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.removes: list[Any] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saves.append((path, storage_options))
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.loads.append((args, kwargs))
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.removes.append(path)
        super().remove_checkpoint(path)


def names(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


def verified(path: Path) -> bool:
    return all(status.ok for status in safepoint.verify(path).checkpoints)


# -- test_checkpoint_io_plugin.py ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["strategy", "plugins"])
def test_checkpoint_plugin_called(tmp_path: Path, how: str) -> None:
    plugin = CountingCheckpointIO()
    wiring: dict[str, Any] = (
        {"strategy": SingleDeviceStrategy("cpu", checkpoint_io=plugin)}
        if how == "strategy"
        else {"strategy": SingleDeviceStrategy("cpu"), "plugins": [plugin]}
    )
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            callbacks=callback,
            max_epochs=2,
            limit_train_batches=1,
            limit_val_batches=0,
            limit_test_batches=1,
            **wiring,
        )
    )
    model = BoringModel()
    trainer.fit(model)
    assert names(tmp_path) == {"epoch=1-step=2.ckpt", "last.ckpt"}
    assert callback.best_model_path == str(tmp_path / "epoch=1-step=2.ckpt")
    assert callback.last_model_path == str(tmp_path / "last.ckpt")
    assert len(plugin.saves) == 4  # per epoch: the top-1 and last.ckpt
    assert plugin.removes == [str(tmp_path / "epoch=0-step=1.ckpt")]
    assert all(verified(tmp_path / name) for name in names(tmp_path))

    trainer.test(model, ckpt_path=callback.last_model_path)
    assert plugin.loads == [((str(tmp_path / "last.ckpt"),), {"weights_only": None})]


def test_checkpoint_plugin_called_again_versions_the_names(tmp_path: Path) -> None:
    """The second half of Lightning's test: a new run in the same folder adds -v1 names (the entries exist)."""
    for _ in range(2):
        plugin = CountingCheckpointIO()
        callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = Trainer(
            **quiet(
                default_root_dir=tmp_path,
                callbacks=callback,
                max_epochs=2,
                limit_train_batches=1,
                limit_val_batches=0,
                limit_test_batches=1,
                plugins=[plugin],
            )
        )
        trainer.fit(BoringModel())
    assert names(tmp_path) == {"epoch=1-step=2.ckpt", "last.ckpt", "epoch=1-step=2-v1.ckpt", "last-v1.ckpt"}
    assert callback.best_model_path == str(tmp_path / "epoch=1-step=2-v1.ckpt")
    assert callback.last_model_path == str(tmp_path / "last-v1.ckpt")
    assert len(plugin.saves) == 4
    assert len(plugin.removes) == 1
    trainer.test(BoringModel(), ckpt_path=callback.last_model_path)
    assert plugin.loads == [((str(tmp_path / "last-v1.ckpt"),), {"weights_only": None})]


@pytest.mark.parametrize("wrapping", ["ours", "lightning"], ids=["blocking=False", "AsyncCheckpointIO"])
def test_async_checkpoint_plugin(tmp_path: Path, wrapping: str) -> None:
    ours = CountingCheckpointIO(blocking=wrapping != "ours")
    plugin: CheckpointIO = ours if wrapping == "ours" else AsyncCheckpointIO(ours)
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=2, monitor="step", mode="max")
    trainer = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            plugins=[plugin],
            callbacks=callback,
            max_epochs=3,
            limit_train_batches=1,
            limit_val_batches=0,
        )
    )
    model = BoringModel()
    trainer.validate(model)  # async must survive validate and fit on one Trainer
    trainer.fit(model)
    assert len(ours.saves) == 3
    assert ours.removes == [str(tmp_path / "epoch=0-step=1.ckpt")]
    assert all(verified(tmp_path / name) for name in names(tmp_path))  # teardown waited for the last save
    if wrapping == "ours":
        assert names(tmp_path) == {"epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt"}
    else:  # Lightning's wrapper removes at once, maybe before its thread has saved epoch 0: it may remain
        assert names(tmp_path) >= {"epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt"}


def test_multi_wrapped_checkpoint_io_keeps_ours_as_the_base() -> None:
    ours = SafepointCheckpointIO()
    inner = AsyncCheckpointIO(ours)
    outer = AsyncCheckpointIO(inner)
    trainer = Trainer(accelerator="cpu", plugins=[outer], logger=False)
    assert trainer.strategy.checkpoint_io is outer
    assert outer.checkpoint_io is inner
    assert inner.checkpoint_io is ours  # Lightning puts TorchCheckpointIO here only when there is no base


# -- test_trainer_checkpoint.py --------------------------------------------------------------------------------
def test_trainer_save_checkpoint_storage_options(tmp_path: Path) -> None:
    plugin = CountingCheckpointIO()
    trainer = Trainer(
        **quiet(default_root_dir=tmp_path, fast_dev_run=True, enable_checkpointing=False, plugins=[plugin])
    )
    trainer.fit(BoringModel())
    path = tmp_path / "path.ckpt"
    trainer.save_checkpoint(path, storage_options={"auto_mkdir": True})
    trainer.save_checkpoint(path)
    trainer.save_checkpoint(path, False, {"auto_mkdir": True})  # positionally: weights_only, storage_options
    assert plugin.saves == [(path, {"auto_mkdir": True}), (path, None), (path, {"auto_mkdir": True})]
    assert verified(path)
    with pytest.raises(safepoint.ConfigError, match="storage_options"):
        trainer.save_checkpoint(path, storage_options="my instance storage options")


def test_finetuning_with_ckpt_path(tmp_path: Path) -> None:
    class WithValidation(BoringModel):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.layer.parameters(), lr=0.001)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)]

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self.step(batch), on_epoch=True)

    callback = ModelCheckpoint(monitor="val_loss", dirpath=tmp_path, filename="{epoch:02d}", save_top_k=-1)
    model = WithValidation()
    trainer = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            max_epochs=1,
            limit_train_batches=4,
            limit_val_batches=2,
            limit_test_batches=2,
            callbacks=[callback],
            plugins=[SafepointCheckpointIO()],
        )
    )
    trainer.fit(model)
    assert os.listdir(tmp_path) == ["epoch=00.ckpt"]
    best = [callback.best_model_path]
    for epochs in range(3, 5):
        trainer = Trainer(
            **quiet(
                default_root_dir=tmp_path,
                max_epochs=epochs,
                limit_train_batches=4,
                limit_val_batches=2,
                limit_test_batches=2,
                plugins=[SafepointCheckpointIO()],
            )
        )
        trainer.fit(model, ckpt_path=best[-1])
        trainer.test()
        assert trainer.checkpoint_callback is not None
        best.append(trainer.checkpoint_callback.best_model_path)
    assert best[0].endswith("epoch=00.ckpt")
    assert "epoch=2" in best[1]
    assert "epoch=3" in best[2]


# -- test_model_checkpoint.py ----------------------------------------------------------------------------------
def test_model_checkpoint_topk_zero(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True)
    trainer = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            callbacks=[callback],
            max_epochs=2,
            limit_train_batches=2,
            limit_val_batches=0,
            plugins=[SafepointCheckpointIO()],
        )
    )
    trainer.fit(BoringModel())
    assert callback.best_model_path == ""
    assert callback.best_k_models == {}
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert callback.last_model_path == str(tmp_path / "last.ckpt")
    assert not os.path.islink(callback.last_model_path)
    assert SafepointCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 4


def test_model_checkpoint_topk_all(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", monitor="epoch", mode="max", save_top_k=-1)
    trainer = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            callbacks=[callback],
            max_epochs=3,
            limit_train_batches=1,
            limit_val_batches=1,
            plugins=[SafepointCheckpointIO()],
        )
    )
    trainer.fit(BoringModel())
    assert callback.best_model_path == str(tmp_path / "epoch=2.ckpt")
    assert callback.best_model_score == 2
    assert names(tmp_path) == {f"epoch={i}.ckpt" for i in range(3)}
    assert set(callback.best_k_models) == {str(tmp_path / f"epoch={i}.ckpt") for i in range(3)}
    assert callback.kth_best_model_path == str(tmp_path / "epoch=0.ckpt")


@pytest.mark.parametrize("version_counter", [True, False])
def test_ckpt_version_after_rerun_new_trainer(tmp_path: Path, version_counter: bool) -> None:
    for run in range(2):
        callback = ModelCheckpoint(
            dirpath=tmp_path,
            save_top_k=-1,
            monitor="epoch",
            filename="{epoch}",
            save_last=not version_counter,
            enable_version_counter=version_counter,
        )
        trainer = Trainer(
            **quiet(
                default_root_dir=tmp_path,
                max_epochs=2,
                limit_train_batches=1,
                limit_val_batches=1,
                callbacks=[callback],
                plugins=[SafepointCheckpointIO()],
            )
        )
        trainer.fit(BoringModel())
        expected = (
            {"epoch=0-v1.ckpt", "epoch=1-v1.ckpt"} if run and version_counter else {"epoch=0.ckpt", "epoch=1.ckpt"}
        )
        assert {Path(path).name for path in callback.best_k_models} == expected
    if version_counter:
        assert names(tmp_path) == {"epoch=0.ckpt", "epoch=1.ckpt", "epoch=0-v1.ckpt", "epoch=1-v1.ckpt"}
    else:  # overwritten in place, each one atomically: a new step in the same directory
        assert names(tmp_path) == {"epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"}
        assert [p.name for p in (tmp_path / "epoch=1.ckpt").iterdir()] == ["step-000000000001"]


def test_save_last_versioning(tmp_path: Path) -> None:
    for _ in range(2):
        callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True)
        trainer = Trainer(
            **quiet(
                max_epochs=2,
                callbacks=callback,
                limit_train_batches=1,
                limit_val_batches=0,
                plugins=[SafepointCheckpointIO()],
            )
        )
        trainer.fit(BoringModel())
    assert names(tmp_path) == {"last.ckpt", "last-v1.ckpt"}
    assert not any(os.path.islink(tmp_path / name) for name in names(tmp_path))


@pytest.mark.parametrize("same_folder", [True, False])
def test_resume_and_old_checkpoint_files_remain(tmp_path: Path, same_folder: bool) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    options = quiet(default_root_dir=tmp_path, limit_train_batches=10, limit_val_batches=0)
    callback = ModelCheckpoint(dirpath=first, monitor="step", mode="max", save_top_k=2, every_n_train_steps=2)
    Trainer(callbacks=callback, max_steps=5, plugins=[SafepointCheckpointIO()], **options).fit(BoringModel())
    assert names(first) == {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}

    target = first if same_folder else second
    callback = ModelCheckpoint(dirpath=target, monitor="step", mode="max", save_top_k=2, every_n_train_steps=2)
    trainer = Trainer(callbacks=callback, max_steps=8, plugins=[SafepointCheckpointIO()], **options)
    trainer.fit(BoringModel(), ckpt_path=str(first / "epoch=0-step=4.ckpt"))
    if same_folder:  # the checkpoint resumed from is never removed by top-k
        assert names(first) == {"epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt"}
    else:
        assert names(first) == {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}
        assert names(second) == {"epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt"}


def test_resume_training_preserves_old_ckpt_last(tmp_path: Path) -> None:
    options = quiet(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    checkpointing = {
        "filename": "{step}",
        "monitor": "step",
        "mode": "max",
        "save_last": True,
        "save_top_k": 2,
        "every_n_train_steps": 1,
    }
    model = BoringModel()
    Trainer(**options, callbacks=ModelCheckpoint(**checkpointing), plugins=[SafepointCheckpointIO()]).fit(model)
    old = tmp_path / "checkpoints"
    assert names(old) == {"last.ckpt", "step=2.ckpt", "step=3.ckpt"}
    options["max_epochs"] = 2
    callback = ModelCheckpoint(dirpath=tmp_path / "new", **checkpointing)
    Trainer(**options, callbacks=callback, plugins=[SafepointCheckpointIO()]).fit(model, ckpt_path=old / "step=2.ckpt")
    assert verified(old / "last.ckpt")
    assert SafepointCheckpointIO().load_checkpoint(old / "last.ckpt")["global_step"] == 3


def test_save_last_saves_correct_last_model_path(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback.CHECKPOINT_NAME_LAST = "{foo}-last"
    trainer = Trainer(**quiet(callbacks=callback, plugins=[SafepointCheckpointIO()]))
    trainer.strategy.connect(BoringModel())
    callback._save_last_checkpoint(trainer, {"foo": torch.tensor(1)})
    assert os.listdir(tmp_path) == ["foo=1-last.ckpt"]
    saved = SafepointCheckpointIO().load_checkpoint(tmp_path / "foo=1-last.ckpt")
    assert saved["callbacks"][callback.state_key]["last_model_path"] == str(tmp_path / "foo=1-last.ckpt")


def test_model_checkpoint_link_checkpoint(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=1, save_last="link", every_n_train_steps=1)
    trainer = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            callbacks=[callback],
            max_steps=3,
            limit_val_batches=0,
            plugins=[SafepointCheckpointIO()],
        )
    )
    trainer.fit(BoringModel())
    last = tmp_path / "last.ckpt"
    assert names(tmp_path) == {"epoch=0-step=3.ckpt", "last.ckpt"}
    assert os.path.islink(last)
    assert os.readlink(last) == "epoch=0-step=3.ckpt"  # relative, as Lightning makes it
    assert SafepointCheckpointIO().load_checkpoint(last)["global_step"] == 3
    resumed = Trainer(
        **quiet(
            default_root_dir=tmp_path,
            max_steps=4,
            limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last="link")],
            plugins=[SafepointCheckpointIO()],
        )
    )
    resumed.fit(BoringModel(), ckpt_path="last")
    assert resumed.global_step == 4
