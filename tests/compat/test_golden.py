"""Golden checkpoints: every released format version stays readable, value for value, bit for bit.

Each ``format_v<N>/`` was written once by ``make_fixtures.py`` with the safepoint of that version; its
``expected.json`` holds the source values, serialised by that script's own encoder (no safepoint code). The
current code must load every one of them and reproduce the expected values exactly, restore them into live
objects, and verify every byte. The fixtures are read in place and never written: anything that could write
(a manager, which collects leftovers) works on a copy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import shutil
import types
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safepoint
from tests.helpers import assert_same

ROOT = Path(__file__).resolve().parent
FIXTURES = sorted(ROOT.glob("format_v*"), key=lambda p: int(p.name.removeprefix("format_v")))


def decode(record: dict[str, Any]) -> Any:
    """The inverse of make_fixtures.encode."""
    kind = record["t"]
    if kind == "none":
        return None
    if kind in ("bool", "str"):
        return record["v"]
    if kind == "int":
        return int(record["v"])
    if kind == "float":
        return float.fromhex(record["hex"])
    if kind == "bytes":
        return bytes.fromhex(record["hex"])
    if kind == "npscalar":
        return np.frombuffer(bytes.fromhex(record["hex"]), dtype=np.dtype(record["dtype"]))[0]
    if kind == "ndarray":
        data = np.frombuffer(bytes.fromhex(record["hex"]), dtype=np.dtype(record["dtype"]))
        return data.reshape(record["shape"]).copy()
    if kind == "tensor":
        dtype = getattr(torch, record["dtype"])
        raw = torch.frombuffer(bytearray.fromhex(record["hex"]), dtype=torch.uint8) if record["hex"] else None
        flat = raw.view(dtype) if raw is not None else torch.empty(0, dtype=dtype)
        return flat.reshape(record["shape"]).clone()
    if kind == "dict":
        return {decode(k): decode(v) for k, v in record["items"]}
    if kind == "list":
        return [decode(v) for v in record["items"]]
    if kind == "tuple":
        return tuple(decode(v) for v in record["items"])
    if kind == "pickled":
        return decode(record["value"])  # what safepoint.load returns once the entry is allowed to unpickle
    return _decode_typed(kind, record)


def _decode_typed(kind: str, record: dict[str, Any]) -> Any:
    """Records of the values format 2 brings back as their own type."""

    def pairs() -> dict[Any, Any]:
        return {decode(k): decode(v) for k, v in record["items"]}

    if kind in ("OrderedDict", "Counter"):
        return {"OrderedDict": OrderedDict, "Counter": Counter}[kind](pairs())
    if kind == "defaultdict":
        factories = {"None": None, "list": list, "dict": dict, "set": set, "int": int, "OrderedDict": OrderedDict}
        return defaultdict(factories[record["factory"]], pairs())
    if kind in ("set", "frozenset"):
        return {"set": set, "frozenset": frozenset}[kind](decode(v) for v in record["items"])
    if kind == "bytearray":
        return bytearray.fromhex(record["hex"])
    if kind == "complex":
        return complex(float.fromhex(record["real"]), float.fromhex(record["imag"]))
    if kind in ("Namespace", "SimpleNamespace"):
        return {"Namespace": argparse.Namespace, "SimpleNamespace": types.SimpleNamespace}[kind](**pairs())
    if kind == "path":
        return getattr(pathlib, record["class"])(record["v"])
    if kind == "Size":
        return torch.Size(decode(v) for v in record["items"])
    if kind == "dtype":
        return getattr(torch, record["v"])
    if kind == "device":
        return torch.device(record["v"])
    if kind == "AttributeDict":
        return importlib.import_module(record["module"]).AttributeDict(pairs())
    raise AssertionError(f"unknown record kind {kind!r}")


def _expected(fixture: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((fixture / "expected.json").read_text())
    return result


def _checkpoint(fixture: Path) -> Path:
    (step_dir,) = (fixture / "run").iterdir()
    return step_dir


def test_every_format_version_has_a_golden_fixture() -> None:
    versions = [int(p.name.removeprefix("format_v")) for p in FIXTURES]
    assert versions == list(range(1, safepoint.FORMAT_VERSION + 1))


@pytest.fixture(params=FIXTURES, ids=[p.name for p in FIXTURES])
def fixture(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_the_manifest_says_what_the_fixture_was_written_as(fixture: Path) -> None:
    expected = _expected(fixture)
    manifest = json.loads((_checkpoint(fixture) / "manifest.json").read_text())
    assert manifest["format_version"] == expected["format_version"] == int(fixture.name.removeprefix("format_v"))
    assert manifest["step"] == expected["step"]
    assert manifest["metrics"] == expected["metrics"]
    assert manifest["state_version"] == expected["state_version"]


def test_a_golden_checkpoint_loads_to_the_expected_values(fixture: Path) -> None:
    loaded = safepoint.load(_checkpoint(fixture), allow_pickle=["pickled"])
    assert_same(loaded, decode(_expected(fixture)["state"]))


def _at(values: Any, key: str) -> Any:
    for part in key.split("/"):
        values = values[part]
    return values


def test_tensors_that_shared_storage_share_it_after_a_load(fixture: Path) -> None:
    loaded = safepoint.load(_checkpoint(fixture), allow_pickle=["pickled"])
    groups = _expected(fixture).get("shared", [])
    assert bool(groups) == (int(fixture.name.removeprefix("format_v")) >= 2)  # format 1 wrote ties twice
    for keys in groups:
        assert len({_at(loaded, key).untyped_storage().data_ptr() for key in keys}) == 1, keys


def test_a_golden_checkpoint_verifies_every_byte(fixture: Path) -> None:
    report = safepoint.verify(fixture / "run")
    assert [(s.step, s.ok) for s in report.checkpoints] == [(_expected(fixture)["step"], True)]


def live_state(fixture: Path = FIXTURES[0]) -> dict[str, Any]:
    """The structure of make_fixtures.source_state, with other values: a fresh run about to resume."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    saved = safepoint.load(_checkpoint(fixture), allow_pickle=["pickled"])
    tensors = {k: torch.zeros_like(v) for k, v in saved["tensors"].items()}
    arrays = {k: np.zeros_like(v) if isinstance(v, np.ndarray) else v for k, v in saved["arrays"].items()}
    state = {
        "model": model,
        "optimizer": optimizer,
        "tensors": tensors,
        "arrays": arrays,
        "config": {k: None for k in saved["config"]},
        "pickled": safepoint.Pickled(None),
    }
    if "tied" in saved:  # format 2
        state["tied"] = {k: torch.zeros_like(v) for k, v in saved["tied"].items()}
        state["typed"] = {k: None for k in saved["typed"]}
    if "sharded" in saved:  # format 3: DTensors saved by 2 ranks, restored into plain tensors (assembled)
        state["sharded"] = {k: torch.zeros_like(v) for k, v in saved["sharded"].items()}
    return state


def test_a_golden_checkpoint_restores_into_live_objects(fixture: Path, tmp_path: Path) -> None:
    run = shutil.copytree(fixture / "run", tmp_path / "run")
    state = live_state(fixture)
    with safepoint.CheckpointManager(run) as manager:
        report = manager.restore(state)
    expected = decode(_expected(fixture)["state"])
    assert report is not None
    assert report.step == _expected(fixture)["step"]
    assert report.format_version == int(fixture.name.removeprefix("format_v"))
    assert report.migrations == ()
    assert_same(dict(state["model"].state_dict()), dict(expected["model"]))
    assert_same(state["optimizer"].state_dict()["state"], expected["optimizer"]["state"])
    assert_same(state["tensors"], expected["tensors"])
    assert_same(state["config"], expected["config"])
    assert state["pickled"].value == expected["pickled"]
    if "tied" in expected:
        assert_same(state["tied"], expected["tied"])
        assert_same(state["typed"], expected["typed"])
    if "sharded" in expected:
        assert_same(state["sharded"], expected["sharded"])
