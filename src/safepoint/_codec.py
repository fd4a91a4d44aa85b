"""Turning live training state into a JSON tree plus tensor leaves, and plain loaded data back into values.

A value either comes back from ``load`` exactly (same type, same value) or is refused at save with an
InvalidStateError naming its key path, its type and what to do instead. Nothing is converted silently.

The tree is what the manifest stores: every dict, list, tuple and scalar, with dict keys kept as ``str`` or
``int`` (so optimizer state_dicts with integer keys round-trip exactly). Tensors, numpy arrays and explicitly
pickled objects become *leaves*: the tree names them by index and the payload files hold their bytes.

A few more types come back exactly through a fixed table, :data:`TYPED`: ``OrderedDict``, ``Counter``,
``defaultdict`` with one of a few factories, ``set``/``frozenset`` of scalars, ``bytearray``, ``complex``,
``argparse.Namespace``, ``types.SimpleNamespace``, ``pathlib`` paths, ``torch.Size``, ``torch.dtype``,
``torch.device`` and Lightning's ``AttributeDict``. A checkpoint only ever *selects* an entry of that table by
name: it never names a module to import or code to run. Lightning's classes are the one import, of a module
fixed in the table, and only when a checkpoint holds one (Lightning owns ``AttributeDict``; a copy here would
be a different type). Types are matched exactly (``type(x) is ...``): a subclass of ``dict``, ``int`` or
``tuple`` would come back as its base type, so it is refused.

Refused, with what to do (see ``_refusal``):

- enum members (``IntEnum`` included): rebuilding one means importing its class, a module the checkpoint would
  name. Store ``.value`` or ``.name``.
- dataclass instances and namedtuples: the same; a namedtuple would load as a plain tuple. Store
  ``dataclasses.asdict(x)`` / ``x._asdict()``, or wrap in :class:`Pickled`.
- tensors other than plain dense ones (a ``DTensor`` is saved as a ``sharded`` node, see below): ``FakeTensor``,
  ``FunctionalTensor``, any other ``torch.Tensor`` subclass, nested, quantized, sparse and meta tensors.
  Only plain dense tensors may be read by address.
- an object with ``state_dict()`` nested inside a container whose state_dict is empty (a loss module in
  Lightning's ``hyper_parameters``): it would load as ``{}`` and nothing could rebuild it.

Objects with ``state_dict()``/``load_state_dict()`` are stored as their state_dict; the class name is recorded
for people reading the checkpoint and is never imported. Pickle is written only for values wrapped in
:class:`Pickled`, and read only where the caller opts in for that entry.

Tensors that share storage (tied weights) are written once: their storage's covering span becomes one 1-D
entry and each tensor a ``view`` node that :func:`decode_tree` rebuilds with ``as_strided``, so they share
storage again after a load (format version 2).

Node shapes (``k`` is the kind)::

    {"k": "dict", "v": [[key, node], ...]}   {"k": "list", "v": [...]}   {"k": "tuple", "v": [...]}
    {"k": "object", "type": "torch.optim.adamw.AdamW", "v": node}
    {"k": "tensor" | "ndarray" | "pickle", "e": leaf index}
    {"k": "int" | "bool" | "str", "v": ...}   {"k": "float", "v": 1.5 | "nan" | "inf" | "-inf"}
    {"k": "bytes", "v": base64}   {"k": "none"}
    format 2:
    {"k": "view", "e": leaf index, "offset": 0, "shape": [...], "stride": [...]}   (offset and strides in elements)
    {"k": "typed", "t": "collections.OrderedDict", "v": node}   (t is a name in TYPED, v its inner node kind)
    format 3:
    {"k": "sharded", "dtype": "F32", "shape": [13, 4], "boxes": [box, ...]}   (a DTensor: its global dtype and
        shape, and the boxes that cover it exactly once, each {"offsets", "sizes", "e", "at", "chunk", "sums"}:
        see safepoint._sharded. The encoder leaves "boxes" empty; the save pipeline fills them in from every
        rank's writes, and the tensor is not one of the encoding's leaves but one of its ``sharded`` slots.)
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import enum
import importlib
import json
import math
import pathlib
import pickle
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from ._distributed import PerRank
from ._errors import InvalidStateError, SafepointError
from ._sharded import is_dtensor

__all__ = [
    "DTYPES",
    "MAX_INT_BITS",
    "MAX_TREE_DEPTH",
    "REPLACED_WHOLE",
    "SCALAR_KINDS",
    "TYPED",
    "Encoded",
    "Leaf",
    "LeafOrigin",
    "Pickled",
    "PickledPayload",
    "ShardedSlot",
    "Stateful",
    "TypedKind",
    "array_tensor",
    "assemble",
    "check_is_state",
    "decode_tree",
    "encode_state",
    "encode_traced",
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
#: Node kinds holding one scalar (the only kinds a set may hold).
SCALAR_KINDS = frozenset({"none", "bool", "int", "float", "str", "bytes"})

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


class Leaf(NamedTuple):  # a NamedTuple: one per tensor, built ~5x faster than a frozen dataclass
    key: str
    kind: LeafKind
    tensor: torch.Tensor  # on any device; ndarray and pickle leaves are CPU tensors viewing their bytes
    scalar: bool = False  # an ndarray leaf that was a numpy scalar


class ShardedSlot(NamedTuple):
    """A DTensor of the state: its key path and the DTensor (its sharded node is the ``index``-th in tree order)."""

    key: str
    tensor: Any  # a torch.distributed.tensor.DTensor


@dataclass(frozen=True)
class Encoded:
    tree: dict[str, Any]
    leaves: list[Leaf]
    #: the DTensors of the state, in tree order (each a "sharded" node of the tree, not a leaf)
    sharded: Sequence[ShardedSlot] = ()
    #: the structure this encoding came from (see safepoint._structure): plans of the same structure are reused
    structure: Any = dataclasses.field(default=None, compare=False, repr=False)
    #: each leaf's (dtype, shape), where the structure already knows them (None: read them from the leaves)
    specs: Sequence[tuple[torch.dtype, torch.Size]] | None = dataclasses.field(default=None, compare=False, repr=False)
    #: each leaf's data_ptr(), read at this save, where every leaf is a dense host-or-device tensor whose bytes are
    #: that span (no conj/neg bit, contiguous): the copy needs no second read (None: read them at the copy)
    pointers: Sequence[int] | None = dataclasses.field(default=None, compare=False, repr=False)


def check_is_state(state: object) -> None:
    """InvalidStateError unless ``state`` is a mapping of named entries (what every save takes)."""
    if not isinstance(state, Mapping):
        raise InvalidStateError(f"the state must be a dict of named entries, not {type(state).__name__}")


def key_path(parts: Sequence[str | int]) -> str:
    return "/".join(str(p) for p in parts)


# -- the table of typed values ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypedKind:
    """One persisted name of :data:`TYPED`: the node kind of its inner value, and how to rebuild the value."""

    name: str
    inner: str  # "dict" | "list" | "tuple" | "str" | "bytes"
    rebuild: Callable[[Any], Any]  # decoded inner value -> the value (may raise SafepointError naming nothing)
    str_keys: bool = False  # a dict whose keys become attribute names


def _lightning_class(module: str) -> Callable[[Any], Any]:
    """Rebuild a Lightning ``AttributeDict`` from the fixed module that defines it, imported only now."""

    def rebuild(items: Any) -> Any:
        try:
            cls = importlib.import_module(module).AttributeDict
        except (ImportError, AttributeError) as err:
            raise SafepointError(
                f"this checkpoint holds a {module}.AttributeDict, which needs the package that defines it; "
                f"install it, or load with it installed and save dict(value) instead ({err})"
            ) from err
        return cls(items)

    return rebuild


def _path_class(cls: type[pathlib.PurePath]) -> Callable[[Any], Any]:
    def rebuild(text: Any) -> Any:
        try:
            return cls(text)
        except NotImplementedError as err:  # a WindowsPath on POSIX, or the other way round
            raise SafepointError(
                f"this checkpoint holds a pathlib.{cls.__name__}, which cannot be created on this system; "
                "save str(path) or a Pure path instead"
            ) from err

    return rebuild


#: dtype names (as ``str(dtype)`` writes them, without ``torch.``) of every dtype this torch has.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)
}


def _torch_dtype(name: Any) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise SafepointError(f"this checkpoint holds torch.{name}, a dtype this torch does not have") from None


def _torch_device(name: Any) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise SafepointError(f"this checkpoint holds device {name!r}, which this torch does not know") from err


#: defaultdict factories that come back (the checkpoint names one of these, never a callable of its own).
_FACTORIES: dict[str, Callable[[], Any] | None] = {
    "None": None,
    "builtins.list": list,
    "builtins.dict": dict,
    "builtins.set": set,
    "builtins.tuple": tuple,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.str": str,
    "builtins.bool": bool,
    "builtins.bytes": bytes,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": collections.Counter,
}
_FACTORY_NAMES: dict[Any, str] = {factory: name for name, factory in _FACTORIES.items()}


def _defaultdict(factory: Callable[[], Any] | None) -> Callable[[Any], Any]:
    return lambda items: collections.defaultdict(factory, items)


_LIGHTNING = (
    "lightning.fabric.utilities.data",
    "lightning.pytorch.utilities.parsing",
    "lightning_fabric.utilities.data",
    "pytorch_lightning.utilities.parsing",
)
_PATHS = (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath)

#: Every typed name a checkpoint may hold, for ever: entries are added, never removed or changed.
TYPED: dict[str, TypedKind] = {
    kind.name: kind
    for kind in [
        TypedKind("collections.OrderedDict", "dict", collections.OrderedDict),
        TypedKind("collections.Counter", "dict", collections.Counter),
        *(
            TypedKind(f"collections.defaultdict:{name}", "dict", _defaultdict(factory))
            for name, factory in _FACTORIES.items()
        ),
        TypedKind("builtins.set", "list", set),
        TypedKind("builtins.frozenset", "list", frozenset),
        TypedKind("builtins.bytearray", "bytes", bytearray),
        TypedKind("builtins.complex", "tuple", lambda pair: complex(*pair)),
        TypedKind("argparse.Namespace", "dict", lambda items: argparse.Namespace(**items), str_keys=True),
        TypedKind("types.SimpleNamespace", "dict", lambda items: types.SimpleNamespace(**items), str_keys=True),
        *(TypedKind(f"pathlib.{cls.__name__}", "str", _path_class(cls)) for cls in _PATHS),
        TypedKind("torch.Size", "tuple", torch.Size),
        TypedKind("torch.dtype", "str", _torch_dtype),
        TypedKind("torch.device", "str", _torch_device),
        *(TypedKind(f"{module}.AttributeDict", "dict", _lightning_class(module)) for module in _LIGHTNING),
    ]
}
#: Types whose values restore replaces whole (they hold no tensors and are not updated in place).
REPLACED_WHOLE: tuple[type, ...] = (set, frozenset, bytearray, complex, *_PATHS, torch.Size, torch.dtype, torch.device)

# exact type -> (typed name, value -> the plain value its inner node encodes); Lightning's are looked up by name
_TYPED_BY_CLASS: dict[type, tuple[str, Callable[[Any], Any]]] = {
    collections.OrderedDict: ("collections.OrderedDict", dict),
    collections.Counter: ("collections.Counter", dict),
    set: ("builtins.set", list),
    frozenset: ("builtins.frozenset", list),
    bytearray: ("builtins.bytearray", bytes),
    complex: ("builtins.complex", lambda c: (c.real, c.imag)),
    argparse.Namespace: ("argparse.Namespace", vars),
    types.SimpleNamespace: ("types.SimpleNamespace", vars),
    torch.Size: ("torch.Size", tuple),
    torch.dtype: ("torch.dtype", lambda d: str(d).removeprefix("torch.")),
    torch.device: ("torch.device", str),
    **{cls: (f"pathlib.{cls.__name__}", str) for cls in _PATHS},
}


def _typed_name(value: Any) -> str | None:
    cls = type(value)
    if cls in _TYPED_BY_CLASS:
        return _TYPED_BY_CLASS[cls][0]
    if cls is collections.defaultdict:
        try:
            factory = _FACTORY_NAMES.get(value.default_factory, "?")
        except TypeError:  # an unhashable callable
            factory = "?"
        return f"collections.defaultdict:{factory}"
    module = cls.__module__
    if (
        cls.__qualname__ == "AttributeDict"
        and module in _LIGHTNING
        and getattr(sys.modules.get(module), "AttributeDict", None) is cls
    ):
        return f"{module}.AttributeDict"
    return None


# -- encoding ---------------------------------------------------------------------------------------------------
def encode_state(state: Mapping[str, Any]) -> Encoded:
    """Encode ``state`` into a JSON tree and its leaves, or raise InvalidStateError naming the bad key."""
    return encode_traced(state, {})[0]


#: Where a leaf's tensor comes from, in terms of the tensor slots of the tree (in tree order): a slot's own
#: tensor (its index), or a span ``(first slot, start, length)`` of the storage that several slots share.
LeafOrigin = int | tuple[int, int, int]


def encode_traced(
    state: Mapping[str, Any], resolved: dict[int, list[Any]]
) -> tuple[Encoded, list[LeafOrigin], list[_Slot]]:
    """:func:`encode_state`, also saying where each leaf comes from (for :mod:`safepoint._structure`).

    ``resolved`` maps ``id(obj)`` to the ``state_dict()`` results already taken of ``obj``, in tree order: they
    are used instead of calling ``state_dict()`` again, so the encoding is of exactly the values already seen."""
    check_is_state(state)
    encoder = _Encoder(resolved)
    tree = encoder.node(state, [], set(), 0)
    leaves = encoder.finish()
    return Encoded(tree, leaves, sharded=tuple(encoder.sharded)), encoder.origins, encoder.slots


@dataclass
class _Slot:
    """A leaf-bearing node of the tree, numbered once the whole state is seen (shared storages are known)."""

    node: dict[str, Any]
    kind: LeafKind
    tensor: torch.Tensor
    path: list[str | int]
    scalar: bool


class _Encoder:
    def __init__(self, resolved: dict[int, list[Any]] | None = None) -> None:
        self.slots: list[_Slot] = []
        self.sharded: list[ShardedSlot] = []
        self.origins: list[LeafOrigin] = []
        self.resolved = resolved or {}

    def leaf(self, kind: LeafKind, tensor: torch.Tensor, path: list[str | int], scalar: bool = False) -> dict[str, Any]:
        node: dict[str, Any] = {"k": kind, "e": -1}
        self.slots.append(_Slot(node, kind, tensor, path, scalar))
        return node

    def finish(self) -> list[Leaf]:
        """Number the leaves in tree order; tensors sharing a storage become views of one leaf (written once)."""
        spans = _shared_spans(self.slots)
        leaves: list[Leaf] = []
        base_leaf: dict[int, int] = {}
        for index, slot in enumerate(self.slots):
            span = spans.get(index)
            if span is None:
                slot.node["e"] = len(leaves)
                leaves.append(Leaf(key_path(slot.path), slot.kind, slot.tensor, slot.scalar))
                self.origins.append(index)
                continue
            if id(span) not in base_leaf:  # the first tensor of the storage, in tree order, names the entry
                base_leaf[id(span)] = len(leaves)
                leaves.append(Leaf(key_path(slot.path), "tensor", span.base))
                self.origins.append((index, span.start, span.base.numel()))
            tensor = slot.tensor
            slot.node.clear()
            slot.node.update(
                k="view",
                e=base_leaf[id(span)],
                offset=tensor.storage_offset() - span.start,
                shape=list(tensor.shape),
                stride=list(tensor.stride()),
            )
        return leaves

    def node(self, value: Any, path: list[str | int], active: set[int], depth: int) -> dict[str, Any]:
        # depth counts tree nodes, as the manifest parser does (object and typed nodes add a level but no key)
        if depth > MAX_TREE_DEPTH:
            raise _invalid(f"state nested deeper than {MAX_TREE_DEPTH} levels", path)
        cls = type(value)
        # types are matched exactly: a subclass of int or dict would load as its base class
        if value is None:
            return {"k": "none"}
        if cls is bool:
            return {"k": "bool", "v": value}
        if isinstance(value, np.generic):
            return self.array(np.asarray(value), path, scalar=True)
        if cls is int:
            if value.bit_length() > MAX_INT_BITS:
                raise _invalid(f"ints beyond {MAX_INT_BITS} bits cannot be checkpointed; store it as a str", path)
            return {"k": "int", "v": value}
        if cls is float:
            return {"k": "float", "v": float_to_json(value)}
        if cls is str:
            return {"k": "str", "v": value}
        if cls is bytes:
            return {"k": "bytes", "v": base64.b64encode(value).decode("ascii")}
        if isinstance(value, torch.Tensor):
            if is_dtensor(value):
                return self.dtensor(value, path)
            return self.leaf("tensor", _check_tensor(value, path), path)
        if cls is np.ndarray:
            return self.array(value, path, scalar=False)
        if isinstance(value, Pickled):
            try:
                data = pickle.dumps(value.value, protocol=5)
            except Exception as err:  # PicklingError, or whatever the object's own __reduce__ raises
                raise _invalid(f"cannot pickle {type(value.value).__name__}: {err}", path) from err
            return self.leaf("pickle", torch.frombuffer(bytearray(data), dtype=torch.uint8), path)
        return self.container(value, path, active, depth)

    def dtensor(self, value: Any, path: list[str | int]) -> dict[str, Any]:
        """A DTensor: a sharded node of its global dtype and shape; its boxes are the save pipeline's to fill."""
        _check_tensor(value.to_local(), path)
        if value.dtype not in DTYPES:
            raise _invalid(f"tensors of dtype {value.dtype} cannot be checkpointed", path)
        self.sharded.append(ShardedSlot(key_path(path), value.detach()))
        return {"k": "sharded", "dtype": DTYPES[value.dtype], "shape": list(value.shape), "boxes": []}

    def container(self, value: Any, path: list[str | int], active: set[int], depth: int) -> dict[str, Any]:
        if id(value) in active:
            raise _invalid("the state contains a reference cycle", path)
        active.add(id(value))
        try:
            cls = type(value)
            if cls is dict:
                return self.mapping(value, path, active, depth)
            if cls is list or cls is tuple:
                kind = "tuple" if cls is tuple else "list"
                return {"k": kind, "v": [self.node(v, [*path, i], active, depth + 1) for i, v in enumerate(value)]}
            name = _typed_name(value)
            if name is not None:
                return self.typed(name, value, path, active, depth)
            if is_stateful(value):
                return self.stateful(value, path, active, depth)
        finally:
            active.discard(id(value))
        raise _invalid(_refusal(value), path)

    def mapping(
        self, value: Mapping[Any, Any], path: list[str | int], active: set[int], depth: int, str_keys: bool = False
    ) -> dict[str, Any]:
        items = []
        for k, v in value.items():
            if str_keys and type(k) is not str:
                raise _invalid(f"attribute names must be str, not {type(k).__name__} ({k!r:.80})", path)
            if type(k) is not str and type(k) is not int:
                raise _invalid(f"dict keys must be str or int, not {type(k).__name__} ({k!r:.80})", path)
            items.append([k, self.node(v, [*path, k], active, depth + 1)])
        return {"k": "dict", "v": items}

    def typed(self, name: str, value: Any, path: list[str | int], active: set[int], depth: int) -> dict[str, Any]:
        kind = TYPED.get(name)
        if kind is None:  # a defaultdict whose factory is not in the table
            factory = value.default_factory
            raise _invalid(
                f"a defaultdict with default_factory {getattr(factory, '__qualname__', repr(factory))[:80]} cannot "
                "come back (a checkpoint never names code to run); use one of "
                f"{', '.join(n.removeprefix('builtins.') for n in _FACTORIES)} as its factory, store dict(value), "
                "or wrap it in safepoint.Pickled",
                path,
            )
        to_plain = _TYPED_BY_CLASS.get(type(value), (name, dict))[1]
        plain = to_plain(value)
        if kind.inner == "dict":
            inner = self.mapping(plain, path, active, depth + 1, str_keys=kind.str_keys)
        elif kind.inner == "list":  # set, frozenset: scalars only, in a stable order
            inner = {"k": "list", "v": sorted((self.set_item(v, path, depth + 1) for v in plain), key=_json_order)}
        elif kind.inner == "tuple":  # complex, torch.Size
            inner = {"k": "tuple", "v": [self.node(v, [*path, i], active, depth + 1) for i, v in enumerate(plain)]}
        else:
            inner = self.node(plain, path, active, depth + 1)
        return {"k": "typed", "t": name, "v": inner}

    def set_item(self, value: Any, path: list[str | int], depth: int) -> dict[str, Any]:
        if value is None or type(value) in (bool, int, float, str, bytes):
            return self.node(value, path, set(), depth)
        raise _invalid(
            f"a set holding a {_type_name(value)} cannot be checkpointed: sets may hold None, bool, int, float, "
            "str and bytes; store sorted(value) as a list instead",
            path,
        )

    def stateful(self, value: Any, path: list[str | int], active: set[int], depth: int) -> dict[str, Any]:
        taken = self.resolved.get(id(value))
        state = taken.pop(0) if taken else value.state_dict()
        if len(path) > 1 and isinstance(state, Mapping) and not state:
            raise _invalid(
                f"{_type_name(value)} has an empty state_dict(): it would load as {{}} and nothing could rebuild "
                "it; leave it out of the state (recreate it in code), store how to build it (its class name, its "
                "arguments), or wrap it in safepoint.Pickled",
                path,
            )
        return {"k": "object", "type": _type_name(value), "v": self.node(state, path, active, depth + 1)}

    def array(self, value: np.ndarray[Any, Any], path: list[str | int], *, scalar: bool) -> dict[str, Any]:
        return self.leaf("ndarray", array_tensor(value, path), path, scalar)


def array_tensor(value: np.ndarray[Any, Any], path: list[str | int]) -> torch.Tensor:
    """The tensor an ndarray leaf is written from: its elements in native byte order, contiguous."""
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
    return _check_tensor(tensor, path)


def _json_order(node: dict[str, Any]) -> str:
    return json.dumps(node, sort_keys=True)


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _refusal(value: Any) -> str:
    """Why ``value`` cannot be checkpointed, and what to store instead."""
    name = _type_name(value)
    if isinstance(value, PerRank):
        return "safepoint.PerRank marks top-level entries of the state only; move it to the top"
    if isinstance(value, enum.Enum):
        return (
            f"an enum member ({name}.{value.name}) cannot come back without importing its class, and a checkpoint "
            "never names a module to import; store its .value or .name and convert it back in your code"
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            f"a dataclass instance ({name}) cannot come back without importing its class; store "
            "dataclasses.asdict(value), give it state_dict()/load_state_dict(), or wrap it in safepoint.Pickled"
        )
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return (
            f"a namedtuple ({name}) would load as a plain tuple; store value._asdict() or tuple(value), or wrap it "
            "in safepoint.Pickled"
        )
    if isinstance(value, np.ndarray):
        return f"a numpy array subclass ({name}) would load as np.ndarray; store np.asarray(value)"
    for base in (dict, list, tuple, set, int, float, str, bytes):
        if isinstance(value, base):
            return (
                f"{name} is a subclass of {base.__name__} and would load as a plain {base.__name__}; store "
                f"{base.__name__}(value), or wrap it in safepoint.Pickled"
            )
    if isinstance(value, Mapping):
        return f"{name} is a mapping but not a dict and would load as a dict; store dict(value)"
    return (
        f"cannot checkpoint a value of type {name}; use tensors, arrays, numbers, strings, containers or objects "
        'with state_dict() (see "What a checkpoint can hold" in the README), or wrap it in safepoint.Pickled '
        "to opt into pickle"
    )


def _check_tensor(tensor: torch.Tensor, path: list[str | int]) -> torch.Tensor:
    """Only plain dense tensors may be copied by address; every other kind is refused by name."""
    cls = type(tensor)
    if tensor.is_nested:  # before the subclass check: a jagged nested tensor is a subclass
        raise _invalid("nested tensors cannot be checkpointed; store tensor.unbind() (a list of tensors)", path)
    if cls is not torch.Tensor and cls is not torch.nn.Parameter:
        raise _invalid(_tensor_subclass(cls), path)
    if tensor.is_quantized:
        raise _invalid(
            "quantized tensors cannot be checkpointed; store tensor.int_repr() with its scale and zero point, or "
            "tensor.dequantize()",
            path,
        )
    if tensor.layout != torch.strided:
        raise _invalid(f"{tensor.layout} tensors cannot be checkpointed; densify them first", path)
    if tensor.device.type == "meta":
        raise _invalid("a meta tensor has no data to checkpoint", path)
    if tensor.dtype not in DTYPES:
        raise _invalid(f"tensors of dtype {tensor.dtype} cannot be checkpointed", path)
    return tensor.detach()


def _tensor_subclass(cls: type) -> str:
    name = f"{cls.__module__}.{cls.__qualname__}"
    if issubclass(cls, (UninitializedParameter, UninitializedBuffer)):
        return (
            f"an uninitialized parameter or buffer of a lazy module ({name}) has no data yet; run a forward pass first"
        )
    if any(c.__name__ == "FakeTensor" for c in cls.__mro__):
        return f"a FakeTensor ({name}, from FakeTensorMode or torch.compile tracing) has no data to checkpoint"
    if any(c.__name__ == "FunctionalTensor" for c in cls.__mro__):
        return f"a FunctionalTensor ({name}, from functionalization or torch.compile tracing) cannot be checkpointed"
    return (
        f"a tensor subclass ({name}) cannot be checkpointed: only plain dense torch.Tensor and nn.Parameter "
        "values are; convert it to a plain tensor, or wrap it in safepoint.Pickled"
    )


@dataclass(frozen=True)
class _Span:
    base: torch.Tensor  # 1-D, the storage's elements [start, start + numel)
    start: int


def _shared_spans(slots: list[_Slot]) -> dict[int, _Span]:
    """slot index -> the span of its storage, for tensors that share a storage with another tensor leaf.

    Tensors are grouped by (device, storage address); empty tensors, numpy arrays and conjugate or negative views
    (a bit the span would lose) stay apart. A storage is written as one span only when the span is no larger
    than its tensors written separately: two small slices of a big buffer are written apart (values exact,
    the tie not kept) rather than the whole buffer between them."""
    groups: dict[tuple[torch.device, int], list[int]] = {}
    for index, slot in enumerate(slots):
        tensor = slot.tensor
        if slot.kind != "tensor" or tensor.numel() == 0 or tensor.is_conj() or tensor.is_neg():
            continue
        try:
            address = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a device whose storages have no address
            continue
        groups.setdefault((tensor.device, address), []).append(index)
    spans: dict[int, _Span] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        tensors = [slots[i].tensor for i in members]
        first = tensors[0]
        for index, tensor in zip(members, tensors, strict=True):
            if tensor.dtype != first.dtype:
                raise _invalid(
                    f"it shares its storage with {key_path(slots[members[0]].path)[:300]!r} but has another dtype "
                    f"({tensor.dtype}, not {first.dtype}); a shared storage is written once, in one dtype: "
                    "store a .clone() of one of them",
                    slots[index].path,
                )
        start = min(int(t.storage_offset()) for t in tensors)
        end = max(_end(t) for t in tensors)
        if end - start > sum(t.numel() for t in tensors):
            continue
        span = _Span(first.as_strided((end - start,), (1,), start), start)
        spans.update((index, span) for index in members)
    return spans


def _end(tensor: torch.Tensor) -> int:
    """One past the last storage element a non-empty tensor reads."""
    extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    return int(tensor.storage_offset()) + 1 + int(extent)


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


class PickledPayload:
    """The raw bytes of a pickled entry, loaded but not unpickled. Unpickling needs an explicit opt-in."""

    def __init__(self, data: bytes, key: str) -> None:
        self.data = data
        self.key = key

    def unpickle(self) -> Any:
        return pickle.loads(self.data)


#: How a decoder turns a sharded node into a value (default: :func:`assemble`, the full tensor from the leaves).
Sharded = Callable[[Mapping[str, Any], Sequence[Any]], Any]


def assemble(node: Mapping[str, Any], leaves: Sequence[Any]) -> torch.Tensor:
    """The full tensor of a (parsed) sharded node, from the loaded tensors of its boxes."""
    full = torch.empty(node["shape"], dtype=DTYPE_NAMES[node["dtype"]])
    for box in node["boxes"]:
        region = full
        for dim, (offset, size) in enumerate(zip(box["offsets"], box["sizes"], strict=True)):
            region = region.narrow(dim, offset, size)
        region.copy_(leaves[box["e"]])
    return full


def decode_tree(tree: Mapping[str, Any], leaves: Sequence[Any], sharded: Sharded = assemble) -> Any:
    """Build plain values from a validated tree; ``leaves[i]`` is the loaded value of leaf ``i``.

    View nodes become ``as_strided`` views of their (1-D, contiguous) leaf, so tensors that shared storage when
    saved share it again. A typed value that cannot be rebuilt here (its package is not installed, a path of
    another system) raises SafepointError naming its key. Sharded nodes become ``sharded(node, leaves)``."""
    return _decode(tree, leaves, [], sharded)


def _decode(node: Mapping[str, Any], leaves: Sequence[Any], path: list[str | int], sharded: Sharded) -> Any:
    kind = node["k"]
    if kind == "dict":
        return {k: _decode(v, leaves, [*path, k], sharded) for k, v in node["v"]}
    if kind in ("list", "tuple"):
        items = [_decode(v, leaves, [*path, i], sharded) for i, v in enumerate(node["v"])]
        return tuple(items) if kind == "tuple" else items
    if kind == "object":
        return _decode(node["v"], leaves, path, sharded)
    if kind in ("tensor", "ndarray", "pickle"):
        return leaves[node["e"]]
    if kind == "sharded":
        return sharded(node, leaves)
    if kind == "view":
        base = leaves[node["e"]]
        # as_strided's offset counts from the start of the storage, which the loaded leaf may not start at
        return base.as_strided(node["shape"], node["stride"], base.storage_offset() + node["offset"])
    if kind == "typed":
        inner = _decode(node["v"], leaves, path, sharded)
        try:
            return TYPED[node["t"]].rebuild(inner)
        except SafepointError as err:
            where = key_path(path)
            raise SafepointError(f"state entry {where[:300]!r}: {err}") from err.__cause__
    if kind == "none":
        return None
    if kind == "float":
        return float(node["v"])  # "nan", "inf", "-inf" too: a fresh NaN each time, as distinct as when saved
    if kind == "bytes":
        return base64.b64decode(node["v"])
    return node["v"]


def pickle_allowed(key: str, allow: Iterable[str] | bool) -> bool:
    """Whether ``allow`` (True, or key paths) opts the entry at ``key`` into unpickling."""
    if isinstance(allow, bool):
        return allow
    return any(key == k or key.startswith(k + "/") for k in allow)
