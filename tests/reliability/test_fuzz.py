"""Fuzz targets for the two parsers that read untrusted bytes: the manifest and the payload (safetensors) header.

Property: whatever the bytes, a reader either returns values or raises a SafepointError; never another exception,
never a hang. Mutations are sealed with valid checksums where that gets them past the checksum to the parser
proper. CI runs a few hundred examples each; ``SAFEPOINT_FUZZ_EXAMPLES=20000`` (scripts/reliability.py --full)
runs more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepoint
from safepoint import SafepointError
from safepoint._manifest import Manifest
from tests.helpers import join_safetensors, payload_paths, read_manifest, reseal_files, seal, split_safetensors

EXAMPLES = int(os.environ.get("SAFEPOINT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "checkpoint"
    tied = torch.arange(12, dtype=torch.float32)
    state = {
        "model": {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)},
        "progress": {"epoch": 2, "losses": [0.5, 0.25], "name": "run", 7: (1, None)},
        # format 2 node kinds: views of one storage, and typed values
        "tied": {"whole": tied, "grid": tied.view(3, 4).t(), "tail": tied[5:]},
        "typed": {"od": OrderedDict(a=1), "seen": {1, "x"}, "size": torch.Size([2]), "dtype": torch.float16},
    }
    safepoint.save(path, state, metrics={"loss": 0.1})
    return path


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _nodes(item, (*path, index))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replace(value[head], tuple(rest), new)
    return copy


def _parse(data: bytes) -> None:
    with contextlib.suppress(SafepointError):  # anything else fails the test
        Manifest.from_json(data, "fuzzed manifest.json")


@FUZZ
@given(data=st.data())
def test_any_resealed_manifest_edit_parses_or_is_refused(original: Path, data: st.DataObject) -> None:
    body = read_manifest(original)
    path = data.draw(st.sampled_from(_nodes(body)[1:]), label="node")
    _parse(seal(_replace(body, path, data.draw(JSON, label="value"))))


@FUZZ
@given(data=st.data())
def test_any_byte_mutation_of_a_manifest_parses_or_is_refused(original: Path, data: st.DataObject) -> None:
    raw = bytearray((original / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        offset = data.draw(st.integers(0, len(raw)), label="offset")
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]), label="action")
        if action == "flip" and offset < len(raw):
            raw[offset] ^= data.draw(st.integers(1, 255), label="mask")
        elif action == "insert":
            raw[offset:offset] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        else:
            del raw[offset : offset + data.draw(st.integers(1, 8), label="length")]
    _parse(bytes(raw))


@FUZZ
@given(data=st.data())
def test_any_resealed_payload_header_edit_loads_or_is_refused(
    original: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    copy = tmp_path_factory.mktemp("case") / "checkpoint"
    shutil.copytree(original, copy)
    (payload,) = payload_paths(copy)
    header, section = split_safetensors(payload.read_bytes())
    path = data.draw(st.sampled_from(_nodes(header)[1:]), label="node")
    mutated = _replace(header, path, data.draw(JSON, label="value"))
    if data.draw(st.booleans(), label="raw header"):
        text = json.dumps(mutated).encode()
        payload.write_bytes(len(text).to_bytes(8, "little") + text + section)
    else:
        payload.write_bytes(join_safetensors(mutated, section))
    reseal_files(copy)
    with contextlib.suppress(SafepointError):  # anything else fails the test
        safepoint.load(copy)
    shutil.rmtree(copy.parent)
