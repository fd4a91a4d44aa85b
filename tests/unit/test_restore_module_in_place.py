"""A plain module's parameters and buffers are read straight into the module, behind backups.

``{"model": model}`` is how most states hold their weights. Restoring it used to read every value into memory of
its own and copy it into the module in its ``load_state_dict``. Now each parameter (the module's own tensor, from
``state_dict(keep_vars=True)``) whose bytes no other tensor shares is read into in place, and the module's copy
finds the bytes already there. What must hold, as for plain tensors: exact bits after a restore, every byte put
back when the restore fails anywhere before it is complete, and the post-apply check still catching a module
whose ``load_state_dict`` does not keep what it was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint._backup import TensorBackups
from safepoint._payload import DIRECT_BYTES
from safepoint._reader import LoadedCheckpoint, read_checkpoint
from safepoint._restore import copied_into
from safepoint._storage import LocalStorage
from tests.unit.test_restore_in_place import damage, save_in_files

WIDE = DIRECT_BYTES // 4  # float32 values in a row of the size that is read in place alone


class Net(torch.nn.Module):
    """Large and small parameters, a buffer, and an integer buffer (as BatchNorm's counter)."""

    def __init__(self, width: int, fill: float | None = None) -> None:
        super().__init__()
        self.big = torch.nn.Linear(width, 2)
        self.small = torch.nn.Linear(3, 3)
        self.register_buffer("stats", torch.randn(7))
        self.register_buffer("count", torch.tensor(5))
        if fill is not None:  # bits no checkpoint here holds: -0.0 and a NaN with a payload
            with torch.no_grad():
                for tensor in self.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.fill_(fill)
                        tensor.view(-1)[0] = -0.0
                        tensor.view(-1).view(torch.int32)[1] = 0x7FC0_1234


def bits(module: torch.nn.Module) -> dict[str, bytes]:
    state = module.state_dict()
    return {key: value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for key, value in state.items()}


def read_into(checkpoint: Path, live: dict[str, Any]) -> tuple[LoadedCheckpoint, TensorBackups]:
    backups = TensorBackups()
    loaded = read_checkpoint(LocalStorage(checkpoint), "", copied=copied_into(live, None), backups=backups)
    return loaded, backups


def leaf(loaded: LoadedCheckpoint, key: str) -> Any:
    return loaded.leaves[[entry.key for entry in loaded.manifest.entries].index(key)]


@pytest.mark.parametrize("width", [WIDE, 10], ids=["large", "small"])
def test_a_modules_parameters_and_buffers_are_read_into_it(tmp_path: Path, width: int) -> None:
    torch.manual_seed(0)
    saved = Net(width)
    safepoint.save(tmp_path / "c", {"model": saved})
    live = Net(width, fill=7.0)
    own = dict(live.state_dict(keep_vars=True))
    loaded, backups = read_into(tmp_path / "c", {"model": live})
    for key, tensor in own.items():
        assert leaf(loaded, f"model/{key}") is tensor, key  # the module's own tensor, already holding the bytes
    assert len(backups) == len(own)
    backups.roll_back(None)
    assert bits(live) == bits(Net(width, fill=7.0))

    versions = {key: tensor._version for key, tensor in own.items()}
    report = safepoint.restore(tmp_path / "c", {"model": live})
    assert report.restored == ("model",)
    assert bits(live) == bits(saved)
    assert all(tensor is own[key] for key, tensor in live.state_dict(keep_vars=True).items())
    assert all(own[key]._version > version for key, version in versions.items())  # autograd sees the change


@pytest.mark.parametrize("width", [WIDE, 10], ids=["large", "small"])
def test_a_damaged_last_file_leaves_the_module_as_it_was(tmp_path: Path, width: int) -> None:
    torch.manual_seed(1)
    files = save_in_files(tmp_path / "c", {"model": Net(width)}, file_bytes=1)  # a file per value
    damage(files[-1])
    live = Net(width, fill=3.0)
    before = bits(live)
    with pytest.raises(safepoint.CorruptCheckpointError, match="does not match its checksum"):
        safepoint.restore(tmp_path / "c", {"model": live})
    assert bits(live) == before


def test_a_mismatch_elsewhere_leaves_the_module_as_it_was(tmp_path: Path) -> None:
    torch.manual_seed(2)
    safepoint.save(tmp_path / "c", {"model": Net(WIDE), "b": {"x": torch.ones(3)}})
    live = Net(WIDE, fill=3.0)
    before = bits(live)
    with pytest.raises(safepoint.RestoreError, match="b/x"):
        safepoint.restore(tmp_path / "c", {"model": live, "b": {"x": torch.ones(4)}})
    assert bits(live) == before


class Resetting(Net):
    """A module whose load_state_dict loads, then re-initialises its weights: it does not keep what it was given."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        with torch.no_grad():
            self.big.weight.fill_(1.0)
        return result


def test_a_module_that_drops_the_values_read_into_it_is_caught_and_put_back(tmp_path: Path) -> None:
    torch.manual_seed(3)
    safepoint.save(tmp_path / "c", {"model": Net(WIDE)})
    live = Resetting(WIDE, fill=3.0)
    before = bits(live)
    with pytest.raises(safepoint.RestoreError, match=r"model/big\.weight: differs from the checkpoint"):
        safepoint.restore(tmp_path / "c", {"model": live})
    assert bits(live) == before


class Keeping(torch.nn.Module):
    """A module whose load_state_dict keeps the tensors it is given, as ``assign=True`` does."""

    def __init__(self) -> None:
        super().__init__()
        # not contiguous: never read into in place; small and next to each other in the file
        self.weight = torch.nn.Parameter(torch.randn(4, 3).t())
        self.scale = torch.nn.Parameter(torch.randn(5, 3).t())
        self.bias = torch.nn.Parameter(torch.randn(4))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return super().load_state_dict(state_dict, strict=strict, assign=True)


def test_values_a_module_may_keep_own_their_memory(tmp_path: Path) -> None:
    torch.manual_seed(4)
    saved = Keeping()
    safepoint.save(tmp_path / "c", {"model": saved})
    live = Keeping()
    loaded, backups = read_into(tmp_path / "c", {"model": live})
    assert leaf(loaded, "model/bias") is live.bias
    for key in ("weight", "scale"):
        value = leaf(loaded, f"model/{key}")
        assert value is not getattr(live, key)
        # small values next to each other in a file share one buffer only where copy_ is all that receives them
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    backups.roll_back(None)
    safepoint.restore(tmp_path / "c", {"model": live})
    for key in ("weight", "scale", "bias"):
        assert torch.equal(getattr(live, key), getattr(saved, key)), key


def test_tied_and_shared_parameters_are_copied_and_end_right(tmp_path: Path) -> None:
    torch.manual_seed(5)
    saved = torch.nn.Sequential(torch.nn.Embedding(WIDE // 8, 8), torch.nn.Linear(8, WIDE // 8, bias=False))
    saved[1].weight = saved[0].weight  # tied: one parameter under two keys
    safepoint.save(tmp_path / "c", {"model": saved, "head": torch.nn.Linear(2, 2)})
    live = torch.nn.Sequential(torch.nn.Embedding(WIDE // 8, 8), torch.nn.Linear(8, WIDE // 8, bias=False))
    live[1].weight = live[0].weight
    head = torch.nn.Linear(2, 2)
    alias = head.weight.detach()  # another tensor sees the head's weight: it is not the sole user of its memory
    loaded, backups = read_into(tmp_path / "c", {"model": live, "head": head})
    assert leaf(loaded, "model/0.weight") is not live[0].weight
    assert leaf(loaded, "head/weight") is not head.weight
    assert leaf(loaded, "head/bias") is head.bias
    backups.roll_back(None)
    safepoint.restore(tmp_path / "c", {"model": live, "head": head})
    assert live[1].weight is live[0].weight
    assert torch.equal(live[0].weight, saved[0].weight)
    assert torch.equal(alias, head.weight)


def test_a_model_and_its_optimizer_resume_to_the_same_bits(tmp_path: Path) -> None:
    """Training continues exactly as the run that never stopped: the parameters the optimizer holds are the
    ones read into, and the next steps give the same bits as the uninterrupted run's."""

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        batch = torch.randn(4, WIDE, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()

    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(WIDE, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for seed in range(2):
        step(model, optimizer, seed)
    safepoint.save(tmp_path / "c", {"model": model, "optimizer": optimizer})
    for seed in range(2, 4):
        step(model, optimizer, seed)

    torch.manual_seed(7)
    resumed = torch.nn.Sequential(torch.nn.Linear(WIDE, 4), torch.nn.Linear(4, 2))
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    step(resumed, resumed_optimizer, 99)  # state of its own, to be replaced
    safepoint.restore(tmp_path / "c", {"model": resumed, "optimizer": resumed_optimizer})
    for seed in range(2, 4):
        step(resumed, resumed_optimizer, seed)
    assert bits(resumed) == bits(model)
