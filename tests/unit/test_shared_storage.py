"""Tensors that share storage (tied weights, views) are written once and share storage again after a load.

Invariant defended: *restore is total or nothing* with values exact: a tie is part of what a model is (GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``), so a load must not hand back two unrelated tensors, and a
checkpoint must not hold the same bytes twice. Format version 2 stores one entry per shared storage (the span
its tensors cover) and a ``view`` node per tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepoint
from tests.helpers import assert_same, edit_manifest, read_manifest, tensor_bits


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _payload_bytes(checkpoint: Path) -> int:
    return sum(record["size"] for record in read_manifest(checkpoint)["files"])


def test_views_of_one_storage_are_written_once_and_share_it_after_load(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    state = {
        "whole": base,
        "again": base,  # the same tensor twice
        "grid": base.view(4, 6),
        "transposed": base.view(4, 6).t(),
        "tail": {"x": base[10:]},
        "strided": [base[1::3]],
        "expanded": base[:3].expand(2, 3),
    }
    safepoint.save(tmp_path / "c", state)
    body = read_manifest(tmp_path / "c")
    assert [(e["key"], e["shape"]) for e in body["entries"]] == [("whole", [24])]
    loaded = safepoint.load(tmp_path / "c")
    assert_same(loaded, state)
    assert {_storage(t) for t in (loaded["whole"], loaded["again"], loaded["tail"]["x"], loaded["expanded"])} == {
        _storage(loaded["grid"])
    }
    assert loaded["transposed"].stride() == (1, 6)  # the layout comes back too, not only the values
    loaded["whole"][11] = -1.0
    assert loaded["tail"]["x"][1].item() == -1.0  # one storage: a write through one is seen through the other


def test_the_span_covers_only_what_the_tensors_use(tmp_path: Path) -> None:
    buffer = torch.arange(100, dtype=torch.int64)
    state = {"a": buffer[40:50], "b": buffer[45:60].view(3, 5)}
    safepoint.save(tmp_path / "c", state)
    (entry,) = read_manifest(tmp_path / "c")["entries"]
    assert entry["shape"] == [20]  # elements 40..59, not the whole buffer
    loaded = safepoint.load(tmp_path / "c")
    assert_same(loaded, state)
    assert _storage(loaded["a"]) == _storage(loaded["b"])


def test_far_apart_slices_of_a_big_buffer_are_written_apart(tmp_path: Path) -> None:
    # writing the span between them would cost far more than the two slices: values exact, the tie not kept
    buffer = torch.zeros(1 << 20)
    state = {"head": buffer[:8], "tail": buffer[-8:]}
    safepoint.save(tmp_path / "c", state)
    assert [e["shape"] for e in read_manifest(tmp_path / "c")["entries"]] == [[8], [8]]
    assert _payload_bytes(tmp_path / "c") < 4096
    assert_same(safepoint.load(tmp_path / "c"), state)


def test_conjugate_and_empty_views_stay_apart(tmp_path: Path) -> None:
    complex_base = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    empty = torch.empty(0)
    state = {"c": complex_base, "conj": complex_base.conj(), "e1": empty, "e2": empty[0:0], "e3": torch.empty(0)}
    safepoint.save(tmp_path / "c", state)
    assert len(read_manifest(tmp_path / "c")["entries"]) == 5
    assert_same(safepoint.load(tmp_path / "c"), state)


def test_a_module_with_tied_parameters_keeps_its_tie(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    safepoint.save(tmp_path / "c", {"model": model})
    loaded = safepoint.load(tmp_path / "c")["model"]
    assert type(loaded) is OrderedDict
    assert _storage(loaded["0.weight"]) == _storage(loaded["1.weight"])
    assert [e["key"] for e in read_manifest(tmp_path / "c")["entries"]] == ["model/0.weight"]

    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    safepoint.restore(tmp_path / "c", {"model": fresh})
    assert fresh[1].weight is fresh[0].weight
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_a_background_save_writes_shared_storage_once(tmp_path: Path) -> None:
    base = torch.arange(1000, dtype=torch.float32)
    state = {"a": base, "b": base[500:].view(20, 25)}
    with safepoint.CheckpointManager(tmp_path, max_staging_bytes=1 << 20) as manager:
        manager.save(1, state, blocking=False)
        base.zero_()  # the snapshot was taken when save returned
        manager.wait()
    loaded = safepoint.load(tmp_path / "step-000000000001")
    assert torch.equal(loaded["a"], torch.arange(1000, dtype=torch.float32))
    assert _storage(loaded["a"]) == _storage(loaded["b"])


def test_restore_applies_views_into_separate_live_tensors(tmp_path: Path) -> None:
    base = torch.arange(6, dtype=torch.float64)
    safepoint.save(tmp_path / "c", {"a": base, "b": base.view(2, 3).t()})
    live = {"a": torch.zeros(6, dtype=torch.float64), "b": torch.zeros(3, 2, dtype=torch.float64)}
    report = safepoint.restore(tmp_path / "c", live)
    assert report.restored == ("a", "b")
    assert torch.equal(live["a"], base)
    assert torch.equal(live["b"], base.view(2, 3).t())


def test_per_rank_entries_with_typed_values_and_ties_round_trip(tmp_path: Path) -> None:
    # a distributed save numbers per-rank entries after the replicated ones: views and typed nodes must follow
    def state(value: float) -> dict[str, Any]:
        shared = torch.full((4,), value)
        own = OrderedDict(w=torch.full((2,), value + 1), pair=[shared, shared[1:]])
        return {"replicated": torch.full((3,), value), "own": safepoint.PerRank(own)}

    saved = state(5.0)
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, saved)
        live = state(0.0)
        manager.restore(live)
    assert_same(live["own"].value, saved["own"].value)
    assert torch.equal(live["replicated"], saved["replicated"])


@pytest.mark.parametrize("mmap", [False, True])
def test_ties_survive_an_mmap_load(tmp_path: Path, mmap: bool) -> None:
    base = torch.arange(8, dtype=torch.int32)
    safepoint.save(tmp_path / "c", {"a": base[2:], "b": base})
    loaded = safepoint.load(tmp_path / "c", mmap=mmap)
    assert _storage(loaded["a"]) == _storage(loaded["b"])
    assert loaded["a"].tolist() == list(range(2, 8))


def test_gpt2_tied_embeddings_are_written_once_and_stay_tied(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    state = model.state_dict()
    untied = OrderedDict((k, v.clone()) for k, v in state.items())
    safepoint.save(tmp_path / "tied", {"model": model})
    safepoint.save(tmp_path / "untied", {"model": untied})
    tied_bytes, untied_bytes = _payload_bytes(tmp_path / "tied"), _payload_bytes(tmp_path / "untied")
    weight_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    # the tied weight is written once: the difference is one copy of it (and a header line)
    assert untied_bytes - tied_bytes >= weight_bytes
    assert untied_bytes - tied_bytes < weight_bytes + 512
    assert len(read_manifest(tmp_path / "tied")["entries"]) == len(state) - 1

    loaded = safepoint.load(tmp_path / "tied")["model"]
    assert_same(loaded, state)
    assert _storage(loaded["lm_head.weight"]) == _storage(loaded["transformer.wte.weight"])

    torch.manual_seed(1)
    fresh = GPT2LMHeadModel(config)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    safepoint.restore(tmp_path / "tied", {"model": fresh})
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert_same(fresh.state_dict(), state)


# -- any set of views of one storage ---------------------------------------------------------------------------
@st.composite
def views_of_one_storage(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    dtype = draw(st.sampled_from([torch.float32, torch.int16, torch.bfloat16, torch.bool, torch.uint8]))
    numel = draw(st.integers(1, 40))
    base = (torch.arange(numel) % 7).to(dtype)
    views: dict[str, torch.Tensor] = {}
    for index in range(draw(st.integers(2, 4))):
        start = draw(st.integers(0, numel - 1))
        length = draw(st.integers(1, numel - start))
        view = base[start : start + length]
        step = draw(st.integers(1, 3))
        view = view[::step]
        operation = draw(st.sampled_from(["none", "grid", "transpose", "expand", "unsqueeze"]))
        if operation in ("grid", "transpose") and view.numel() % 2 == 0 and view.is_contiguous():
            view = view.view(2, -1)
            view = view.t() if operation == "transpose" else view
        elif operation == "expand":
            view = view[:1].expand(3, 2)
        elif operation == "unsqueeze":
            view = view.unsqueeze(0)
        views[f"v{index}"] = view
    return views


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=views_of_one_storage())
def test_any_views_of_one_storage_load_and_restore_exactly(
    tmp_path_factory: pytest.TempPathFactory, state: Any
) -> None:
    path = tmp_path_factory.mktemp("views") / "c"
    safepoint.save(path, state)
    loaded = safepoint.load(path)
    assert_same(loaded, state)
    entries = read_manifest(path)["entries"]
    span = max(
        t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        for t in state.values()
    )
    span -= min(t.storage_offset() for t in state.values())
    if span <= sum(t.numel() for t in state.values()):  # written once, shared again
        assert len(entries) == 1
        assert len({_storage(t) for t in loaded.values()}) == 1
    else:
        assert len(entries) == len(state)
    live = {k: torch.zeros_like(v, memory_format=torch.contiguous_format) for k, v in state.items()}
    safepoint.restore(path, live)
    for key, value in state.items():
        assert tensor_bits(live[key]) == tensor_bits(value), key


# -- a hostile view can never read outside its entry -------------------------------------------------------------
HUGE = st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.one_of(st.integers(0, 40), HUGE),
    shape=st.lists(st.one_of(st.integers(0, 12), HUGE), min_size=0, max_size=3),
    stride=st.lists(st.one_of(st.integers(0, 12), HUGE), min_size=0, max_size=3),
)
def test_a_forged_view_is_refused_or_reads_only_its_entry(
    tmp_path_factory: pytest.TempPathFactory, offset: int, shape: list[int], stride: list[int]
) -> None:
    path = tmp_path_factory.mktemp("forged") / "c"
    base = torch.arange(16, dtype=torch.int64)
    safepoint.save(path, {"a": base, "b": base[1:], "after": torch.full((64,), -1, dtype=torch.int64)})

    def forge(body: dict[str, Any]) -> None:
        body["tree"]["v"][1][1].update(offset=offset, shape=shape, stride=stride)

    edit_manifest(path, forge)
    try:
        loaded = safepoint.load(path)
    except safepoint.CorruptCheckpointError as err:
        refusal = str(err)
    else:
        refusal = ""
    if refusal:
        assert "view" in refusal
        return
    view, entry = loaded["b"], loaded["a"]
    assert list(view.shape) == shape
    assert _storage(view) == _storage(entry)
    first = view.storage_offset() - entry.storage_offset()
    last = first + sum((n - 1) * s for n, s in zip(view.shape, view.stride(), strict=True))
    assert 0 <= first <= 16
    assert view.numel() == 0 or last < 16  # only elements 0..15 of the entry
    if 0 < view.numel() <= 4096:  # a huge stride-0 view is checked by its bounds alone
        expected = torch.as_strided(torch.arange(16), shape, stride, offset)
        assert view.reshape(-1).tolist() == expected.reshape(-1).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("blocking", [True, False])
def test_ties_on_a_gpu_are_written_once(tmp_path: Path, blocking: bool) -> None:
    base = torch.arange(4096, dtype=torch.float32, device="cuda")
    cpu = torch.arange(4096, dtype=torch.float32)  # storages are grouped per device
    state = {"a": base, "b": base[1024:].view(48, 64), "c": cpu, "d": cpu[:10]}
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, state, blocking=blocking)
    entries = read_manifest(tmp_path / "step-000000000001")["entries"]
    assert [(e["key"], e["shape"]) for e in entries] == [("a", [4096]), ("c", [4096])]
    loaded = safepoint.load(tmp_path / "step-000000000001")
    assert_same(loaded, {k: v.cpu() for k, v in state.items()})
    assert _storage(loaded["a"]) == _storage(loaded["b"])
    assert _storage(loaded["c"]) == _storage(loaded["d"])
