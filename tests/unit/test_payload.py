"""Payload files: standard safetensors that other tools read, and every kind of damage to them is detected.

Invariants defended: *visible means complete* (every byte is checked against the manifest before any value is
returned) and *restore is total or nothing* (a damaged checkpoint changes no live object). The safetensors
library is the oracle for the format.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import safepoint
from safepoint import CorruptCheckpointError
from tests.helpers import (
    assert_same,
    edit_manifest,
    join_safetensors,
    payload_paths,
    read_manifest,
    reseal_files,
    split_safetensors,
    tensor_bits,
)

ELEMENT_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def _mixed_state() -> dict[str, Any]:
    """Insertion order alternates element sizes, so a writer that kept it would misalign most tensors."""
    generator = torch.Generator().manual_seed(1)
    return {
        "u8": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=generator),
        "f64": torch.randn(5, dtype=torch.float64, generator=generator),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=generator),
        "bf16": torch.randn(7, dtype=torch.bfloat16, generator=generator),
        "i8": torch.tensor([-1, 2, -3], dtype=torch.int8),
        "f32": torch.randn(2, 3, generator=generator).t(),
        "i16": torch.tensor([1, -2, 3], dtype=torch.int16),
        "f16": torch.randn(1, dtype=torch.float16, generator=generator),
        "i64": torch.tensor([2**62, -(2**63)], dtype=torch.int64),
        "i32": torch.tensor(7, dtype=torch.int32),
        "empty": torch.empty(0, 4, dtype=torch.float32),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32),
        "nested": {0: torch.arange(5, dtype=torch.int64), "0": torch.ones(2, 2, dtype=torch.float16)},
        "__metadata__": torch.zeros(1),  # the name safetensors reserves
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.float64(2.5),
    }


def _originals(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(key path, tensor) in state order, which is the order of the manifest's entries."""
    result: list[tuple[str, torch.Tensor]] = []
    for key, value in state.items():
        if isinstance(value, dict):
            result += [(f"{key}/{k}", v) for k, v in value.items()]
        elif isinstance(value, (np.ndarray, np.generic)):
            result.append((key, torch.from_numpy(np.asarray(value))))
        else:
            result.append((key, value))
    return result


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("payload") / "checkpoint"
    state = _mixed_state()
    safepoint.save(path, state)
    return path, state


# -- the files are standard safetensors ---------------------------------------------------------------------------
def test_payload_files_open_with_the_safetensors_library(mixed: tuple[Path, dict[str, Any]]) -> None:
    path, state = mixed
    manifest = read_manifest(path)
    expected = _originals(state)
    assert [e["key"] for e in manifest["entries"]] == [key for key, _ in expected]
    seen = 0
    for index, record in enumerate(manifest["files"]):
        file = path / record["path"]
        entries = [(e, expected[i][1]) for i, e in enumerate(manifest["entries"]) if e["file"] == index]
        with safe_open(str(file), framework="pt") as handle:
            assert set(handle.keys()) == {e["name"] for e, _ in entries}
            assert handle.metadata() == {"format": "pt", "writer": "safepoint"}
            for entry, tensor in entries:
                assert_same(handle.get_tensor(entry["name"]), tensor, entry["key"])
                seen += 1
        loaded = load_file(str(file))
        for entry, tensor in entries:
            assert_same(loaded[entry["name"]], tensor, entry["key"])
    assert seen == len(expected)


def test_tensors_are_aligned_and_packed(mixed: tuple[Path, dict[str, Any]]) -> None:
    path, _ = mixed
    for file in payload_paths(path):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        assert (8 + length) % 8 == 0, "the data section starts 8-byte aligned"
        text = data[8 : 8 + length]
        stripped = text.rstrip(b" ")
        assert stripped.endswith(b"}"), "the header is padded with spaces only"
        assert len(text) - len(stripped) < 8
        header = json.loads(stripped)
        header.pop("__metadata__")
        spans = sorted((spec["data_offsets"][0], spec["data_offsets"][1], spec["dtype"]) for spec in header.values())
        position = 0
        for begin, end, dtype in spans:
            assert begin == position, "tensors are packed with no gaps or overlaps"
            assert begin % ELEMENT_SIZE[dtype] == 0, f"a {dtype} tensor starts at {begin}"
            position = end
        assert 8 + length + position == len(data), "nothing follows the last tensor"


def test_load_returns_the_mixed_state(mixed: tuple[Path, dict[str, Any]]) -> None:
    path, state = mixed
    assert_same(safepoint.load(path), state)


def test_ten_thousand_small_tensors_round_trip(tmp_path: Path) -> None:
    dtypes = [torch.float32, torch.int8, torch.float64, torch.bfloat16, torch.bool, torch.int64, torch.float16]
    state = {
        "params": {i: torch.full((i % 5,), i % 100, dtype=dtypes[i % len(dtypes)]) for i in range(10_000)},
        "names": [f"p{i}" for i in range(100)],
    }
    safepoint.save(tmp_path / "c", state)
    assert_same(safepoint.load(tmp_path / "c"), state)
    assert safepoint.verify(tmp_path / "c").ok
    names = 0
    for file in payload_paths(tmp_path / "c"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                index = int(name.split("/")[1])
                assert_same(handle.get_tensor(name), state["params"][index], name)
                names += 1
    assert names == 10_000


def test_large_tensors_between_small_ones_round_trip(tmp_path: Path) -> None:
    # sizes on both sides of the write buffer's coalescing threshold (1 MiB) and its chunk size (8 MiB)
    generator = torch.Generator().manual_seed(2)
    state = {
        "a": torch.randint(0, 255, (9 << 20,), dtype=torch.uint8, generator=generator),
        "b": torch.randn(3, generator=generator),
        "c": torch.randn((1 << 20) // 4 - 1, generator=generator),
        "d": torch.randn(1 << 18, dtype=torch.float64, generator=generator)[::2],
        "e": [torch.randn(200_000, generator=generator) for _ in range(25)],  # more than the 16 MiB buffer
    }
    safepoint.save(tmp_path / "c", state)
    assert_same(safepoint.load(tmp_path / "c"), state)
    loaded = load_file(str(payload_paths(tmp_path / "c")[0]))
    assert tensor_bits(loaded["a"]) == tensor_bits(state["a"])


# -- damage is detected, by load, verify and restore ------------------------------------------------------------------
@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "checkpoint"
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int8)}
    safepoint.save(path, state)
    return path, state


@pytest.fixture
def paged(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A payload of several 4 KiB pages."""
    path = tmp_path / "checkpoint"
    state = {"w": torch.randn(4096, generator=torch.Generator().manual_seed(3)), "n": torch.arange(10)}
    safepoint.save(path, state)
    return path, state


def _live(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.full_like(v, 7) for k, v in state.items()}


def _assert_detected(checkpoint: Path, bad: Path, state: dict[str, Any]) -> None:
    """load, verify and restore all refuse the damaged checkpoint and name ``bad``; the live state is untouched."""
    with pytest.raises(CorruptCheckpointError) as info:
        safepoint.load(checkpoint)
    assert info.value.path == str(bad)
    assert str(bad) in str(info.value)
    report = safepoint.verify(checkpoint)
    assert not report.ok
    assert [c.bad_file for c in report.checkpoints] == [str(bad)]
    live = _live(state)
    before = {k: (v, tensor_bits(v)) for k, v in live.items()}
    with pytest.raises(CorruptCheckpointError):
        safepoint.restore(checkpoint, live)
    for key, (tensor, bits) in before.items():
        assert live[key] is tensor
        assert tensor_bits(live[key]) == bits


def test_a_healthy_checkpoint_verifies(small: tuple[Path, dict[str, Any]]) -> None:
    path, state = small
    report = safepoint.verify(path)
    assert report.ok
    assert [c.bad_file for c in report.checkpoints] == [None]
    assert_same(safepoint.load(path), state)


def test_a_flipped_bit_anywhere_in_a_payload_file_is_detected(small: tuple[Path, dict[str, Any]]) -> None:
    path, state = small
    (file,) = payload_paths(path)
    original = file.read_bytes()
    assert len(original) > 100
    for position in range(len(original)):  # every byte: the length prefix, the header, its padding, the data
        damaged = bytearray(original)
        damaged[position] ^= 1 << (position % 8)
        file.write_bytes(damaged)
        _assert_detected(path, file, state)
    file.write_bytes(original)
    assert_same(safepoint.load(path), state)


def test_a_flipped_bit_anywhere_in_the_manifest_is_detected(small: tuple[Path, dict[str, Any]]) -> None:
    path, state = small
    manifest = path / "manifest.json"
    original = manifest.read_bytes()
    for position in range(len(original)):  # an ASCII manifest: no flip can leave its content the same
        damaged = bytearray(original)
        damaged[position] ^= 1 << (position % 8)
        manifest.write_bytes(damaged)
        _assert_detected(path, manifest, state)
    manifest.write_bytes(original)
    assert_same(safepoint.load(path), state)


@pytest.mark.parametrize("keep", [0, 1, 7, 8, 9, "header", "minus one"])
def test_truncation_is_detected(small: tuple[Path, dict[str, Any]], keep: int | str) -> None:
    path, state = small
    (file,) = payload_paths(path)
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    size = {"header": 8 + length, "minus one": len(data) - 1}.get(str(keep), keep)
    assert isinstance(size, int)
    file.write_bytes(data[:size])
    _assert_detected(path, file, state)


@pytest.mark.parametrize("garbage", [b"\x00", b" ", b"x" * 4096])
def test_appended_garbage_is_detected(small: tuple[Path, dict[str, Any]], garbage: bytes) -> None:
    path, state = small
    (file,) = payload_paths(path)
    with open(file, "ab") as handle:
        handle.write(garbage)
    _assert_detected(path, file, state)


@pytest.mark.parametrize("page", [0, 1, 2, -1])
def test_a_zeroed_page_is_detected(paged: tuple[Path, dict[str, Any]], page: int) -> None:
    path, state = paged
    (file,) = payload_paths(path)
    data = bytearray(file.read_bytes())
    assert len(data) > 4 * 4096
    start = (len(data) // 4096) * 4096 if page == -1 else page * 4096
    data[start : start + 4096] = bytes(len(data[start : start + 4096]))
    file.write_bytes(data)
    _assert_detected(path, file, state)


def test_a_deleted_payload_file_is_detected(small: tuple[Path, dict[str, Any]]) -> None:
    path, state = small
    (file,) = payload_paths(path)
    file.unlink()
    _assert_detected(path, file, state)


def test_a_deleted_attempt_directory_is_detected(small: tuple[Path, dict[str, Any]]) -> None:
    path, state = small
    (file,) = payload_paths(path)
    shutil.rmtree(file.parent)
    _assert_detected(path, file, state)


def test_payload_files_swapped_between_checkpoints_are_detected(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    state_one = {"w": torch.zeros(16), "step": torch.tensor(1)}
    state_two = {"w": torch.ones(16), "step": torch.tensor(2)}
    safepoint.save(first, state_one)
    safepoint.save(second, state_two)
    (file_one,), (file_two,) = payload_paths(first), payload_paths(second)
    data_one, data_two = file_one.read_bytes(), file_two.read_bytes()
    assert len(data_one) == len(data_two), "same layout: only the checksum can tell them apart"
    file_one.write_bytes(data_two)
    file_two.write_bytes(data_one)
    _assert_detected(first, file_one, state_one)
    _assert_detected(second, file_two, state_two)


def test_a_file_replaced_by_one_of_the_same_size_is_detected(small: tuple[Path, dict[str, Any]]) -> None:
    path, state = small
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    file.write_bytes(join_safetensors(header, bytes(len(section))))  # a valid safetensors file, all zeros
    assert file.stat().st_size == read_manifest(path)["files"][0]["size"]
    _assert_detected(path, file, state)


# -- a file whose checksums were forged must still agree with the manifest --------------------------------------------
def _forge(path: Path, change: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]) -> Path:
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    header, section = change(header, section)
    file.write_bytes(join_safetensors(header, section))
    reseal_files(path)
    return file


def _retype(header: dict[str, Any], section: bytes) -> tuple[dict[str, Any], bytes]:
    header["w"]["dtype"] = "I32"
    return header, section


def _reshape(header: dict[str, Any], section: bytes) -> tuple[dict[str, Any], bytes]:
    header["w"]["shape"] = [4, 3]
    return header, section


def _rename(header: dict[str, Any], section: bytes) -> tuple[dict[str, Any], bytes]:
    header["w2"] = header.pop("w")
    return header, section


def _extra(header: dict[str, Any], section: bytes) -> tuple[dict[str, Any], bytes]:
    header["extra"] = {"dtype": "U8", "shape": [1], "data_offsets": [len(section), len(section) + 1]}
    return header, section + b"\x00"


def _offsets(begin: int, end: int) -> Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]:
    def change(header: dict[str, Any], section: bytes) -> tuple[dict[str, Any], bytes]:
        header["w"]["data_offsets"] = [begin, end]
        return header, section

    return change


def _spec(spec: Any) -> Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]:
    def change(header: dict[str, Any], section: bytes) -> tuple[dict[str, Any], bytes]:
        header["w"] = spec
        return header, section

    return change


FORGED: list[tuple[str, Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]]] = [
    ("dtype", _retype),
    ("shape", _reshape),
    ("renamed", _rename),
    ("extra tensor", _extra),
    ("offsets past the end", _offsets(0, 1 << 40)),
    ("offsets reversed", _offsets(48, 0)),
    ("offsets too short", _offsets(0, 44)),
    ("offsets negative", _offsets(-8, 40)),
    ("offsets floats", _offsets(0.0, 48.0)),  # type: ignore[arg-type]
    ("spec not a dict", _spec([1, 2])),
    ("spec extra field", _spec({"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48], "x": 1})),
    ("spec offsets missing", _spec({"dtype": "F32", "shape": [3, 4]})),
]


@pytest.mark.parametrize("change", [c for _, c in FORGED], ids=[n for n, _ in FORGED])
def test_a_re_checksummed_header_that_disagrees_with_the_manifest_is_corrupt(
    small: tuple[Path, dict[str, Any]], change: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]
) -> None:
    path, state = small
    file = _forge(path, change)
    _assert_detected(path, file, state)


@pytest.mark.parametrize(
    "header",
    [b"[]", b"not json", b'{"a": ' * 100_000, b"\xff\xfe", b'"w"', b"{}"],
    ids=["list", "text", "deep", "binary", "string", "empty object"],
)
def test_a_re_checksummed_header_that_is_not_a_header_is_corrupt(
    small: tuple[Path, dict[str, Any]], header: bytes
) -> None:
    path, state = small
    (file,) = payload_paths(path)
    _, section = split_safetensors(file.read_bytes())
    file.write_bytes(struct.pack("<Q", len(header)) + header + section)
    reseal_files(path)
    _assert_detected(path, file, state)


def test_a_misaligned_but_valid_file_from_another_writer_still_loads(tmp_path: Path) -> None:
    # safetensors files written elsewhere need not align tensors: the reader copies rather than failing
    path = tmp_path / "checkpoint"
    state = {"b": torch.tensor([1], dtype=torch.uint8), "w": torch.arange(4, dtype=torch.float64)}
    safepoint.save(path, state)
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    w_begin, w_end = header["w"]["data_offsets"]
    b_begin, b_end = header["b"]["data_offsets"]
    # put the one-byte tensor first, so the float64 one starts at an odd offset
    section = section[b_begin:b_end] + section[w_begin:w_end]
    header["b"]["data_offsets"] = [0, 1]
    header["w"]["data_offsets"] = [1, 1 + (w_end - w_begin)]
    file.write_bytes(join_safetensors(header, section))
    reseal_files(path)
    assert_same(safepoint.load(path), state)


def test_damage_in_one_step_of_a_manager_directory_names_that_step(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        for step in range(3):
            manager.save(step, {"w": torch.full((8,), float(step))})
    damaged = next(p for p in (tmp_path / "run").rglob("*.safetensors") if "step-000000000001" in str(p))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(data)
    report = safepoint.verify(tmp_path / "run")
    assert not report.ok
    assert [(c.step, c.ok) for c in report.checkpoints] == [(0, True), (1, False), (2, True)]
    assert report.bad[0].bad_file == str(damaged)
    assert os.path.exists(damaged)  # verify reports, it never deletes


def test_a_numpy_scalar_stored_with_shape_one_still_loads_as_a_scalar(tmp_path: Path) -> None:
    # before 0-d arrays kept their shape, numpy scalars were written as shape [1]: those files must still load
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"s": np.float32(2.5)})
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    assert header["s"]["shape"] == []
    header["s"]["shape"] = [1]
    file.write_bytes(join_safetensors(header, section))
    reseal_files(path)
    edit_manifest(path, lambda body: body["entries"][0].update(shape=[1]))
    assert_same(safepoint.load(path), {"s": np.float32(2.5)})
