"""Restoring into an optimizer object that holds state already: no copy of that state is made to roll it back.

torch's ``Optimizer.load_state_dict`` replaces the per-parameter state with the tensors it is given and never writes
into those it held, so the tensors it held are their own backup: a failure after the optimizer took its state puts
back those very tensors, with their bits, and the param groups. An optimizer whose load_state_dict or state-dict
hooks could write into the tensors it holds still gets a deep copy first, and is put back exactly too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from tests.unit.test_restore import Fails  # applied after the optimizer (objects apply in the state's order)


class Holds:
    """Takes what it is given (in Fails' place, for a restore that completes)."""

    def state_dict(self) -> dict[str, Any]:
        return {"n": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CopiesIntoItsState(torch.optim.Adam):
    """An optimizer whose load_state_dict copies the saved moments into the tensors it holds (as some do, to keep
    their memory): the tensors it held are then no backup."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        held = [self.state[p] for group in self.param_groups for p in group["params"]]
        saved = [state_dict["state"][i] for group in state_dict["param_groups"] for i in group["params"]]
        for mine, theirs in zip(held, saved, strict=True):
            for name in ("exp_avg", "exp_avg_sq"):
                mine[name].copy_(theirs[name])
        super().load_state_dict(state_dict)


def trained(kind: type[torch.optim.Adam], seed: int, lr: float) -> tuple[torch.nn.Linear, torch.optim.Adam]:
    """A model and an Adam over it after one step, both from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 8)
    optimizer = kind(model.parameters(), lr=lr)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def moments(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    """The optimizer's state tensors themselves (not copies), by parameter index and name."""
    order = [p for group in optimizer.param_groups for p in group["params"]]
    return {(i, name): value for i, p in enumerate(order) for name, value in optimizer.state[p].items()}


def bits(tensors: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], bytes]:
    return {key: tensor.detach().numpy().tobytes() for key, tensor in tensors.items()}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model, optimizer = trained(torch.optim.Adam, seed=1, lr=0.1)
    safepoint.save(tmp_path / "c", {"model": model, "optim": optimizer, "z": Fails()})
    return tmp_path / "c"


def test_a_failure_after_the_optimizer_took_its_state_puts_back_the_tensors_it_held(checkpoint: Path) -> None:
    model, optimizer = trained(torch.optim.Adam, seed=2, lr=0.5)
    held = moments(optimizer)
    before = bits(held)
    with pytest.raises(safepoint.RestoreError, match=r"'z'.*cannot take this"):
        safepoint.restore(checkpoint, {"model": model, "optim": optimizer, "z": Fails()})
    after = moments(optimizer)
    assert sorted(after) == sorted(held)
    # the very tensors it held (a deep copy taken to roll back with would be other tensors), with their bits
    assert [key for key in held if after[key] is not held[key]] == []
    assert bits(after) == before
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_a_clean_restore_gives_the_optimizer_the_saved_state(checkpoint: Path) -> None:
    _, saved = trained(torch.optim.Adam, seed=1, lr=0.1)
    model, optimizer = trained(torch.optim.Adam, seed=2, lr=0.5)
    safepoint.restore(checkpoint, {"model": model, "optim": optimizer, "z": Holds()})
    assert bits(moments(optimizer)) == bits(moments(saved))
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_an_optimizer_that_copies_into_its_state_is_still_put_back_exactly(tmp_path: Path) -> None:
    model, optimizer = trained(CopiesIntoItsState, seed=1, lr=0.1)
    safepoint.save(tmp_path / "c", {"model": model, "optim": optimizer, "z": Fails()})
    model, optimizer = trained(CopiesIntoItsState, seed=2, lr=0.5)
    before = bits(moments(optimizer))
    with pytest.raises(safepoint.RestoreError, match=r"'z'.*cannot take this"):
        safepoint.restore(tmp_path / "c", {"model": model, "optim": optimizer, "z": Fails()})
    assert bits(moments(optimizer)) == before
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_an_optimizer_with_a_load_hook_that_writes_its_state_is_still_put_back_exactly(checkpoint: Path) -> None:
    model, optimizer = trained(torch.optim.Adam, seed=2, lr=0.5)
    before = bits(moments(optimizer))

    def zero_what_it_holds(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        for value in optimizer.state.values():
            value["exp_avg"].zero_()

    optimizer.register_load_state_dict_pre_hook(zero_what_it_holds)
    with pytest.raises(safepoint.RestoreError, match=r"'z'.*cannot take this"):
        safepoint.restore(checkpoint, {"model": model, "optim": optimizer, "z": Fails()})
    assert bits(moments(optimizer)) == before
    assert optimizer.param_groups[0]["lr"] == 0.5
