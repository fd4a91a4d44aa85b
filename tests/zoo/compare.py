"""Bitwise comparison of nested values: tensors by their bytes, floats by their bits, containers by type and order.

Used by the tests on two dumps, and by the worker where a comparison must happen in the process that holds the
objects (a Lightning checkpoint dict). It never converts: an ``OrderedDict`` is not a ``dict`` here.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Typed:
    """A value of a type other than the builtins, kept by its type's name (an OrderedDict, a Counter, an enum)."""

    name: str
    value: Any


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes, in logical order (layout-independent)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _tensor_diffs(path: str, a: torch.Tensor, b: torch.Tensor) -> list[str]:
    if a.layout != b.layout:
        return [f"{path}: layout {a.layout} != {b.layout}"]
    if a.is_sparse:
        a, b = a.coalesce(), b.coalesce()
        return _tensor_diffs(f"{path}.indices", a.indices(), b.indices()) + _tensor_diffs(
            f"{path}.values", a.values(), b.values()
        )
    if a.dtype != b.dtype or a.shape != b.shape:
        return [f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
    if not torch.equal(tensor_bytes(a), tensor_bytes(b)):
        if a.is_floating_point():
            worst = (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item() if a.numel() else 0.0
            return [f"{path}: tensors differ (max abs diff {worst:.3e})"]
        return [f"{path}: tensors differ"]
    return []


def type_name(value: Any) -> str:
    return value.name if isinstance(value, Typed) else type(value).__qualname__


def diffs(a: Any, b: Any, path: str = "") -> list[str]:
    """Every difference between ``a`` and ``b``, as ``path: what`` lines; empty when they are bitwise equal."""
    where = path or "<root>"
    if type_name(a) != type_name(b):
        found = [f"{where}: type {type_name(a)} != {type_name(b)}"]
        a, b = unwrap(a), unwrap(b)
        both = (Mapping, Mapping) if isinstance(a, Mapping) else (list, tuple)
        if isinstance(a, both) and isinstance(b, both):  # go on inside: the values may differ too
            return found + _container_diffs(a, b, path)
        return found
    if isinstance(a, Typed):
        return diffs(a.value, b.value, path)
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return [f"{where}: arrays differ ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})"]
        return []
    if isinstance(a, torch.Tensor):
        return _tensor_diffs(where, a, b)
    if isinstance(a, float):
        same = struct.pack("<d", a) == struct.pack("<d", b)
        return [] if same else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, (Mapping, list, tuple)):
        return _container_diffs(a, b, path)
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Typed) else value


def _container_diffs(a: Any, b: Any, path: str) -> list[str]:
    where = path or "<root>"
    if isinstance(a, Mapping):
        if list(a.keys()) != list(b.keys()):
            return [f"{where}: keys {list(a.keys())} != {list(b.keys())}"]
        return [line for key in a for line in diffs(a[key], b[key], f"{path}/{key}")]
    if len(a) != len(b):
        return [f"{where}: length {len(a)} != {len(b)}"]
    return [line for i, (x, y) in enumerate(zip(a, b, strict=True)) for line in diffs(x, y, f"{path}/{i}")]


PRIMITIVES = (type(None), bool, int, float, str, bytes)


def plain(value: Any) -> Any:
    """A picklable, comparable copy: objects as their state_dicts, types other than the builtins kept by name."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if type(value) in PRIMITIVES:
        return value
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, enum.Enum):
        return Typed(type(value).__qualname__, value.value)
    if hasattr(value, "state_dict") and not isinstance(value, Mapping):
        return plain(value.state_dict())
    if isinstance(value, Mapping):
        items = {key: plain(item) for key, item in value.items()}
        return items if type(value) is dict else Typed(type(value).__qualname__, items)
    if isinstance(value, (list, tuple)):
        items_list = [plain(item) for item in value]
        if type(value) in (list, tuple):
            return type(value)(items_list)
        return Typed(type(value).__qualname__, items_list)
    if callable(value):
        return f"<callable {type(value).__qualname__}>"
    return f"<{type(value).__qualname__}>"
