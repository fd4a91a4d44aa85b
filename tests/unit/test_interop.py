"""Import and export: torch.save files, safetensors files and Transformers checkpoint folders in; plain files out.

Invariants defended: *no code runs on load* (a malicious pickle is refused and its canary never appears, even
as a Trainer's training_args.bin) and *visible means complete* (a failed import or export leaves no
destination and no temporary file). The Transformers folder is built here from a tiny model with plain torch,
laid out the way the Trainer writes checkpoint-N; transformers itself is not needed.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import safepoint
from safepoint import (
    CheckpointNotFoundError,
    ConfigError,
    ConversionError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from tests.helpers import assert_same


class _Evil:
    """Pickles as a call that creates the canary file: what a malicious checkpoint does when unpickled."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return os.system, (f"touch '{self.canary}'",)


def tiny_training(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def nested_source() -> dict[str, Any]:
    model, optimizer, _ = tiny_training()
    return {
        "model": dict(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "history": [0.5, 0.25],
        "shape": (2, 3),
        "name": "run-1",
    }


def assert_same_tensors(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Same names and tensors bit for bit; the order may differ (safetensors files are not ordered by name)."""
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert_same(actual[name], tensor, name)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- import: torch.save and safetensors files -----------------------------------------------------------------------
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_torch_save_file_imports_with_its_nested_structure(tmp_path: Path, zipfile: bool) -> None:
    source = nested_source()
    torch.save(source, tmp_path / "ckpt.pt", _use_new_zipfile_serialization=zipfile)
    report = safepoint.import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "imported", step=12)
    assert report.kind == "torch"
    assert report.entries == ("model", "optimizer", "epoch", "history", "shape", "name")
    assert report.checkpoint.step == 12
    assert_same(safepoint.load(tmp_path / "imported"), source)


def test_a_torch_save_file_of_one_tensor_is_stored_under_value(tmp_path: Path) -> None:
    torch.save(torch.arange(4), tmp_path / "t.pt")
    safepoint.import_checkpoint(tmp_path / "t.pt", tmp_path / "imported")
    assert_same(safepoint.load(tmp_path / "imported"), {"value": torch.arange(4)})


def test_a_safetensors_file_imports_as_a_flat_dict(tmp_path: Path) -> None:
    tensors = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "weights.safetensors")
    report = safepoint.import_checkpoint(tmp_path / "weights.safetensors", tmp_path / "imported")
    assert report.kind == "safetensors"
    assert_same_tensors(safepoint.load(tmp_path / "imported"), tensors)


def test_the_kind_is_recognised_by_content_not_by_name(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "misnamed.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "misnamed.safetensors")
    assert safepoint.import_checkpoint(tmp_path / "misnamed.pt", tmp_path / "a").kind == "safetensors"
    assert safepoint.import_checkpoint(tmp_path / "misnamed.safetensors", tmp_path / "b").kind == "torch"


# -- import: refusing what could run code ---------------------------------------------------------------------------
def test_the_malicious_payload_is_live(tmp_path: Path) -> None:
    # the control: loading the planted file the unsafe way does create the canary
    canary = tmp_path / "canary"
    torch.save({"w": _Evil(canary)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert canary.exists()


@pytest.mark.parametrize("how", ["torch.save zip", "torch.save legacy", "plain pickle"])
def test_a_file_that_needs_arbitrary_pickle_is_refused_and_nothing_runs(tmp_path: Path, how: str) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    if how == "plain pickle":
        evil.write_bytes(pickle.dumps({"w": _Evil(canary)}, protocol=2))
    else:
        torch.save({"w": _Evil(canary)}, evil, _use_new_zipfile_serialization=how.endswith("zip"))
    with pytest.raises(UnsafeCheckpointError, match="needs arbitrary pickle") as caught:
        safepoint.import_checkpoint(evil, tmp_path / "imported")
    assert caught.value.path == str(evil)
    assert "system" in str(caught.value)  # torch's own words on what it refused
    assert "weights_only` set to `False`" not in str(caught.value)  # never advise the unsafe way
    assert not canary.exists()
    assert not (tmp_path / "imported").exists()


# -- import: a Transformers checkpoint-N folder ---------------------------------------------------------------------
def trainer_folder(root: Path, *, weights: str = "safetensors", canary: Path | None = None) -> dict[str, Any]:
    """What Trainer._save_checkpoint leaves in checkpoint-N, from a tiny model; returns the source values."""
    folder = root / "checkpoint-500"
    folder.mkdir(parents=True)
    model, optimizer, scheduler = tiny_training()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:  # sharded safetensors with an index, as save_pretrained writes large models
        names = list(state)
        shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, folder / "rng_state.pth")
    trainer_state = {
        "global_step": 500,
        "epoch": 1.5,
        "best_metric": None,
        "log_history": [{"loss": 0.75, "learning_rate": 1e-3, "step": 250}, {"loss": 0.5, "step": 500}],
        "is_world_process_zero": True,
    }
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 3}))
    (folder / "tokenizer.json").write_text("{}")
    # TrainingArguments is pickled as a whole object: loading it could run code, so it must never be opened
    (folder / "training_args.bin").write_bytes(pickle.dumps(_Evil(canary or root / "canary")))
    return {"model": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_state": rng, "trainer_state": trainer_state}  # fmt: skip


@pytest.mark.parametrize("weights", ["safetensors", "bin", "sharded"])
def test_a_transformers_checkpoint_folder_imports_every_part(tmp_path: Path, weights: str) -> None:
    canary = tmp_path / "canary"
    source = trainer_folder(tmp_path, weights=weights, canary=canary)
    report = safepoint.import_checkpoint(tmp_path / "checkpoint-500", tmp_path / "imported")
    assert report.kind == "transformers"
    assert report.checkpoint.step == 500
    assert set(report.entries) == {"model", "optimizer", "scheduler", "rng_state", "trainer_state", "config"}
    assert [s.split(":")[0] for s in report.skipped] == ["tokenizer.json", "training_args.bin"]
    assert "could run code" in report.skipped[1]
    assert not canary.exists()
    loaded = safepoint.load(tmp_path / "imported")
    assert_same_tensors(loaded["model"], source["model"])
    assert_same(loaded["optimizer"], source["optimizer"])
    assert_same(loaded["trainer_state"], source["trainer_state"])
    python_state = loaded["rng_state"]["python"]
    assert python_state == source["rng_state"]["python"]
    assert loaded["rng_state"]["numpy"][0] == "MT19937"
    assert_same(loaded["rng_state"]["numpy"][1], source["rng_state"]["numpy"][1])
    assert_same(loaded["rng_state"]["cpu"], source["rng_state"]["cpu"])


def test_an_imported_trainer_checkpoint_restores_into_live_objects(tmp_path: Path) -> None:
    trainer_folder(tmp_path)
    safepoint.import_checkpoint(tmp_path / "checkpoint-500", tmp_path / "imported")
    model, optimizer, scheduler = tiny_training(seed=1)
    reference, reference_optimizer, _ = tiny_training(seed=0)
    live = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    report = safepoint.restore(tmp_path / "imported", live, strict=False)
    assert set(report.unexpected) == {"rng_state", "trainer_state", "config"}
    assert_same(dict(model.state_dict()), dict(reference.state_dict()))
    assert_same(optimizer.state_dict()["state"], reference_optimizer.state_dict()["state"])
    assert scheduler.last_epoch == 2


def test_an_import_named_as_its_step_joins_a_manager_directory(tmp_path: Path) -> None:
    trainer_folder(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(ConversionError, match=r"named as step 400.*checkpoint is step 500"):
        safepoint.import_checkpoint(tmp_path / "checkpoint-500", run / "step-000000000400")
    assert not (run / "step-000000000400").exists()
    safepoint.import_checkpoint(tmp_path / "checkpoint-500", run / "step-000000000500")
    model, optimizer, scheduler = tiny_training(seed=1)
    with safepoint.CheckpointManager(run) as manager:
        assert manager.steps() == [500]
        report = manager.restore({"model": model, "optimizer": optimizer, "scheduler": scheduler}, strict=False)
    assert report is not None
    assert report.step == 500
    assert_same(dict(model.state_dict()), dict(tiny_training(seed=0)[0].state_dict()))


def test_a_shard_index_cannot_name_a_file_outside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(UnsafeCheckpointError, match="not a file name"):
        safepoint.import_checkpoint(folder, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


# -- import: bad input ---------------------------------------------------------------------------------------------
def test_import_refuses_bad_sources_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    safepoint.save(tmp_path / "already", {"w": torch.ones(1)})
    cases: list[tuple[Path, type[Exception], str]] = [
        (tmp_path / "missing.pt", CheckpointNotFoundError, "does not exist"),
        (tmp_path / "notes.txt", ConversionError, "not a format safepoint can import"),
        (tmp_path / "empty_dir", ConversionError, "not a Transformers checkpoint folder"),
        (tmp_path / "already", ConversionError, "already a safepoint checkpoint"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            safepoint.import_checkpoint(source, tmp_path / "imported")
        assert str(source) in str(caught.value)
        assert not (tmp_path / "imported").exists()


def test_a_truncated_torch_file_is_corrupt_and_leaves_nothing(tmp_path: Path) -> None:
    torch.save(nested_source(), tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"not a readable torch\.save file") as caught:
        safepoint.import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "imported")
    assert caught.value.path == str(tmp_path / "ckpt.pt")
    assert not (tmp_path / "imported").exists()


def test_a_value_safepoint_cannot_store_fails_naming_the_key_and_leaves_no_destination(tmp_path: Path) -> None:
    # (a torch.dtype was the example until format 2, which stores dtypes; complex128 tensors are still refused)
    torch.save({"w": torch.ones(2), "meta": {"c128": torch.zeros(2, dtype=torch.complex128)}}, tmp_path / "ckpt.pt")
    with pytest.raises(ConversionError, match="'meta/c128'") as caught:
        safepoint.import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "imported")
    assert str(tmp_path / "ckpt.pt") in str(caught.value)
    assert not (tmp_path / "imported").exists()


def test_import_never_writes_into_an_existing_destination(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpt.pt")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "mine.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="exists; refusing") as caught:
        safepoint.import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "dest")
    assert caught.value.path == str(tmp_path / "dest")
    assert listing(tmp_path / "dest") == ["mine.txt"]


# -- export ---------------------------------------------------------------------------------------------------------
def saved_state() -> dict[str, Any]:
    source = nested_source()
    source["array"] = np.arange(3, dtype=np.int16)
    source["scalar"] = np.float32(0.5)
    return source


def test_torch_export_reads_back_with_weights_only(tmp_path: Path) -> None:
    source = saved_state()
    safepoint.save(tmp_path / "ckpt", source, step=3)
    path = safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "out.pt", format="torch")
    assert path == str(tmp_path / "out.pt")
    loaded = torch.load(path, weights_only=True)
    expected = {**source, "array": torch.arange(3, dtype=torch.int16), "scalar": torch.tensor(0.5)}
    assert_same(loaded, expected)
    assert listing(tmp_path) == ["ckpt", "out.pt"]  # no temporary file left


def test_torch_export_of_a_subtree_holds_only_its_bytes(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(4)}, "big": torch.zeros(100_000)}
    safepoint.save(tmp_path / "ckpt", state)
    safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "model.pt", format="torch", key="model")
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), {"w": torch.ones(4)})
    assert (tmp_path / "model.pt").stat().st_size < 10_000  # not the 400 KB payload buffer it was read into


def test_safetensors_export_of_the_model_is_a_plain_state_dict(tmp_path: Path) -> None:
    source = saved_state()
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, {**source, "model": {k: v * 0 for k, v in source["model"].items()}})
        manager.save(2, source)
    out = tmp_path / "model.safetensors"
    safepoint.export_checkpoint(tmp_path / "run", out, format="safetensors", key="model")
    assert_same_tensors(load_file(out), source["model"])  # the newest step by default
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model.load_state_dict(load_file(out))  # what other tools do with it
    older = tmp_path / "older.safetensors"
    safepoint.export_checkpoint(tmp_path / "run", older, format="safetensors", key="model", step=1)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in load_file(older).values())


def test_safetensors_export_names_tensors_by_key_path(tmp_path: Path) -> None:
    state = {"a": {"b": [torch.ones(2), torch.arange(3)]}, "n": np.ones(2, dtype=np.float32), "empty": {}}
    safepoint.save(tmp_path / "ckpt", state)
    safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "all.safetensors", format="safetensors")
    loaded = load_file(tmp_path / "all.safetensors")
    assert_same_tensors(loaded, {"a/b/0": torch.ones(2), "a/b/1": torch.arange(3), "n": torch.ones(2)})


def test_safetensors_export_of_a_non_tensor_is_refused_naming_the_key(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", saved_state())
    dest = tmp_path / "out.safetensors"
    with pytest.raises(ConversionError, match="'optimizer/param_groups/0/lr' is of type float") as caught:
        safepoint.export_checkpoint(tmp_path / "ckpt", dest, format="safetensors")
    assert caught.value.path == str(dest)
    assert listing(tmp_path) == ["ckpt"]


def test_safetensors_export_refuses_two_entries_with_one_name(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}})
    with pytest.raises(ConversionError, match="both be named 'a/b'"):
        safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "x.safetensors", format="safetensors")
    assert listing(tmp_path) == ["ckpt"]


def test_export_refuses_bad_input_naming_the_path(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"w": torch.ones(2)})
    (tmp_path / "taken.pt").write_bytes(b"someone else's file")
    with pytest.raises(ConversionError, match="exists; refusing") as exists:
        safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "taken.pt", format="torch")
    assert exists.value.path == str(tmp_path / "taken.pt")
    assert (tmp_path / "taken.pt").read_bytes() == b"someone else's file"
    with pytest.raises(CheckpointNotFoundError, match="missing"):
        safepoint.export_checkpoint(tmp_path / "missing", tmp_path / "a.pt", format="torch")
    with pytest.raises(ConfigError, match="unknown export format 'npz'"):
        safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "a.npz", format="npz")  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="no/such/dir does not exist"):
        safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "no/such/dir/a.pt", format="torch")
    with pytest.raises(ConversionError, match="has no entry 'model'"):
        safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "a.pt", format="torch", key="model")
    with pytest.raises(ConversionError, match="is a file"):
        safepoint.export_checkpoint(tmp_path / "taken.pt", tmp_path / "a.pt", format="torch")
    assert listing(tmp_path) == ["ckpt", "taken.pt"]


def test_export_refuses_pickled_entries_without_opt_in(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"w": torch.ones(1), "obj": safepoint.Pickled({"x": 1})})
    with pytest.raises(UnsafeCheckpointError, match="'obj' is pickled"):
        safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "a.pt", format="torch")
    safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "a.pt", format="torch", allow_pickle=["obj"])
    assert torch.load(tmp_path / "a.pt", weights_only=True)["obj"] == {"x": 1}


def test_export_then_import_round_trips(tmp_path: Path) -> None:
    source = nested_source()
    safepoint.save(tmp_path / "ckpt", source)
    safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "out.pt", format="torch")
    safepoint.import_checkpoint(tmp_path / "out.pt", tmp_path / "back")
    assert_same(safepoint.load(tmp_path / "back"), source)


def test_per_rank_rng_files_and_a_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-20"
    folder.mkdir()
    for rank in (0, 1):
        torch.save({"cpu": torch.full((4,), rank, dtype=torch.uint8)}, folder / f"rng_state_{rank}.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": []}))  # no global_step: the name says
    report = safepoint.import_checkpoint(folder, tmp_path / "imported")
    assert report.checkpoint.step == 20
    loaded = safepoint.load(tmp_path / "imported")
    assert sorted(loaded) == ["rng_state_0", "rng_state_1", "trainer_state"]
    assert_same(loaded["rng_state_1"], {"cpu": torch.full((4,), 1, dtype=torch.uint8)})


# -- a write that fails half-way (a real EFBIG from the kernel, in a child process) ---------------------------------
_FILE_TOO_BIG = """
import json, os, resource, signal, sys, torch, safepoint
root = sys.argv[1]
results = {}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                   # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the 400 KB state cannot be written whole
for what, call in [
    ("export torch", lambda: safepoint.export_checkpoint(root + "/ckpt", root + "/out.pt", format="torch")),
    ("export safetensors", lambda: safepoint.export_checkpoint(
        root + "/ckpt", root + "/out.safetensors", format="safetensors")),
    ("import", lambda: safepoint.import_checkpoint(root + "/big.pt", root + "/imported")),
]:
    try:
        call()
        results[what] = "succeeded"
    except safepoint.StorageError as err:
        results[what] = f"StorageError {err.errno}"
print(json.dumps(results))
"""


def test_a_write_that_fails_half_way_leaves_no_destination_and_no_temporary_file(tmp_path: Path) -> None:
    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    safepoint.save(tmp_path / "ckpt", state)
    torch.save(state, tmp_path / "big.pt")
    before = listing(tmp_path)
    result = subprocess.run([sys.executable, "-c", _FILE_TOO_BIG, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert result.returncode == 0, result.stderr
    efbig = f"StorageError {errno.EFBIG}"
    assert json.loads(result.stdout) == {"export torch": efbig, "export safetensors": efbig, "import": efbig}
    assert listing(tmp_path) == before


def test_an_imported_rng_state_can_be_handed_to_torch(tmp_path: Path) -> None:
    """Issue 10: torch.set_rng_state on the CPU RNG state of an imported Trainer folder crashed the process
    (exit 139): the loaded tensor was a view at an offset of the payload buffer. Run in a child process, so a
    crash fails this test instead of killing pytest."""
    trainer_folder(tmp_path)
    safepoint.import_checkpoint(tmp_path / "checkpoint-500", tmp_path / "imported")
    script = (
        "import sys, torch, safepoint\n"
        "state = safepoint.load(sys.argv[1])['rng_state']['cpu']\n"
        "torch.set_rng_state(state)\n"
        "a = torch.rand(4)\n"
        "torch.set_rng_state(state)\n"
        "assert torch.equal(a, torch.rand(4))\n"
        "print('ok', state.untyped_storage().nbytes() == state.nbytes, state.storage_offset())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "imported")], capture_output=True, text=True)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["ok", "True", "0"]


def test_export_to_torch_keeps_container_types_and_ties(tmp_path: Path) -> None:
    """Regression: export rebuilt every dict as a plain dict and cloned every tensor, so an OrderedDict (a module's
    state_dict), a Counter or a defaultdict lost its type, and tied weights were written twice and came apart."""
    import collections

    weight = torch.randn(4, 3)
    counts: collections.defaultdict[str, list[int]] = collections.defaultdict(list, a=[1])
    state = {
        "model": collections.OrderedDict(wte=weight, head=weight),
        "milestones": collections.Counter({3: 1, 6: 2}),
        "counts": counts,
        "shape": torch.Size([2, 3]),
    }
    safepoint.save(tmp_path / "ckpt", state)
    out = safepoint.export_checkpoint(tmp_path / "ckpt", tmp_path / "out.pt", format="torch")
    exported = torch.load(out, weights_only=False)
    assert type(exported["model"]) is collections.OrderedDict
    assert type(exported["milestones"]) is collections.Counter
    assert exported["milestones"] == state["milestones"]
    assert type(exported["counts"]) is collections.defaultdict
    assert exported["counts"].default_factory is list
    assert type(exported["shape"]) is torch.Size
    wte, head = exported["model"]["wte"], exported["model"]["head"]
    assert torch.equal(wte, weight)
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
