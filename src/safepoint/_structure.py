"""Saving a state of the same structure again: its encoding and its plan, reused from save to save.

A training loop saves the same structure at every checkpoint: the same keys, the same tensors (by dtype, shape
and device), the same objects. Encoding it from scratch (key paths, a node and a check per tensor, the search for
shared storages) and planning it (names, offsets, headers) cost ~15 us per tensor, more than copying a small
tensor. :class:`StructureCache` keeps the last encoding and answers the next ``encode`` from it when a cheap walk
of the new state shows that the encoder would produce the same thing.

What the walk compares (its *signature*), and why that is enough: the encoder's output is a function of the
containers (exact type, length, keys and the keys' exact types), the objects' type names and their
``state_dict()`` contents, each tensor's class, dtype, shape, device, layout, contiguity and conj/neg bits, which
tensors share a storage (and, for those, their storage offsets and strides), and the scalar values. The walk
records all of these; tensor *values* and addresses are not part of the encoding (the copy reads them at the
call), so the walk takes the tensors of the new state and never serves a tensor of an earlier one. Scalars
(``step``, ``epoch``, a Python RNG state) are compared exactly (floats by their hex form, so ``-0.0`` and ``0.0``
differ) and changed ones are re-encoded into a copy of the tree: a changed ``int`` never comes from the cache.

Anything the walk does not model exactly (numpy arrays, ``Pickled``, tensor subclasses, values the encoder would
refuse, deep nesting) makes it give up: the state is then encoded from scratch, exactly as without a cache, and
errors come from the encoder with their usual messages. Each object's ``state_dict()`` is called once per save:
on a miss the encoder is handed the state_dicts the walk already took.

The cache holds no tensor and no state object: only the tree (JSON data), the signature (types, sizes, keys) and
the plan's layout, so it keeps no memory of the training state alive. One entry: the last structure saved.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import operator
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._codec import (
    MAX_INT_BITS,
    MAX_TREE_DEPTH,
    Encoded,
    Leaf,
    LeafKind,
    LeafOrigin,
    Pickled,
    _Encoder,
    _type_name,
    _typed_name,
    array_tensor,
    encode_traced,
    is_stateful,
)
from ._errors import InvalidStateError

__all__ = ["StructureCache"]

_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (type(None), bool, str, bytes)


def _device(tensor: torch.Tensor) -> torch.device | bool:
    """The tensor's device; True for the CPU (``.device`` makes a new object each time: the walk's hot path)."""
    return True if tensor.is_cpu else tensor.device


#: what the walk reads of each tensor of a dict of tensors, in one C call per tensor (a read of a tensor attribute
#: costs ~0.2 us, more with its metadata out of cache: one pass over the tensors reads them all while it is in)
_META = operator.attrgetter("is_cpu", "requires_grad", "dtype", "shape")
_IS_CPU, _REQUIRES_GRAD = operator.itemgetter(0), operator.itemgetter(1)
_DATA_PTR, _STORAGE_OFFSET = torch.Tensor.data_ptr, torch.Tensor.storage_offset
_CONTIGUOUS, _NEG, _CONJ = torch.Tensor.is_contiguous, torch.Tensor.is_neg, torch.Tensor.is_conj
#: tensors read in one go by the walk: every read of a run of this many finds their metadata still in cache (a
#: pass over all 10 000 tensors of a state would not: each read costs a cache miss again)
_RUN = 512
_TENSOR_DICT = "a dict of plain CPU tensors"


#: ``_LEAF((key, kind, tensor, scalar))`` is ``Leaf(key, kind, tensor, scalar)``, made without Python code
_LEAF = functools.partial(tuple.__new__, Leaf)


class _GiveUp(Exception):
    """The walk met something it does not model exactly: encode from scratch."""


class _Walk:
    """One pass over a state, recording its signature, its scalars and its tensors in the encoder's order."""

    __slots__ = ("dense", "pointers", "resolved", "scalar_keys", "scalars", "signature", "storages", "tensors")

    def __init__(self) -> None:
        self.signature: list[Any] = []
        self.scalars: list[Any] = []  # the values, in tree order
        self.scalar_keys: list[Any] = []  # the same, compared exactly (floats as hex)
        self.tensors: list[torch.Tensor] = []  # detached, as the encoder keeps them
        self.storages: list[int | torch.SymInt] = []  # storage addresses: how the encoder finds shared storage
        self.pointers: list[int] = []  # each tensor's data_ptr(), read once: the copy of a hit reuses it
        self.dense = True  # every tensor contiguous without a neg bit (conj bits: see _reuse)
        self.resolved: dict[int, list[Any]] = {}

    def node(self, value: Any, depth: int) -> None:
        if depth > MAX_TREE_DEPTH:
            raise _GiveUp  # the encoder says why (a cycle, or too deep)
        cls = type(value)
        if cls in _TENSORS:
            self.tensor(value)
        elif cls is dict:
            self.mapping(value, depth)
        elif cls in _SCALARS:
            self.signature.append(cls)
            self.scalars.append(value)
            self.scalar_keys.append(value)
        elif cls is int:
            if value.bit_length() > MAX_INT_BITS:
                raise _GiveUp
            self.signature.append(cls)
            self.scalars.append(value)
            self.scalar_keys.append(value)
        elif cls is float:
            self.signature.append(cls)
            self.scalars.append(value)
            self.scalar_keys.append(value.hex())
        elif cls is list or cls is tuple:
            self.signature.append((cls, len(value)))
            for item in value:
                self.node(item, depth + 1)
        else:
            self.other(value, depth)

    def tensor(self, value: torch.Tensor) -> None:
        # contiguity and the conj/neg bits matter only for tensors that share a storage: checked there
        self.signature.append((type(value), value.dtype, value.shape, _device(value), value.layout))
        self.tensors.append(value if type(value) is torch.Tensor and not value.requires_grad else value.detach())
        # by arithmetic: cheaper than untyped_storage(), and checked against it when an entry is made
        pointer = value.data_ptr()
        self.pointers.append(pointer)
        self.dense = self.dense and value.is_contiguous() and not value.is_neg()
        self.storages.append(pointer - value.storage_offset() * value.itemsize)

    def mapping(self, value: dict[Any, Any], depth: int) -> None:
        keys = list(value)
        self.signature.append(keys)
        self.signature.append(tuple(map(type, keys)))
        items = list(value.values())
        if len(items) > 1 and set(map(type, items)) == {torch.Tensor} and self.tensor_dict(items):
            return
        for item in items:
            self.node(item, depth + 1)

    def tensor_dict(self, items: list[torch.Tensor]) -> bool:
        """A dict of plain CPU tensors (the hot path of a state with many tensors): every attribute read by a C
        loop (``map``), not by the interpreter, and no object made per tensor but its metadata tuple. False
        (nothing recorded) when it is not one."""
        meta: list[tuple[bool, bool, torch.dtype, torch.Size]] = []
        pointers: list[int] = []
        offsets: list[int | torch.SymInt] = []
        dense = True
        for start in range(0, len(items), _RUN):
            run = items[start : start + _RUN]
            meta += map(_META, run)
            # no layout read: only a strided tensor has a data_ptr() (other layouts raise, and the walk gives up)
            pointers += map(_DATA_PTR, run)
            offsets += map(_STORAGE_OFFSET, run)
            dense = dense and all(map(_CONTIGUOUS, run)) and not any(map(_NEG, run))
        if not all(map(_IS_CPU, meta)) or any(map(_REQUIRES_GRAD, meta)):
            return False
        # what tensor() records of each, as one list; the marker sets it apart from tensor()'s tuples
        self.signature += (_TENSOR_DICT, meta)
        self.tensors.extend(items)
        self.pointers += pointers
        self.dense = self.dense and dense
        if any(offsets):
            sizes = map(torch.Tensor.element_size, items)
            self.storages.extend(p - o * s for p, o, s in zip(pointers, offsets, sizes, strict=True))
        else:
            self.storages.extend(pointers)
        return True

    def other(self, value: Any, depth: int) -> None:
        cls = type(value)
        if cls is np.ndarray or isinstance(value, np.generic):  # as the encoder: a tensor of its native bytes
            scalar = cls is not np.ndarray
            array = np.asarray(value) if scalar else value
            try:
                tensor = array_tensor(array, [])
            except InvalidStateError as err:
                raise _GiveUp from err
            self.signature.append(("ndarray", scalar, array.dtype, array.shape))
            self.tensors.append(tensor)
            self.pointers.append(tensor.data_ptr())
            self.storages.append(0)  # never grouped
            return
        if isinstance(value, (torch.Tensor, Pickled, np.ndarray)):
            raise _GiveUp  # leaves the walk does not model (subclasses, pickles)
        if cls is collections.OrderedDict:  # every module's state_dict: walked like a dict
            self.signature.append(cls)
            self.mapping(value, depth + 1)
            return
        if _typed_name(value) is not None:  # sets, paths, namespaces...: compared by their exact encoding
            encoder = _Encoder()
            try:
                node = encoder.node(value, [], set(), depth)
            except Exception as err:  # the encoder refuses it: say so from a full encode
                raise _GiveUp from err
            if encoder.slots:
                raise _GiveUp
            self.signature.append((cls, json.dumps(node, sort_keys=True)))
            return
        if not is_stateful(value):
            raise _GiveUp
        state = value.state_dict()
        if isinstance(state, Mapping) and not state:
            raise _GiveUp  # refused below the top level: the encoder knows where it is
        self.signature.append(("object", _type_name(value)))
        self.resolved.setdefault(id(value), []).append(state)
        self.node(state, depth + 1)


def _strides(tensors: list[torch.Tensor], indices: list[int]) -> list[tuple[int, tuple[int, ...], bool, bool]]:
    """What the encoder reads of a tensor that shares its storage: where it lies in it, and its conj/neg bits."""
    return [
        (int(t.storage_offset()), tuple(t.stride()), t.is_conj(), t.is_neg()) for t in (tensors[i] for i in indices)
    ]


def _groups(keys: list[int | torch.SymInt]) -> list[list[int]]:
    """Positions in ``keys`` of the eligible slots that share a storage address with another, grouped."""
    by_key: dict[int | torch.SymInt, list[int]] = {}
    for at, key in enumerate(keys):
        by_key.setdefault(key, []).append(at)
    return [members for members in by_key.values() if len(members) > 1]


Path = tuple[int | None, ...]  # steps into a tree: an index into "v" (a dict item's node), None for object/typed


def _scalar_paths(tree: dict[str, Any]) -> list[Path]:
    """Where the walk's scalars are in ``tree``, in the walk's order (the encoder's tree order)."""
    paths: list[Path] = []

    def visit(node: dict[str, Any], path: Path) -> None:
        kind = node["k"]
        if kind == "dict":
            for index, (_, child) in enumerate(node["v"]):
                visit(child, (*path, index))
        elif kind in ("list", "tuple"):
            for index, child in enumerate(node["v"]):
                visit(child, (*path, index))
        elif kind == "object" or (kind == "typed" and node["t"] == "collections.OrderedDict"):
            visit(node["v"], (*path, None))
        elif kind in ("none", "bool", "int", "float", "str", "bytes"):
            paths.append(path)
        # tensors, views, and typed values compared whole hold no scalar of the walk

    visit(tree, ())
    return paths


def _patched(node: dict[str, Any], changes: dict[Any, Any]) -> dict[str, Any]:
    """A copy of ``node`` with the nodes at the paths of the trie ``changes`` replaced; only the nodes on those
    paths are copied, everything else is shared with ``node`` (trees are never mutated once encoded)."""
    copy = dict(node)
    for step, change in changes.items():
        if step is None:
            copy["v"] = change if "k" in change else _patched(node["v"], change)
            continue
        if copy["v"] is node["v"]:
            copy["v"] = list(node["v"])
        items = copy["v"]
        if node["k"] == "dict":
            key, child = items[step]
            items[step] = [key, change if "k" in change else _patched(child, change)]
        else:
            items[step] = change if "k" in change else _patched(items[step], change)
    return copy


def _scalar_node(value: Any) -> dict[str, Any]:
    return _Encoder().node(value, [], set(), 0)


@dataclasses.dataclass(eq=False)
class _Entry:
    """The last structure saved: what the walk saw, and what the encoder made of it."""

    signature: list[Any]
    scalar_keys: list[Any]
    scalar_paths: list[Path]
    tree: dict[str, Any]
    keys: tuple[tuple[str, LeafKind, bool], ...]  # each leaf's key, kind and scalar flag
    columns: tuple[list[str], list[LeafKind], list[bool]]  # the same, by column
    slots: list[int] | None  # the slot whose tensor each leaf is (or spans); None: leaf i is slot i's
    spans: list[tuple[int, tuple[int, int, int]]]  # leaf index, (slot, start, length): a shared storage's span
    eligible: list[int] | None  # slots the encoder groups by storage (non-empty tensors, no conj/neg bit); None: all
    distinct: int  # distinct storage addresses among them
    groups: list[list[int]]  # positions in ``eligible`` of slots sharing a storage
    grouped: list[int]  # those slots
    group_strides: list[tuple[int, tuple[int, ...], bool, bool]]  # see _strides
    flagged: list[int]  # slots left out of the grouping for their conj or neg bit
    specs: list[tuple[torch.dtype, torch.Size]]  # each leaf's dtype and shape (fixed by the signature)
    complex: bool  # a tensor of a complex dtype: only those can carry a conj bit (fixed by the signature)
    plans: dict[tuple[int, str], Any] = dataclasses.field(default_factory=dict)  # see commit.plan_save


class StructureCache:
    """``encode(state)``: :func:`~safepoint._codec.encode_state`, answered from the last structure when it holds.

    ``hits`` and ``misses`` count the answers (tests and benchmarks read them). Thread-safe."""

    def __init__(self) -> None:
        self._entry: _Entry | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def encode(self, state: Mapping[str, Any]) -> Encoded:
        if not isinstance(state, Mapping):
            return encode_traced(state, {})[0]  # raises the encoder's error
        walk = _Walk()
        try:
            walk.node(state, 0)
        except Exception:  # _GiveUp, or a tensor without an address: the encoder says what it makes of it
            self.clear()
            return encode_traced(state, walk.resolved)[0]
        with self._lock:
            entry = self._entry
        encoded = self._reuse(entry, walk) if entry is not None else None
        if encoded is not None:
            self.hits += 1
            return encoded
        self.misses += 1
        encoded, origins, slots = encode_traced(state, walk.resolved)
        entry = _make_entry(walk, encoded, origins, slots)
        with self._lock:
            self._entry = entry
        if entry is not None:
            return dataclasses.replace(encoded, structure=entry, specs=entry.specs)
        return encoded

    def _reuse(self, entry: _Entry, walk: _Walk) -> Encoded | None:
        if walk.signature != entry.signature:
            return None
        tensors, storages = walk.tensors, walk.storages
        keys = storages if entry.eligible is None else [storages[i] for i in entry.eligible]
        if len(set(keys)) != entry.distinct:
            return None  # a storage newly shared (or no longer: then a group below differs)
        for members in entry.groups:  # positions in ``keys``
            first = keys[members[0]]
            if any(keys[at] != first for at in members):
                return None
        if _strides(tensors, entry.grouped) != entry.group_strides:
            return None
        # a tensor left out of the grouping for its conj/neg bit must still have it (else it would join a group)
        if not all(tensors[i].is_conj() or tensors[i].is_neg() for i in entry.flagged):
            return None
        tree = entry.tree
        if walk.scalar_keys != entry.scalar_keys:
            try:
                tree = _with_scalars(entry, walk)
            except Exception:  # e.g. an int the encoder refuses: a full encode says which
                return None
        picked = tensors if entry.slots is None else map(tensors.__getitem__, entry.slots)
        # by a C loop: a Leaf per tensor is the one object a hit makes per tensor
        names, kinds, scalars = entry.columns
        leaves: list[Leaf] = list(map(_LEAF, zip(names, kinds, picked, scalars, strict=True)))
        for index, (slot, start, length) in entry.spans:
            leaf = leaves[index]
            leaves[index] = Leaf(leaf.key, leaf.kind, tensors[slot].as_strided((length,), (1,), start), leaf.scalar)
        # leaf i is tensor i: the copy may take the walk's pointers when every leaf's bytes are its pointer's span
        # (a conj bit needs a complex dtype, which the signature fixes: read only where the entry has one)
        direct = entry.slots is None and not entry.spans and walk.dense
        direct = direct and not (entry.complex and any(map(_CONJ, tensors)))
        return Encoded(tree, leaves, structure=entry, specs=entry.specs, pointers=walk.pointers if direct else None)


def _with_scalars(entry: _Entry, walk: _Walk) -> dict[str, Any]:
    trie: dict[Any, Any] = {}
    for index, (new, old) in enumerate(zip(walk.scalar_keys, entry.scalar_keys, strict=True)):
        if new == old and type(new) is type(old):
            continue
        node = trie
        path = entry.scalar_paths[index]
        for step in path[:-1]:
            node = node.setdefault(step, {})
        node[path[-1]] = _scalar_node(walk.scalars[index])
    return _patched(entry.tree, trie)


def _make_entry(walk: _Walk, encoded: Encoded, origins: list[LeafOrigin], slots: list[Any]) -> _Entry | None:
    """An entry for the walk's structure, or None when the walk and the encoding disagree (then nothing is
    cached: a state whose ``state_dict()`` changes between calls, say)."""
    tensors = walk.tensors
    if len(slots) != len(tensors) or any(
        slot.tensor.dtype != tensor.dtype
        or slot.tensor.shape != tensor.shape
        or (slot.kind == "tensor" and slot.tensor.data_ptr() != tensor.data_ptr())
        for slot, tensor in zip(slots, tensors, strict=True)
    ):
        return None
    kinds = [slot.kind for slot in slots]
    if "pickle" in kinds:
        return None
    paths = _scalar_paths(encoded.tree)
    if len(paths) != len(walk.scalars):
        return None
    for path, value in zip(paths, walk.scalars, strict=True):
        if _at(encoded.tree, path) != _scalar_node(value):
            return None
    eligible = [
        i
        for i, t in enumerate(tensors)
        if kinds[i] == "tensor" and t.numel() and not (t.is_conj() or t.is_neg()) and t.layout == torch.strided
    ]
    flagged = [i for i, t in enumerate(tensors) if kinds[i] == "tensor" and (t.is_conj() or t.is_neg())]
    keys = [walk.storages[i] for i in eligible]
    try:
        if keys != [tensors[i].untyped_storage().data_ptr() for i in eligible]:
            return None
    except (RuntimeError, NotImplementedError):
        return None
    groups = _groups(keys)
    grouped = [eligible[at] for group in groups for at in group]
    of_leaf = []  # the slot of each leaf
    spans = []
    for index, origin in enumerate(origins):
        if isinstance(origin, int):
            of_leaf.append(origin)
        else:
            of_leaf.append(origin[0])
            spans.append((index, origin))
    return _Entry(
        signature=walk.signature,
        scalar_keys=walk.scalar_keys,
        scalar_paths=paths,
        tree=encoded.tree,
        keys=tuple((leaf.key, leaf.kind, leaf.scalar) for leaf in encoded.leaves),
        columns=(
            [leaf.key for leaf in encoded.leaves],
            [leaf.kind for leaf in encoded.leaves],
            [leaf.scalar for leaf in encoded.leaves],
        ),
        slots=None if of_leaf == list(range(len(tensors))) else of_leaf,
        spans=spans,
        eligible=None if len(eligible) == len(tensors) else eligible,
        distinct=len(set(keys)),
        groups=groups,
        grouped=grouped,
        group_strides=_strides(tensors, grouped),
        flagged=flagged,
        specs=[(leaf.tensor.dtype, leaf.tensor.shape) for leaf in encoded.leaves],
        complex=any(tensor.is_complex() for tensor in tensors),
    )


def _at(tree: dict[str, Any], path: Path) -> Any:
    node = tree
    for step in path:
        if step is None:
            node = node["v"]
        elif node["k"] == "dict":
            node = node["v"][step][1]
        else:
            node = node["v"][step]
    return node
