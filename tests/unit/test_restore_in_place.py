"""Restore reads large plain tensors straight into the live tensors, behind a backup (issue 10's read path).

What must hold: the live tensors end with exactly the checkpoint's bits; and a restore that fails anywhere
before it is complete (a damaged file, a mismatch found after the read, an object's ``load_state_dict``) leaves
every live tensor bitwise as it was, also when it falls back to an older step. Only tensors whose bytes no one
else sees are written in place; every other kind takes the copy after verifying, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint._backup import TensorBackups
from safepoint._layout import step_dir
from safepoint._payload import DIRECT_BYTES, direct_target
from safepoint._pipeline import save_to
from safepoint._reader import read_checkpoint
from safepoint._restore import copied_into
from safepoint._storage import LocalStorage
from tests.helpers import payload_paths, read_manifest

NUMEL = DIRECT_BYTES // 4  # float32 values at the size that is read in place


#: Small float32 values: read many to a call into their live tensors, behind one backup per run.
SMALL = 1000


def large(count: int, seed: int, numel: int = NUMEL) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(numel, generator=generator) for i in range(count)}


def originals(count: int, numel: int = NUMEL) -> dict[str, torch.Tensor]:
    """Live tensors with bits a restore must not lose: a NaN payload, -0.0 and values no checkpoint here holds."""
    live = {f"t{i}": torch.full((numel,), float(i + 100)) for i in range(count)}
    for tensor in live.values():
        tensor[0] = -0.0
        tensor.view(torch.int32)[1] = 0x7FC0_1234  # a NaN with a payload: NaN != NaN, bits compare exactly
    return live


def bits(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {key: tensor.view(torch.uint8).numpy().tobytes() for key, tensor in tensors.items()}


def save_in_files(path: Path, state: dict[str, Any], file_bytes: int) -> list[Path]:
    storage = LocalStorage(path)
    storage.shard_bytes = file_bytes
    save_to(storage, "", 0, state, metrics=None, state_version=1)
    return payload_paths(path)


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)


def file_of(checkpoint: Path, key: str) -> Path:
    manifest = read_manifest(checkpoint)
    (entry,) = (e for e in manifest["entries"] if e["key"] == key)
    return checkpoint / manifest["files"][entry["file"]]["path"]


def test_large_plain_tensors_are_read_in_place_and_restored_exactly(tmp_path: Path) -> None:
    saved = {"big": large(3, seed=0), "small": {"s": torch.arange(5.0)}}
    safepoint.save(tmp_path / "c", saved)
    live: dict[str, Any] = {"big": originals(3), "small": {"s": torch.zeros(5)}}
    addresses = {key: t.data_ptr() for key, t in live["big"].items()}
    storage = LocalStorage(tmp_path / "c")
    backups = TensorBackups()
    loaded = read_checkpoint(storage, "", copied=copied_into(live, None), backups=backups)
    in_place = [leaf for leaf in loaded.leaves if any(leaf is t for t in live["big"].values())]
    assert len(in_place) == 3  # every large one became its own live tensor
    assert loaded.leaves[[e.key for e in loaded.manifest.entries].index("small/s")] is live["small"]["s"]
    assert len(backups) == 4  # the small one too (since issue 10's round 5)
    backups.discard()

    report = safepoint.restore(tmp_path / "c", live)
    assert report.restored == ("big", "small")
    assert bits(live["big"]) == bits(saved["big"])
    assert {key: t.data_ptr() for key, t in live["big"].items()} == addresses
    assert torch.equal(live["small"]["s"], torch.arange(5.0))


#: (values per tensor, tensors per entry): large ones read alone, small ones in runs behind one backup each
SIZES = pytest.mark.parametrize(("numel", "count"), [(NUMEL, 2), (SMALL, 300)], ids=["large", "small"])


@SIZES
def test_a_damaged_last_file_puts_every_tensor_read_in_place_back(tmp_path: Path, numel: int, count: int) -> None:
    state = {f"e{i}": large(count, seed=i, numel=numel) for i in range(3)}
    files = save_in_files(tmp_path / "c", state, file_bytes=count * numel * 4)
    assert len(files) == 3
    damage(files[-1])  # its bytes are read into live tensors too, and fail only at its end
    live = {entry: originals(count, numel) for entry in state}
    before = {entry: bits(tensors) for entry, tensors in live.items()}
    with pytest.raises(safepoint.CorruptCheckpointError, match="does not match its checksum"):
        safepoint.restore(tmp_path / "c", live)
    for entry, tensors in live.items():
        assert bits(tensors) == before[entry], entry


@SIZES
def test_a_mismatch_found_after_the_read_puts_every_tensor_back(tmp_path: Path, numel: int, count: int) -> None:
    safepoint.save(tmp_path / "c", {"big": large(count, seed=1, numel=numel), "b": {"x": torch.ones(3)}})
    live: dict[str, Any] = {"big": originals(count, numel), "b": {"x": torch.ones(4)}}
    before = bits(live["big"])
    with pytest.raises(safepoint.RestoreError, match="b/x"):
        safepoint.restore(tmp_path / "c", live)
    assert bits(live["big"]) == before


class FailingSGD(torch.optim.SGD):
    """An optimizer whose load_state_dict fails, as one given a state of another optimizer's layout does."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise ValueError("loaded state dict contains a parameter group that doesn't match")


@SIZES
def test_an_optimizer_failing_in_its_load_state_dict_puts_every_tensor_back(
    tmp_path: Path, numel: int, count: int
) -> None:
    parameter = torch.nn.Parameter(torch.ones(3))
    saved = {"big": large(count, seed=2, numel=numel), "opt": torch.optim.SGD([parameter], lr=0.1)}
    safepoint.save(tmp_path / "c", saved)
    failing = FailingSGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    live: dict[str, Any] = {"big": originals(count, numel), "opt": failing}
    before = bits(live["big"])
    with pytest.raises(safepoint.RestoreError, match=r"'opt'.*load_state_dict") as caught:
        safepoint.restore(tmp_path / "c", live)
    assert isinstance(caught.value.__cause__, ValueError)
    assert bits(live["big"]) == before


@SIZES
def test_a_manager_falls_back_from_the_values_it_started_with(tmp_path: Path, numel: int, count: int) -> None:
    """Step 2 is read into the live tensors and fails at its end; step 1, which has no ``b``, is then restored:
    ``b`` must hold its own value again, not step 2's."""
    with safepoint.CheckpointManager(tmp_path / "m") as manager:
        manager.save(1, {"a": large(count, seed=3, numel=numel)})
        manager.save(2, {"a": large(count, seed=4, numel=numel), "b": large(count, seed=5, numel=numel)})
    damage(file_of(tmp_path / "m" / step_dir(2), "a/t0"))
    live = {"a": originals(count, numel), "b": originals(count, numel)}
    before_b = bits(live["b"])
    with safepoint.CheckpointManager(tmp_path / "m") as manager:
        report = manager.restore(live, strict=False)
    assert report is not None
    assert report.step == 1
    assert [s.step for s in report.skipped] == [2]
    assert bits(live["a"]) == bits(large(count, seed=3, numel=numel))
    assert bits(live["b"]) == before_b


def test_small_tensors_are_read_in_place_in_runs_and_the_others_copied(tmp_path: Path) -> None:
    saved = large(300, seed=8, numel=SMALL)
    safepoint.save(tmp_path / "c", {"s": saved})
    live = originals(300, SMALL)
    addresses = {key: t.data_ptr() for key, t in live.items()}
    view = live["t150"][:10]  # a view sees its bytes: t150 is copied after the verify, between two runs
    backups = TensorBackups()
    loaded = read_checkpoint(LocalStorage(tmp_path / "c"), "", copied=copied_into({"s": live}, None), backups=backups)
    keys = [e.key for e in loaded.manifest.entries]
    assert all(loaded.leaves[keys.index(f"s/{key}")] is live[key] for key in live if key != "t150")
    assert loaded.leaves[keys.index("s/t150")] is not live["t150"]
    assert len(backups) == 299
    assert len(backups._runs) < 10  # many tensors to a backup
    backups.roll_back(None)
    assert bits(live) == bits(originals(300, SMALL))

    safepoint.restore(tmp_path / "c", {"s": live})
    assert bits(live) == bits(saved)
    assert {key: t.data_ptr() for key, t in live.items()} == addresses
    assert torch.equal(view, saved["t150"][:10])


def test_a_run_with_a_tensor_that_moved_puts_the_others_back_and_names_it() -> None:
    first, moved, last = torch.full((4,), 1.0), torch.full((4,), 2.0), torch.full((4,), 3.0)
    backups = TensorBackups()
    backups.keep_run([("first", first), ("moved", moved), ("last", last)])
    for tensor in (first, moved, last):
        tensor.fill_(9.0)
    moved.set_(torch.zeros(4))  # its memory was replaced: the old address must not be written
    error = safepoint.CorruptCheckpointError("the original failure")
    backups.roll_back(error)
    assert torch.equal(first, torch.full((4,), 1.0))
    assert torch.equal(moved, torch.zeros(4))
    assert torch.equal(last, torch.full((4,), 3.0))
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 1
    assert "'moved'" in notes[0]
    assert len(backups) == 0


def test_a_tensor_that_cannot_be_put_back_is_named_and_the_first_error_kept(tmp_path: Path) -> None:
    first, second = torch.full((4,), 1.0), torch.full((4,), 2.0)
    backups = TensorBackups()
    backups.keep("first", first).keep_to(16)
    backups.keep("second", second).keep_to(16)
    first.fill_(9.0)
    second.fill_(9.0)
    second.set_(torch.zeros(4))  # its memory was replaced: the old address must not be written
    error = safepoint.CorruptCheckpointError("the original failure")
    backups.roll_back(error)
    assert torch.equal(first, torch.full((4,), 1.0))  # the others are still put back
    assert torch.equal(second, torch.zeros(4))
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 1
    assert "'second'" in notes[0]
    assert "not verified" in notes[0]
    assert len(backups) == 0


def test_a_tensor_kept_twice_keeps_its_first_backup() -> None:
    live = torch.full((4,), 1.0)
    backups = TensorBackups()
    backups.keep("t", live).keep_to(16)
    live.fill_(5.0)
    backups.keep("t", live).keep_to(16)
    backups.roll_back(RuntimeError("x"))
    assert torch.equal(live, torch.full((4,), 1.0))


def test_an_error_escaping_the_guard_puts_back_and_a_normal_end_forgets() -> None:
    live = torch.full((4,), 1.0)
    with pytest.raises(KeyboardInterrupt), TensorBackups().until_complete() as backups:
        backups.keep("t", live).keep_to(16)
        live.fill_(3.0)
        raise KeyboardInterrupt
    assert torch.equal(live, torch.full((4,), 1.0))
    with TensorBackups().until_complete() as backups:
        backups.keep("t", live).keep_to(16)
        live.fill_(3.0)
    assert len(backups) == 0
    assert torch.equal(live, torch.full((4,), 3.0))


def test_autograd_sees_a_parameter_read_in_place_change(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"p": {"w": torch.ones(NUMEL)}})
    parameter = torch.nn.Parameter(torch.zeros(NUMEL))
    version = parameter._version
    safepoint.restore(tmp_path / "c", {"p": {"w": parameter}})
    assert torch.equal(parameter.detach(), torch.ones(NUMEL))
    assert parameter._version > version  # as after copy_: a graph that saved the old value refuses to backward


def entry(dtype: str = "F32", shape: tuple[int, ...] = (NUMEL,)) -> Any:
    from safepoint._manifest import EntryRecord

    return EntryRecord("k", "tensor", dtype, shape, 0, "k")


def test_only_tensors_no_one_else_sees_are_written_in_place() -> None:
    # (pytest keeps the values of sub-expressions of an assert for its message: the tensors are built first)
    assert direct_target(torch.zeros(NUMEL), entry())
    parameter = torch.nn.Parameter(torch.zeros(NUMEL))
    assert direct_target(parameter, entry())
    viewed = torch.zeros(NUMEL)
    view = viewed[:10]
    assert not direct_target(viewed, entry())  # a view elsewhere would see unverified bytes
    del view
    assert direct_target(viewed, entry())
    module = torch.nn.Linear(NUMEL // 4, 4, bias=False)
    state = module.state_dict()
    assert not direct_target(state["weight"], entry(shape=(4, NUMEL // 4)))  # shares the module's parameter
    assert not direct_target(torch.zeros(NUMEL, dtype=torch.float64), entry())  # a cast
    assert direct_target(torch.zeros(3), entry(shape=(3,)))  # small ones too, in runs
    assert not direct_target(torch.zeros(NUMEL // 2), entry())  # another shape
    assert not direct_target(torch.zeros(2 * NUMEL)[::2], entry())  # not contiguous
    with torch.inference_mode():
        inference = torch.zeros(NUMEL)
    assert not direct_target(inference, entry())

    class Sub(torch.Tensor):
        pass

    assert not direct_target(torch.zeros(NUMEL).as_subclass(Sub), entry())


def test_one_tensor_under_two_keys_is_copied_not_read_in_place(tmp_path: Path) -> None:
    saved = large(2, seed=6)
    safepoint.save(tmp_path / "c", {"x": saved["t0"], "y": saved["t1"]})
    shared = torch.zeros(NUMEL)
    live = {"x": shared, "y": shared}
    backups = TensorBackups()
    loaded = read_checkpoint(LocalStorage(tmp_path / "c"), "", copied=copied_into(live, None), backups=backups)
    assert len(backups) == 0
    assert all(leaf is not shared for leaf in loaded.leaves)
    safepoint.restore(tmp_path / "c", live)
    assert torch.equal(shared, saved["t1"])  # the copies in key order, as before: the last one wins


def test_a_migration_or_a_mapped_read_writes_nothing_in_place(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"big": large(1, seed=7)})
    live = {"big": originals(1)}
    storage = LocalStorage(tmp_path / "c")
    backups = TensorBackups()
    read_checkpoint(storage, "", copied=copied_into(live, 2), backups=backups)  # saved as version 1
    read_checkpoint(storage, "", mmap=True, copied=copied_into(live, None), backups=backups)
    assert len(backups) == 0
    assert bits(live["big"]) == bits(originals(1))


def test_a_tensor_read_in_part_is_put_back_in_that_part_only() -> None:
    """A read that stops inside a tensor wrote only what was kept: that part is put back, the rest left alone."""
    live = torch.arange(8, dtype=torch.int32)
    backups = TensorBackups()
    backups.keep("t", live, ahead=False).keep_to(16)  # the first 4 values (no keeper thread running ahead)
    live[:4] = -1
    live[4:] = 7  # not kept, as a reader never writes a byte it has not kept: must stay as it is now
    backups.roll_back(RuntimeError("x"))
    assert live.tolist() == [0, 1, 2, 3, 7, 7, 7, 7]
