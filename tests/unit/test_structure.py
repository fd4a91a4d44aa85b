"""StructureCache: a later save of the same structure is encoded from the cache, and never from stale data.

The property every test here defends: whatever changed between two saves, ``StructureCache.encode(state)`` is
the encoding a fresh ``encode_state(state)`` makes of the state as it is now (same tree, same leaves, same
bytes), and the plan made from it is the plan made from the fresh encoding.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepoint
from safepoint._codec import Encoded, decode_tree, encode_state
from safepoint._commit import plan_save
from safepoint._structure import StructureCache
from tests.conftest import make_state


def leaf_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().numpy().tobytes()


def assert_same_encoding(cached: Encoded, fresh: Encoded) -> None:
    assert json.dumps(cached.tree) == json.dumps(fresh.tree)
    assert len(cached.leaves) == len(fresh.leaves)
    for got, want in zip(cached.leaves, fresh.leaves, strict=True):
        assert got.key == want.key
        assert got.kind == want.kind
        assert got.scalar == want.scalar
        assert got.tensor.dtype == want.tensor.dtype
        assert got.tensor.shape == want.tensor.shape
        assert got.tensor.requires_grad == want.tensor.requires_grad  # leaves are detached, as the encoder's
        assert leaf_bytes(got.tensor) == leaf_bytes(want.tensor)
    cached_plan = plan_save(cached, checkpoint="c", step=1, save_id="s", shard_bytes=4096)
    fresh_plan = plan_save(fresh, checkpoint="c", step=1, save_id="s", shard_bytes=4096)
    assert cached_plan.files == fresh_plan.files
    assert cached_plan.entries == fresh_plan.entries


def base_state() -> dict[str, Any]:
    torch.manual_seed(0)
    shared = torch.arange(12, dtype=torch.float32)
    return {
        "weights": {f"w{i}": torch.randn(3, 4) for i in range(4)},
        "tied": {"a": shared[:6], "b": shared[6:]},
        "grad": torch.nn.Parameter(torch.ones(2, 2)),
        "progress": {"step": 3, "lr": 0.5, "zero": 0.0, "name": "run", "flag": True, "none": None, "blob": b"x"},
        "complex": torch.randn(2, 2, dtype=torch.complex64),
        "history": [1, 2.5, [3, 4]],
        "shape": torch.Size([2, 3]),
        "odict": OrderedDict(x=torch.zeros(2), y=1),
        "array": np.arange(4, dtype=np.int32),
    }


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        node = state
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value() if callable(value) else value

    return change


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        node = state
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)

    return change


def _in_place(state: dict[str, Any]) -> None:
    with torch.no_grad():  # a weight may require grad after "tensor now requires grad"
        for tensor in [*state["weights"].values(), *state["tied"].values()]:
            tensor.add_(1.0)


def _retie(state: dict[str, Any]) -> None:  # the same shapes, now two storages: no longer tied
    state["tied"] = {"a": torch.ones(6), "b": torch.ones(6)}


def _tie(state: dict[str, Any]) -> None:  # two separate tensors become views of one storage
    base = torch.randn(24)
    state["weights"]["w0"] = base[:12].view(3, 4)
    state["weights"]["w1"] = base[12:].view(3, 4)


def _transpose(state: dict[str, Any]) -> None:  # same shape, not contiguous
    state["weights"]["w2"] = torch.randn(4, 3).t()


def _neg_view(state: dict[str, Any]) -> None:  # same dtype, shape and strides, a negative-bit view
    state["weights"]["w3"] = torch._neg_view(torch.randn(3, 4))


def _conj_view(state: dict[str, Any]) -> None:  # same dtype, shape and strides, a conjugate-bit view
    state["complex"] = torch.randn(2, 2, dtype=torch.complex64).conj()


def _tied_neg_view(state: dict[str, Any]) -> None:  # tied still, one of them now with(out) a negative bit
    state["tied"]["a"] = torch._neg_view(state["tied"]["a"])


def _swap_tied(state: dict[str, Any]) -> None:  # one storage still, the tensors at each other's offsets
    a, b = state["tied"]["a"], state["tied"]["b"]
    if a.numel() == b.numel():
        state["tied"] = {"a": b, "b": a}


def _rename(state: dict[str, Any]) -> None:
    if "w3" in state["weights"]:
        state["weights"]["w9"] = state["weights"].pop("w3")


#: Mutations applied between two saves; each must be visible in the next encoding.
MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "nothing": lambda state: None,
    "tensor values in place": _in_place,
    "tensor replaced, same shape": _set(("weights", "w1"), lambda: torch.full((3, 4), 7.0)),
    "tensor dtype": _set(("weights", "w1"), lambda: torch.ones(3, 4, dtype=torch.float64)),
    "tensor shape": _set(("weights", "w1"), lambda: torch.ones(4, 3)),
    "tensor added": _set(("weights", "w5"), lambda: torch.ones(1)),
    "tensor removed": _delete(("weights", "w0")),
    "key renamed": _rename,
    "int changed": _set(("progress", "step"), 4),
    "int to bool": _set(("progress", "step"), True),
    "int to float": _set(("progress", "step"), 3.0),
    "float sign of zero": _set(("progress", "lr"), -0.0),
    "float to nan": _set(("progress", "lr"), math.nan),
    "float to inf": _set(("progress", "lr"), math.inf),
    "bool flipped": _set(("progress", "flag"), False),
    "str changed": _set(("progress", "name"), "other"),
    "bytes changed": _set(("progress", "blob"), b"y"),
    "none to int": _set(("progress", "none"), 0),
    "nested list int": lambda state: state["history"][2].__setitem__(0, 30),
    "list grows": _set(("history",), lambda: [1, 2.5, [3, 4], 5]),
    "list to tuple": _set(("history",), lambda: (1, 2.5, [3, 4])),
    "typed value changed": _set(("shape",), lambda: torch.Size([2, 4])),
    "ordered dict value": lambda state: state["odict"].__setitem__("y", 2),
    "ordered dict to dict": _set(("odict",), lambda: {"x": torch.zeros(2), "y": 1}),
    "storage untied": _retie,
    "storages tied": _tie,
    "non-contiguous": _transpose,
    "negative view": _neg_view,
    "conjugate view": _conj_view,
    "tied tensors swap offsets": _swap_tied,
    "tied tensor becomes a negative view": _tied_neg_view,
    "zero to negative zero": _set(("progress", "zero"), -0.0),
    "array values": lambda state: state["array"].__setitem__(0, 99),
    "array dtype": _set(("array",), lambda: np.arange(4, dtype=np.int64)),
    "array byte order": _set(("array",), lambda: np.arange(4, dtype=">i4")),
    "tensor now requires grad": _set(("weights", "w2"), lambda: torch.ones(3, 4, requires_grad=True)),
    "parameter values": lambda state: state["grad"].data.fill_(3.0),
    "parameter data swapped": lambda state: setattr(state["grad"], "data", torch.zeros(2, 2, dtype=torch.float64)),
    # a tensor beside other kinds of values (walked one by one, not as a dict of tensors)
    "non-contiguous beside a scalar": _set(("complex",), lambda: torch.randn(2, 2, dtype=torch.complex64).t()),
    "negative view beside a scalar": _set(("odict", "x"), lambda: torch._neg_view(torch.randn(2))),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_change_between_saves_is_never_served_from_the_cache(name: str) -> None:
    cache = StructureCache()
    state = base_state()
    assert_same_encoding(cache.encode(state), encode_state(state))
    MUTATIONS[name](state)
    assert_same_encoding(cache.encode(state), encode_state(state))


@pytest.mark.parametrize(
    "name", ["tied tensor becomes a negative view", "conjugate view", "storages tied", "tensor now requires grad"]
)
def test_a_change_undone_is_seen_too(name: str) -> None:
    cache = StructureCache()
    state = base_state()
    for _ in range(3):
        MUTATIONS[name](state)
        assert_same_encoding(cache.encode(state), encode_state(state))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=6))
def test_any_sequence_of_changes_encodes_as_a_fresh_encode(names: list[str]) -> None:
    cache = StructureCache()
    state = base_state()
    for name in names:
        assert_same_encoding(cache.encode(state), encode_state(state))
        MUTATIONS[name](state)
    assert_same_encoding(cache.encode(state), encode_state(state))


def test_an_unchanged_structure_is_a_hit_even_when_scalars_change() -> None:
    cache = StructureCache()
    state = make_state()  # model, optimizer, scheduler, RNGState (numpy and Python RNG), progress
    cache.encode(state)
    state["progress"]["epoch"] += 1
    torch.randn(3)
    np.random.rand()
    encoded = cache.encode(state)
    assert cache.misses == 1
    assert cache.hits == 1
    assert_same_encoding(encoded, encode_state(state))
    state["progress"]["extra"] = 1  # a new key: a miss, and the fresh encoding
    assert_same_encoding(cache.encode(state), encode_state(state))
    assert cache.misses == 2


def test_the_tree_of_an_earlier_save_is_not_changed_by_a_later_one() -> None:
    """A background save still writing its manifest must keep its own scalars."""
    cache = StructureCache()
    state = base_state()
    first = cache.encode(state)
    before = json.dumps(first.tree)
    state["progress"]["step"] = 100
    cache.encode(state)
    assert json.dumps(first.tree) == before


class Counting:
    def __init__(self) -> None:
        self.calls = 0
        self.weight = torch.ones(3)

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        return {"weight": self.weight, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight.copy_(state["weight"])


def test_state_dict_is_called_once_per_save_and_its_result_is_what_is_saved() -> None:
    cache = StructureCache()
    counting = Counting()
    for calls in (1, 2, 3):
        encoded = cache.encode({"obj": counting})
        assert counting.calls == calls
        values = decode_tree(encoded.tree, [leaf.tensor for leaf in encoded.leaves])
        assert values["obj"]["calls"] == calls
    assert cache.hits == 2


def test_the_cache_keeps_no_tensor_alive() -> None:
    cache = StructureCache()
    tensor = torch.ones(1000)
    ref = weakref.ref(tensor)
    cache.encode({"t": tensor, "n": 1})
    cache.encode({"t": tensor, "n": 2})
    del tensor
    gc.collect()
    assert ref() is None


def test_an_invalid_value_still_raises_the_encoders_error() -> None:
    cache = StructureCache()
    state: dict[str, Any] = {"a": torch.ones(2), "n": 1}
    cache.encode(state)
    state["n"] = 2**4096
    with pytest.raises(safepoint.InvalidStateError, match="'n'"):
        cache.encode(state)
    state["n"] = {1.5: 2}
    with pytest.raises(safepoint.InvalidStateError, match="dict keys"):
        cache.encode(state)
    state["n"] = {1: 2}
    cache.encode(state)
    state["n"] = {True: 2}  # equal to 1, and refused: bool keys would load as ints
    with pytest.raises(safepoint.InvalidStateError, match="dict keys"):
        cache.encode(state)


def test_a_tensor_moved_to_the_meta_device_is_refused_not_served() -> None:
    cache = StructureCache()
    state = base_state()
    cache.encode(state)
    state["weights"]["w1"] = torch.empty(3, 4, device="meta")
    with pytest.raises(safepoint.InvalidStateError, match="meta"):
        cache.encode(state)


def test_background_saves_of_a_changing_state_load_back_as_it_was(tmp_path: Path) -> None:
    state = base_state()
    expected = []
    with safepoint.CheckpointManager(tmp_path) as manager:
        for step, name in enumerate(["nothing", "int changed", "tensor values in place", "storages tied",
                                     "float sign of zero", "tensor shape", "nothing"]):  # fmt: skip
            MUTATIONS[name](state)
            expected.append(
                json.dumps(encode_state(state).tree)
                + repr([leaf_bytes(leaf.tensor) for leaf in encode_state(state).leaves])
            )
            handle = manager.save(step, state, blocking=False)
            if step % 2:
                manager.save(100 + step, state)  # a synchronous save of the same structure in between
            handle.result()
        assert manager._saver._structures[0].hits >= 3
        for step, want in enumerate(expected):
            values, _ = manager.load(step)
            loaded = encode_state(values)
            got = json.dumps(loaded.tree) + repr([leaf_bytes(leaf.tensor) for leaf in loaded.leaves])
            assert got == want


def _scribble(value: Any) -> None:
    """Change every tensor and array of a state in place: what a training step does right after save() returns."""
    if isinstance(value, torch.Tensor):
        if value.numel() and not value.is_conj():
            with torch.no_grad():
                value.fill_(-123)
    elif isinstance(value, np.ndarray):
        value[...] = 0
    elif isinstance(value, dict):
        for item in value.values():
            _scribble(item)
    elif isinstance(value, list):
        for item in value:
            _scribble(item)


def _saved_form(state: dict[str, Any]) -> str:
    encoded = encode_state(state)
    return json.dumps(encoded.tree) + repr([leaf_bytes(leaf.tensor) for leaf in encoded.leaves])


def untied_state() -> dict[str, Any]:
    """base_state() with every tensor in a storage of its own: a hit's copy then takes the walk's pointers."""
    state = base_state()
    state["tied"] = {"a": torch.arange(6, dtype=torch.float32), "b": torch.arange(6, 12, dtype=torch.float32)}
    return state


def test_a_hit_carries_the_pointers_the_walk_read_only_while_every_tensor_is_dense() -> None:
    cache = StructureCache()
    state = untied_state()
    assert cache.encode(state).pointers is None  # a miss: the copy reads them itself
    encoded = cache.encode(state)
    assert encoded.pointers is not None
    assert list(encoded.pointers) == [leaf.tensor.data_ptr() for leaf in encoded.leaves]
    state["weights"]["w2"] = torch.randn(4, 3).t()  # the same signature, not contiguous
    assert cache.encode(state).pointers is None
    assert cache.hits == 2
    state["weights"]["w2"] = torch._neg_view(torch.randn(3, 4))
    assert cache.encode(state).pointers is None
    state["weights"]["w2"] = torch.randn(3, 4)
    state["complex"] = torch.randn(2, 2, dtype=torch.complex64).conj()
    assert cache.encode(state).pointers is None
    assert cache.hits == 4
    tied = base_state()  # a tensor that is a span of a shared storage is not its own pointer's bytes
    cache.encode(tied)
    assert cache.encode(tied).pointers is None


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_repeat_background_save_holds_the_state_of_its_call_after_any_change(
    tmp_path: Path, name: str, tied: bool
) -> None:
    """The second background save of a state (its structure cached, and its copy plan) after one change: the
    checkpoint holds the state as it was when save() returned, though every tensor changes right after. Untied
    (no tensor shares a storage), a hit copies from the walk's pointers."""
    state = base_state() if tied else untied_state()
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, state, blocking=False).result(timeout=60)
        MUTATIONS[name](state)
        want = _saved_form(state)
        handle = manager.save(2, state, blocking=False)
        _scribble(state)
        handle.result(timeout=60)
        values, _ = manager.load(2)
        if name == "nothing" and not tied:
            assert manager._saver._structures[0].hits == 1
    assert _saved_form(values) == want


@pytest.mark.parametrize("layout", ["sparse_coo", "mkldnn"])
def test_a_tensor_of_another_layout_in_a_dict_of_tensors_is_refused_not_served(layout: str) -> None:
    """The walk reads no layout: only a strided tensor has a data_ptr(), so another layout makes it give up."""
    cache = StructureCache()
    state = untied_state()
    cache.encode(state)
    dense = torch.randn(3, 4)
    state["weights"]["w1"] = dense.to_sparse() if layout == "sparse_coo" else dense.to_mkldnn()
    with pytest.raises(safepoint.InvalidStateError, match="w1"):
        encode_state(state)
    with pytest.raises(safepoint.InvalidStateError, match="w1"):
        cache.encode(state)
    assert cache.hits == 0
