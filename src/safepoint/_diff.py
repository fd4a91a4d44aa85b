"""Comparing two read checkpoints, or two plain states, value by value: what was added, removed or changed.

This is the one comparison engine: ``safepoint diff`` compares two checkpoints (:func:`diff_checkpoints`), and
``safepoint migrate --dry-run`` a state before and after its migrations (:func:`diff_trees`).

Tensors and arrays are compared bitwise (their bit patterns, so ``-0.0`` differs from ``0.0`` and a NaN equals
the same NaN); for floating ones a change also gives the largest absolute difference. Pickled entries are
compared by their bytes and never unpickled. Floats in the tree compare by their exact ``repr``.

Checkpoints are :class:`~safepoint._reader.LoadedCheckpoint`: read through the verified read path, so nothing
unverified is ever compared. Nothing here reads storage or writes anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ._codec import PickledPayload, decode_tree, key_path
from ._manifest import Manifest
from ._reader import LoadedCheckpoint

__all__ = ["CheckpointDiff", "Difference", "describe_value", "diff_checkpoints", "diff_trees", "tree_objects"]

KeyPath = tuple[str | int, ...]

#: Elements compared at once: bounds the temporary memory of a comparison whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 22
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_VALUE_CHARS = 80


@dataclass(frozen=True)
class Difference:
    key: str  # the key path ("optimizer/state/0/exp_avg"); metrics are named by the metric
    kind: Literal["added", "removed", "changed"]
    before: str  # A's value, described ("" when added)
    after: str  # B's value, described ("" when removed)
    detail: str = ""  # how two tensors differ: "3 of 12 elements differ, max |a-b| = 0.5"


@dataclass(frozen=True)
class CheckpointDiff:
    entries: tuple[Difference, ...]  # the values of the state, in key order
    metrics: tuple[Difference, ...]
    state_version: Difference | None  # the user state's version is part of what the values mean
    compared: int  # values compared (tensors, arrays, scalars, empty containers) present in both

    @property
    def identical(self) -> bool:
        return not self.entries and not self.metrics and self.state_version is None


def diff_checkpoints(a: LoadedCheckpoint, b: LoadedCheckpoint) -> CheckpointDiff:
    """How ``b`` differs from ``a``."""
    # decode_tree keeps pickled entries as PickledPayload (bytes, never unpickled) and rebuilds every other kind
    plain_a = decode_tree(a.manifest.tree, a.leaves)
    plain_b = decode_tree(b.manifest.tree, b.leaves)
    entries, compared = diff_trees(plain_a, plain_b, tree_objects(a.manifest), tree_objects(b.manifest))
    version = None
    if a.manifest.state_version != b.manifest.state_version:
        version = Difference("state_version", "changed", str(a.manifest.state_version), str(b.manifest.state_version))
    return CheckpointDiff(entries, _metric_differences(a.manifest, b.manifest), version, compared)


def diff_trees(a: Any, b: Any, objects_a: Mapping[KeyPath, str] | None = None,
               objects_b: Mapping[KeyPath, str] | None = None) -> tuple[tuple[Difference, ...], int]:  # fmt: skip
    """How the plain tree ``b`` differs from ``a``, in key order, and how many values both hold.

    The trees are nested dicts, lists and tuples of values, as :func:`~safepoint._codec.decode_tree` gives them
    (``safepoint migrate --dry-run`` compares a state before and after its migrations). ``objects_a`` and
    ``objects_b`` name the class of each entry saved through ``state_dict()`` (:func:`tree_objects`), so that a
    module swapped for another class shows even when the two state_dicts are alike."""
    values_a, shape_a = _flatten(a)
    values_b, shape_b = _flatten(b)
    types_a, types_b = objects_a or {}, objects_b or {}
    differences: list[tuple[KeyPath, Difference]] = []
    reported: set[KeyPath] = set()
    replaced: list[KeyPath] = []  # a container on one side, a value on the other: its insides are not listed
    for path in sorted(shape_a.keys() & shape_b.keys(), key=_sort_key):
        kind_a, kind_b = shape_a[path], shape_b[path]
        if _under(path, replaced) or (kind_a == kind_b and types_a.get(path) == types_b.get(path)):
            continue
        before = _node_label(kind_a, types_a.get(path), values_a.get(path))
        after = _node_label(kind_b, types_b.get(path), values_b.get(path))
        differences.append((path, Difference(key_path(path), "changed", before, after)))
        reported.add(path)
        if "value" in (kind_a, kind_b):
            replaced.append(path)
    compared = 0
    for path in sorted(values_a.keys() | values_b.keys(), key=_sort_key):
        if path in reported or _under(path, replaced):
            continue
        key = key_path(path)
        if _filled(path, values_a, values_b, shape_a, shape_b):
            continue  # {} on one side, the same container with items on the other: the items are the news
        if path not in values_b:
            differences.append((path, Difference(key, "removed", describe_value(values_a[path]), "")))
        elif path not in values_a:
            differences.append((path, Difference(key, "added", "", describe_value(values_b[path]))))
        else:
            compared += 1
            change = compare_values(values_a[path], values_b[path])
            if change is not None:
                before, after = describe_value(values_a[path]), describe_value(values_b[path])
                differences.append((path, Difference(key, "changed", before, after, change)))
    differences.sort(key=lambda item: _sort_key(item[0]))
    return tuple(difference for _, difference in differences), compared


def _filled(path: KeyPath, values_a: dict[KeyPath, Any], values_b: dict[KeyPath, Any], shape_a: dict[KeyPath, str],
            shape_b: dict[KeyPath, str]) -> bool:  # fmt: skip
    """Whether ``path`` is an empty container on one side only, with the same kind of container on the other."""
    if (path in values_a) == (path in values_b):
        return False
    return shape_a.get(path) == shape_b.get(path) != "value"


def _under(path: KeyPath, prefixes: list[KeyPath]) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def _sort_key(path: KeyPath) -> tuple[tuple[int, str], ...]:
    # int and str keys may sit side by side in one dict: compare them as (kind, text), ints by value
    return tuple((0, f"{p:020d}") if isinstance(p, int) and p >= 0 else (1, str(p)) for p in path)


def _node_label(kind: str, object_type: str | None, value: Any) -> str:
    if kind == "value":
        return describe_value(value)
    return f"{kind} (state_dict of {object_type})" if object_type else kind


# -- flattening ------------------------------------------------------------------------------------------------
def _flatten(plain: Any) -> tuple[dict[KeyPath, Any], dict[KeyPath, str]]:
    """(key path -> value) for every value, and (key path -> container type name, or "value") for every node."""
    values: dict[KeyPath, Any] = {}
    shape: dict[KeyPath, str] = {}
    for path, value in _walk(plain, ()):
        is_container = isinstance(value, (Mapping, list, tuple))
        if path:
            shape[path] = type(value).__name__ if is_container else "value"
        if not is_container or (not value and path):
            values[path] = value  # an empty container is a value: {} and [] must not vanish from the diff
    return values, shape


def _walk(value: Any, path: KeyPath) -> Iterator[tuple[KeyPath, Any]]:
    yield path, value
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, (*path, index))


def tree_objects(manifest: Manifest) -> dict[KeyPath, str]:
    """The key paths of the entries that were saved through ``state_dict()``, with their recorded class."""
    found: dict[KeyPath, str] = {}
    stack: list[tuple[KeyPath, Mapping[str, Any]]] = [((), manifest.tree)]
    while stack:
        path, node = stack.pop()
        if node.get("k") == "object" and isinstance(node.get("type"), str):
            found[path] = node["type"]
        for child_path, child in tree_children(path, node):
            stack.append((child_path, child))
    return found


def tree_children(path: KeyPath, node: Mapping[str, Any]) -> list[tuple[KeyPath, Mapping[str, Any]]]:
    """The child nodes of a manifest tree node with their key paths. Unknown container kinds (a newer format's)
    are walked by shape: ``[[key, node], ...]`` like a dict, ``[node, ...]`` like a list, ``node`` like an object."""
    payload = node.get("v")
    if isinstance(payload, Mapping) and "k" in payload:
        return [(path, payload)]  # an object: its state_dict sits at the same key path
    if not isinstance(payload, list) or node.get("k") in ("int", "bool", "str", "float", "bytes"):
        return []
    if node.get("k") in ("list", "tuple"):
        return [((*path, i), item) for i, item in enumerate(payload) if isinstance(item, Mapping)]
    pairs = all(isinstance(item, list) and len(item) == 2 and isinstance(item[1], Mapping) for item in payload)
    if pairs:
        return [((*path, item[0]), item[1]) for item in payload]
    return [((*path, i), item) for i, item in enumerate(payload) if isinstance(item, Mapping)]


# -- comparing -------------------------------------------------------------------------------------------------
def compare_values(a: Any, b: Any) -> str | None:
    """None when ``a`` and ``b`` are the same (bitwise for tensors and arrays), else how they differ: a detail for
    tensors, "" where the two values' descriptions say it all."""
    if isinstance(a, PickledPayload) or isinstance(b, PickledPayload):
        if isinstance(a, PickledPayload) and isinstance(b, PickledPayload):
            return None if a.data == b.data else "pickled bytes differ"
        return ""
    tensor_a, tensor_b = _as_tensor(a), _as_tensor(b)
    if tensor_a is not None or tensor_b is not None:
        if tensor_a is None or tensor_b is None or isinstance(a, np.ndarray) != isinstance(b, np.ndarray):
            return ""
        return compare_tensors(tensor_a, tensor_b)
    if type(a) is not type(b):
        return ""  # the two descriptions name the types
    if isinstance(a, float):
        return None if repr(a) == repr(b) else ""
    return None if a == b else ""


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None when the two are bitwise the same, else how they differ, chunk by chunk (bounded memory)."""
    if a.dtype != b.dtype:
        return f"dtype {_dtype(a)} -> {_dtype(b)}"
    if a.shape != b.shape:
        return f"shape {_shape(a)} -> {_shape(b)}"
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    numeric = a.is_floating_point() or a.is_complex()
    differing = 0
    nan_mismatch = 0
    largest = 0.0
    for start in range(0, flat_a.numel(), _CHUNK_ELEMENTS):
        chunk_a = flat_a[start : start + _CHUNK_ELEMENTS]
        chunk_b = flat_b[start : start + _CHUNK_ELEMENTS]
        if torch.equal(_raw(chunk_a), _raw(chunk_b)):
            continue  # the usual case, at memcmp speed
        unequal = _bits_differ(chunk_a, chunk_b)
        count = int(unequal.sum())
        differing += count
        if numeric:
            gap = (chunk_a[unequal].to(torch.complex128 if a.is_complex() else torch.float64)
                   - chunk_b[unequal].to(torch.complex128 if a.is_complex() else torch.float64)).abs()  # fmt: skip
            nans = torch.isnan(gap)
            nan_mismatch += int(nans.sum())
            finite = gap[~nans]
            if finite.numel():
                largest = max(largest, float(finite.max()))
    if not differing:
        return None
    detail = f"{differing} of {flat_a.numel()} element(s) differ"
    if numeric:
        if differing > nan_mismatch:
            detail += f", max |a-b| = {largest:.6g}" if not math.isinf(largest) else ", max |a-b| = inf"
        if nan_mismatch:
            detail += f", {nan_mismatch} where one side is NaN"
    return detail


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, as uint8: equal exactly when the bit patterns are."""
    return tensor.contiguous().view(torch.uint8)


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Which elements differ in their bit pattern."""
    size = a.element_size()
    if a.dtype == torch.bool:
        return a != b
    if size in _INT_OF_SIZE:
        return a.contiguous().view(_INT_OF_SIZE[size]) != b.contiguous().view(_INT_OF_SIZE[size])
    bytes_a = a.contiguous().view(torch.uint8).reshape(-1, size)
    bytes_b = b.contiguous().view(torch.uint8).reshape(-1, size)
    return (bytes_a != bytes_b).any(dim=1)


# -- describing ------------------------------------------------------------------------------------------------
def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def describe_value(value: Any) -> str:
    """A one-line description of a value: its kind and, for scalars, the value (long ones truncated)."""
    if isinstance(value, PickledPayload):
        return f"pickle ({len(value.data)} bytes)"
    if isinstance(value, torch.Tensor):
        return f"tensor {_dtype(value)} {_shape(value)}"
    if isinstance(value, (np.ndarray, np.generic)):
        return f"ndarray {value.dtype} [{', '.join(map(str, np.shape(value)))}]"
    return f"{type(value).__name__} {truncate(repr(value))}"


def truncate(text: str, limit: int = _VALUE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text)} chars)"


def _metric_differences(a: Manifest, b: Manifest) -> tuple[Difference, ...]:
    found = []
    for name in sorted(a.metrics.keys() | b.metrics.keys()):
        if name not in b.metrics:
            found.append(Difference(name, "removed", f"{a.metrics[name]:.6g}", ""))
        elif name not in a.metrics:
            found.append(Difference(name, "added", "", f"{b.metrics[name]:.6g}"))
        elif repr(a.metrics[name]) != repr(b.metrics[name]):
            found.append(Difference(name, "changed", f"{a.metrics[name]:.6g}", f"{b.metrics[name]:.6g}"))
    return tuple(found)
