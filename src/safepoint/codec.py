"""Turning live training state into a JSON tree plus tensor leaves, and plain loaded data back into values.

The tree is what the manifest stores: every dict, list, tuple and scalar, with dict keys kept as ``str`` or
``int`` (so optimizer state_dicts with integer keys round-trip exactly). Tensors, numpy arrays and explicitly
pickled objects become *leaves*: the tree names them by index and the payload files hold their bytes.

Objects with ``state_dict()``/``load_state_dict()`` are stored as their state_dict; the class name is recorded
for people reading the checkpoint and is never imported. Pickle is written only for values wrapped in
:class:`Pickled`, and read only where the caller opts in for that entry.

Node shapes (``k`` is the kind)::

    {"k": "dict", "v": [[key, node], ...]}   {"k": "list", "v": [...]}   {"k": "tuple", "v": [...]}
    {"k": "object", "type": "torch.optim.adamw.AdamW", "v": node}
    {"k": "tensor" | "ndarray" | "pickle", "e": leaf index}
    {"k": "int" | "bool" | "str", "v": ...}   {"k": "float", "v": 1.5 | "nan" | "inf" | "-inf"}
    {"k": "bytes", "v": base64}   {"k": "none"}
"""

from __future__ import annotations

import base64
import math
import pickle
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from .distributed import PerRank
from .errors import InvalidStateError

__all__ = [
    "DTYPES",
    "MAX_INT_BITS",
    "MAX_TREE_DEPTH",
    "Encoded",
    "Leaf",
    "Pickled",
    "PickledPayload",
    "Stateful",
    "decode_tree",
    "encode_state",
    "float_to_json",
    "is_stateful",
    "key_path",
    "pickle_allowed",
]

#: torch dtype <-> the safetensors dtype string persisted in files and manifests. Never remove an entry.
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
DTYPE_NAMES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPES.items()}

#: Nesting deeper than this is refused on save and on load (a corrupt or hostile manifest cannot recurse forever).
MAX_TREE_DEPTH = 200
#: Python ints are stored in the JSON tree in decimal. Larger ones are refused on save: 2**2048 has 617 digits,
#: under the 640-digit floor of ``sys.set_int_max_str_digits``, so every interpreter can write and read them back.
MAX_INT_BITS = 2048

LeafKind = Literal["tensor", "ndarray", "pickle"]


@runtime_checkable
class Stateful(Protocol):
    """Anything checkpointed through its state_dict: modules, optimizers, LR schedulers, RNGState, ..."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def is_stateful(value: object) -> bool:
    return not isinstance(value, (Mapping, type)) and isinstance(value, Stateful)


class Pickled:
    """Opt one entry into pickle. Loading it needs the same opt-in: restore into a ``Pickled`` in the live
    state, or name its key in ``allow_pickle``. Never use it for data from people you do not trust."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Pickled({self.value!r})"


@dataclass(frozen=True)
class Leaf:
    key: str
    kind: LeafKind
    tensor: torch.Tensor  # on any device; ndarray and pickle leaves are CPU tensors viewing their bytes
    scalar: bool = False  # an ndarray leaf that was a numpy scalar


@dataclass(frozen=True)
class Encoded:
    tree: dict[str, Any]
    leaves: list[Leaf]


def key_path(parts: Sequence[str | int]) -> str:
    return "/".join(str(p) for p in parts)


def encode_state(state: Mapping[str, Any]) -> Encoded:
    """Encode ``state`` into a JSON tree and its leaves, or raise InvalidStateError naming the bad key."""
    if not isinstance(state, Mapping):
        raise InvalidStateError(f"the state must be a dict of named entries, not {type(state).__name__}")
    leaves: list[Leaf] = []
    tree = _Encoder(leaves).node(state, [], set(), 0)
    return Encoded(tree, leaves)


class _Encoder:
    def __init__(self, leaves: list[Leaf]) -> None:
        self.leaves = leaves

    def leaf(self, kind: LeafKind, tensor: torch.Tensor, path: list[str | int], scalar: bool = False) -> int:
        self.leaves.append(Leaf(key_path(path), kind, tensor, scalar))
        return len(self.leaves) - 1

    def node(self, value: Any, path: list[str | int], active: set[int], depth: int) -> dict[str, Any]:
        # depth counts tree nodes, as the manifest parser does (an object node adds a level but no key)
        if depth > MAX_TREE_DEPTH:
            raise _invalid(f"state nested deeper than {MAX_TREE_DEPTH} levels", path)
        # order matters: bool before int, numpy scalars before float, Pickled and tensors before Stateful
        if value is None:
            return {"k": "none"}
        if isinstance(value, bool):
            return {"k": "bool", "v": value}
        if isinstance(value, np.generic):
            return self.array(np.asarray(value), path, scalar=True)
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise _invalid(f"ints beyond {MAX_INT_BITS} bits cannot be checkpointed; store it as a str", path)
            return {"k": "int", "v": int(value)}
        if isinstance(value, float):
            return {"k": "float", "v": float_to_json(float(value))}
        if isinstance(value, str):
            return {"k": "str", "v": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"k": "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.Tensor):
            return {"k": "tensor", "e": self.leaf("tensor", _check_tensor(value, path), path)}
        if isinstance(value, np.ndarray):
            return self.array(value, path, scalar=False)
        if isinstance(value, Pickled):
            try:
                data = pickle.dumps(value.value, protocol=5)
            except Exception as err:  # PicklingError, or whatever the object's own __reduce__ raises
                raise _invalid(f"cannot pickle {type(value.value).__name__}: {err}", path) from err
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return {"k": "pickle", "e": self.leaf("pickle", payload, path)}
        return self.container(value, path, active, depth)

    def container(self, value: Any, path: list[str | int], active: set[int], depth: int) -> dict[str, Any]:
        if id(value) in active:
            raise _invalid("the state contains a reference cycle", path)
        active.add(id(value))
        try:
            if isinstance(value, Mapping):
                items = []
                for k, v in value.items():
                    if isinstance(k, bool) or not isinstance(k, (str, int)):
                        raise _invalid(f"dict keys must be str or int, not {type(k).__name__} ({k!r:.80})", path)
                    items.append([k, self.node(v, [*path, k], active, depth + 1)])
                return {"k": "dict", "v": items}
            if isinstance(value, (list, tuple)):
                kind = "tuple" if isinstance(value, tuple) else "list"
                return {"k": kind, "v": [self.node(v, [*path, i], active, depth + 1) for i, v in enumerate(value)]}
            if is_stateful(value):
                cls = type(value)
                return {
                    "k": "object",
                    "type": f"{cls.__module__}.{cls.__qualname__}",
                    "v": self.node(value.state_dict(), path, active, depth + 1),
                }
        finally:
            active.discard(id(value))
        if isinstance(value, PerRank):
            raise _invalid("safepoint.PerRank marks top-level entries of the state only; move it to the top", path)
        raise _invalid(
            f"cannot checkpoint a value of type {type(value).__module__}.{type(value).__qualname__}; "
            "use tensors, arrays, numbers, strings, containers or objects with state_dict(), "
            "or wrap it in safepoint.Pickled to opt into pickle",
            path,
        )

    def array(self, value: np.ndarray[Any, Any], path: list[str | int], *, scalar: bool) -> dict[str, Any]:
        if value.dtype.hasobject or value.dtype.kind not in "biufc":
            raise _invalid(f"numpy dtype {value.dtype} cannot be checkpointed", path)
        # ascontiguousarray returns at least one dimension: the reshape keeps 0-d arrays and numpy scalars 0-d
        native = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False)).reshape(value.shape)
        try:
            with warnings.catch_warnings():
                # a read-only array (np.frombuffer, a read-only memmap) is only ever read through this tensor
                warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
                tensor = torch.from_numpy(native)
        except TypeError as err:
            raise _invalid(f"numpy dtype {value.dtype} cannot be checkpointed", path) from err
        _check_tensor(tensor, path)
        return {"k": "ndarray", "e": self.leaf("ndarray", tensor, path, scalar)}


def _check_tensor(tensor: torch.Tensor, path: list[str | int]) -> torch.Tensor:
    if tensor.layout != torch.strided:
        raise _invalid(f"{tensor.layout} tensors cannot be checkpointed; densify them first", path)
    if tensor.device.type == "meta":
        raise _invalid("a meta tensor has no data to checkpoint", path)
    if tensor.dtype not in DTYPES:
        raise _invalid(f"tensors of dtype {tensor.dtype} cannot be checkpointed", path)
    return tensor.detach()


def _invalid(message: str, path: list[str | int]) -> InvalidStateError:
    """The error names the key path in its message too: a traceback shows the message, not ``.key``."""
    where = key_path(path)
    return InvalidStateError(f"state entry {where[:300]!r}: {message}" if path else message, key=where)


def float_to_json(value: float) -> float | str:
    """JSON has no NaN or infinities: they are persisted as the strings 'nan', 'inf' and '-inf'."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class PickledPayload:
    """The raw bytes of a pickled entry, loaded but not unpickled. Unpickling needs an explicit opt-in."""

    def __init__(self, data: bytes, key: str) -> None:
        self.data = data
        self.key = key

    def unpickle(self) -> Any:
        return pickle.loads(self.data)


def decode_tree(tree: Mapping[str, Any], leaves: Sequence[Any]) -> Any:
    """Build plain values from a validated tree; ``leaves[i]`` is the loaded value of leaf ``i``."""
    return _decode(tree, leaves)


def _decode(node: Mapping[str, Any], leaves: Sequence[Any]) -> Any:
    kind = node["k"]
    if kind == "dict":
        return {k: _decode(v, leaves) for k, v in node["v"]}
    if kind in ("list", "tuple"):
        items = [_decode(v, leaves) for v in node["v"]]
        return tuple(items) if kind == "tuple" else items
    if kind == "object":
        return _decode(node["v"], leaves)
    if kind in ("tensor", "ndarray", "pickle"):
        return leaves[node["e"]]
    if kind == "none":
        return None
    if kind == "float":
        value = node["v"]
        return _SPECIAL_FLOATS[value] if isinstance(value, str) else float(value)
    if kind == "bytes":
        return base64.b64decode(node["v"])
    return node["v"]


def pickle_allowed(key: str, allow: Iterable[str] | bool) -> bool:
    """Whether ``allow`` (True, or key paths) opts the entry at ``key`` into unpickling."""
    if isinstance(allow, bool):
        return allow
    return any(key == k or key.startswith(k + "/") for k in allow)
