"""Shared fixtures. Nothing here is imported by the package."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

import safepoint


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SAFEPOINT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SAFEPOINT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def open_files() -> list[str]:
    """What each descriptor this process holds open points at (``/proc/self/fd``, Linux): paths, ``memfd:...``,
    ``pipe:[...]``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the descriptor listdir itself used, closed by now
    return found


def make_state(seed: int = 0, hidden: int = 8) -> dict[str, Any]:
    """A small training state: model with dropout, AdamW with state, a scheduler, RNG, progress."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": safepoint.RNGState(),
        "progress": {"epoch": 3, "batch": 120, "losses": [0.5, 0.25]},
    }


def fresh_state(hidden: int = 8) -> dict[str, Any]:
    """The same structure as make_state, with different values (as at the start of a resumed run)."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": safepoint.RNGState(),
        "progress": {"epoch": 0, "batch": 0, "losses": []},
    }


def flatten_tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested value, by key path."""
    found: dict[str, torch.Tensor] = {}

    def walk(path: str, node: Any) -> None:
        if isinstance(node, torch.Tensor):
            found[path] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{path}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{path}/{i}", v)

    walk(prefix, value)
    return found


def tensors_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a state's model and optimizer, cloned, by key: for before/after comparisons."""
    found: dict[str, torch.Tensor] = {}
    for name in ("model", "optimizer"):
        found.update(flatten_tensors(state[name].state_dict(), name))
    return {key: tensor.detach().clone() for key, tensor in found.items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def state_factory() -> Callable[..., dict[str, Any]]:
    return make_state
