"""``safepoint import`` of ``torch.distributed.checkpoint`` (DCP) directories, written by the real ``dcp.save``.

Invariants defended: *no code runs on load* (a hostile ``.metadata`` or bytes item is refused and its canary never
appears; a path in the metadata cannot leave the directory) and *visible means complete* (a truncated, bit-flipped
or inconsistent DCP checkpoint is refused with a typed error naming the file and the key, and leaves no
destination). The expected values never come from the code under test: the single-process source is cloned before
``dcp.save``, and the FSDP2 run gathers ``full_tensor()`` and torch.saves it (tests/workers/dcp_writer.py).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import shlex
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

import safepoint
from safepoint import ConversionError, CorruptCheckpointError, UnsafeCheckpointError
from safepoint._cli import main
from tests.distributed.group import run_group
from tests.helpers import assert_same, audit_events


class _Reduce:
    """Pickles as a call of ``function(*args)``: what a malicious pickle does when it is loaded."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.function, self.args


def _save(state: dict[str, Any], folder: Path) -> None:
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=folder)


def _training_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "progress": {"step": 7, "name": "run-1", "history": [torch.arange(3), 0.5]},
    }


def sorted_keys(value: Any) -> Any:
    """The value with every dict's keys in one order: DCP's metadata keeps its own order, not the state's."""
    if isinstance(value, dict):
        return {k: sorted_keys(value[k]) for k in sorted(value, key=lambda k: (type(k).__name__, str(k)))}
    if isinstance(value, list):
        return [sorted_keys(v) for v in value]
    return value


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A DCP checkpoint saved in one process without a process group, and the values it was given."""
    folder = tmp_path_factory.mktemp("single") / "dcp"
    state = _training_state()
    expected = copy.deepcopy(state)
    _save(state, folder)
    return folder, expected


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A DCP checkpoint of an FSDP2 model and its AdamW state, saved by a real 2-rank gloo group, and the full
    values that run gathered with full_tensor()."""
    root = tmp_path_factory.mktemp("fsdp")
    ranks = run_group("", 2, root / "dcp", root / "out", worker="tests.workers.dcp_writer", deadline=120)
    assert [r.returncode for r in ranks] == [0, 0], [r.output[-3000:] for r in ranks]
    expected = torch.load(root / "out" / "expected.pt", weights_only=True)
    return root / "dcp", expected


@pytest.fixture
def copied(single: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A copy of the single-process checkpoint, for a test to damage."""
    folder = tmp_path / "source"
    folder.mkdir()
    for item in single[0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    return folder


def rewrite_metadata(folder: Path, change: Callable[[Metadata], Any]) -> None:
    """Unpickle the .metadata torch wrote in this test (trusted: it is ours), change it and write it back."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def tensor_key(metadata: Metadata, key: str) -> TensorStorageMetadata:
    found = metadata.state_dict_metadata[key]
    assert isinstance(found, TensorStorageMetadata)
    return found


# -- real checkpoints come in whole -----------------------------------------------------------------------------
def test_single_process_checkpoint_imports_every_value_bit_for_bit(
    single: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    source, expected = single
    report = safepoint.import_checkpoint(source, tmp_path / "imported")
    assert report.kind == "dcp"
    assert report.checkpoint.step == 0
    assert sorted(report.entries) == ["model", "optim", "progress"]
    assert report.skipped == ()
    assert_same(sorted_keys(safepoint.load(tmp_path / "imported")), sorted_keys(expected))


def test_fsdp2_checkpoint_of_two_ranks_imports_the_full_tensors(
    fsdp: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    source, expected = fsdp
    assert sorted(p.name for p in source.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    report = safepoint.import_checkpoint(source, tmp_path / "imported")
    assert report.kind == "dcp"
    loaded = safepoint.load(tmp_path / "imported")
    assert_same(sorted_keys(loaded), sorted_keys(expected))
    assert loaded["model"]["0.weight"].shape == (13, 5)  # 7 + 6 rows from the two ranks
    assert loaded["model"]["2.bias"].shape == (1,)  # 1 + 0 rows: rank 1's shard is empty


def test_imported_optimizer_state_restores_into_a_plain_model(
    fsdp: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """DCP writes the optimizer's int parameter ids as strings; with them left so, load_state_dict would silently
    drop the moments. The import gives them back their ints, so a restore brings the moments in."""
    source, expected = fsdp
    safepoint.import_checkpoint(source, tmp_path / "imported")
    model = torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.ReLU(), torch.nn.Linear(13, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    safepoint.restore(tmp_path / "imported", {"model": model, "optim": optimizer}, strict=False)
    restored = optimizer.state_dict()["state"]
    assert sorted(restored) == [0, 1, 2, 3]
    for index in range(4):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert_same(restored[index][name], expected["optim"]["state"][index][name], f"state/{index}/{name}")
    assert_same(model.state_dict()["0.weight"], expected["model"]["0.weight"])


def test_cli_imports_a_dcp_directory_that_then_verifies(
    single: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "imported"
    assert main(["import", str(single[0]), str(dest)]) == 0
    out = capsys.readouterr().out
    assert "imported dcp" in out
    assert "entries: model, optim, progress" in out
    assert main(["verify", str(dest)]) == 0
    assert_same(sorted_keys(safepoint.load(dest)), sorted_keys(single[1]))


def test_cli_import_of_a_hostile_metadata_exits_1_and_runs_nothing(
    copied: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "canary"
    (copied / ".metadata").write_bytes(pickle.dumps(_hostile("os.system", canary)))
    assert main(["import", str(copied), str(tmp_path / "imported")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "asks for the global posix.system" in captured.err
    assert not canary.exists()
    assert not (tmp_path / "imported").exists()


def test_lightning_meta_pt_is_merged_and_gives_the_step(
    single: tuple[Path, dict[str, Any]], copied: Path, tmp_path: Path
) -> None:
    torch.save({"global_step": 12, "epoch": 1, "loops": {"fit": {"done": 3}}}, copied / "meta.pt")
    report = safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert report.checkpoint.step == 12
    loaded = safepoint.load(tmp_path / "imported")
    assert loaded["global_step"] == 12
    assert loaded["loops"] == {"fit": {"done": 3}}
    assert_same(sorted_keys(loaded["model"]), sorted_keys(single[1]["model"]))


def test_files_the_metadata_does_not_name_are_listed_as_skipped(copied: Path, tmp_path: Path) -> None:
    (copied / "__9_0.distcp").write_bytes(b"left by another save")
    (copied / ".metadata.tmp").write_bytes(b"an unfinished save's metadata")
    report = safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert report.skipped == (
        ".metadata.tmp: not a DCP file",
        "__9_0.distcp: a .distcp file the metadata does not name",
    )


def test_without_planner_data_the_flat_keys_are_kept_and_said(copied: Path, tmp_path: Path) -> None:
    rewrite_metadata(copied, lambda metadata: setattr(metadata, "planner_data", None))
    report = safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert "model.0.weight" in report.entries
    assert any("planner_data" in note for note in report.skipped)


# -- hostile input runs nothing -----------------------------------------------------------------------------------
def _hostile(kind: str, canary: Path) -> Any:
    code = f"open({str(canary)!r}, 'w').close()"
    if kind == "os.system":
        return _Reduce(os.system, f"touch {shlex.quote(str(canary))}")
    if kind == "eval":
        return _Reduce(eval, code)
    return _Reduce(subprocess.Popen, [sys.executable, "-c", code])


@pytest.mark.parametrize(
    ("kind", "refused"), [("os.system", "posix.system"), ("eval", "builtins.eval"), ("subprocess", "subprocess.Popen")]
)
@pytest.mark.parametrize("where", ["the whole file", "inside real metadata"])
def test_hostile_metadata_is_refused_and_runs_nothing(
    copied: Path, tmp_path: Path, kind: str, refused: str, where: str
) -> None:
    live = pickle.loads(pickle.dumps(_hostile(kind, tmp_path / "control")))
    if isinstance(live, subprocess.Popen):
        live.wait(timeout=60)
    assert (tmp_path / "control").exists()  # the payload is live
    canary = tmp_path / "canary"
    evil = _hostile(kind, canary)
    if where == "the whole file":
        (copied / ".metadata").write_bytes(pickle.dumps(evil))
    else:
        rewrite_metadata(copied, lambda metadata: setattr(metadata, "planner_data", {"model.0.weight": evil}))
    with audit_events() as events, pytest.raises(UnsafeCheckpointError) as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert str(copied / ".metadata") in str(caught.value)
    assert refused in str(caught.value)
    assert not canary.exists()
    assert not [e for e, _ in events if e.startswith(("os.system", "subprocess.", "os.exec", "os.posix_spawn"))]
    assert not (tmp_path / "imported").exists()


def _size_of_a_string(metadata: Metadata) -> None:
    tensor_key(metadata, "model.0.weight").size = _Reduce(torch.Size, "touch x")  # type: ignore[assignment]


def _metadata_for_a_tensor(metadata: Metadata) -> None:
    metadata.state_dict_metadata["model.0.weight"] = _Reduce(Metadata, "a", 1, 2)  # type: ignore[assignment]


def _storage_data_of_the_wrong_class(metadata: Metadata) -> None:
    metadata.storage_data = _Reduce(TensorStorageMetadata, 1, 2, 3)


def _version_not_a_string(metadata: Metadata) -> None:
    metadata.version = torch.Size([1])  # type: ignore[assignment]


@pytest.mark.parametrize(
    "change", [_size_of_a_string, _metadata_for_a_tensor, _storage_data_of_the_wrong_class, _version_not_a_string]
)
def test_allowed_classes_built_with_unexpected_arguments_are_corrupt(
    copied: Path, tmp_path: Path, change: Callable[[Metadata], Any]
) -> None:
    rewrite_metadata(copied, change)
    with pytest.raises(CorruptCheckpointError) as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert type(caught.value) is CorruptCheckpointError  # not an unsafe global: each of these is allowed
    assert str(copied / ".metadata") in str(caught.value)
    assert not (tmp_path / "imported").exists()


def test_metadata_of_lists_nested_100_000_deep_is_corrupt_not_a_recursion_error(copied: Path, tmp_path: Path) -> None:
    (copied / ".metadata").write_bytes(b"(" * 100_000 + b"l" * 100_000 + b".")  # protocol 0: MARK ... LIST
    with pytest.raises(CorruptCheckpointError, match="expected a Metadata, found list"):
        safepoint.import_checkpoint(copied, tmp_path / "imported")


def test_bytes_item_that_needs_arbitrary_pickle_is_refused_naming_its_key(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _save({"model": {"w": torch.ones(2)}, "extra": {"hook": _hostile("os.system", canary)}}, tmp_path / "source")
    with pytest.raises(UnsafeCheckpointError) as caught:
        safepoint.import_checkpoint(tmp_path / "source", tmp_path / "imported")
    assert "'extra.hook'" in str(caught.value)
    assert not canary.exists()
    assert not (tmp_path / "imported").exists()


# -- damaged or inconsistent checkpoints are refused ---------------------------------------------------------------
def test_truncated_distcp_is_refused_naming_file_and_key(copied: Path, tmp_path: Path) -> None:
    data = copied / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="truncated") as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert str(data) in str(caught.value)
    assert "'" in str(caught.value).split("places", 1)[1]  # the key the missing bytes belong to
    assert not (tmp_path / "imported").exists()


def test_flipped_byte_in_a_chunk_is_found_by_torch_saves_crc(copied: Path, tmp_path: Path) -> None:
    """DCP itself loads this one without a word (its reader does not check the CRC-32 torch.save recorded)."""
    metadata = pickle.loads((copied / ".metadata").read_bytes())
    item = next(info for index, info in metadata.storage_data.items() if index.fqn == "model.0.weight")
    data = bytearray((copied / item.relative_path).read_bytes())
    stream = bytes(data[item.offset : item.offset + item.length])
    entry = next(e for e in zipfile.ZipFile(io.BytesIO(stream)).infolist() if e.filename.endswith("/data/0"))
    name_length, extra_length = struct.unpack_from("<HH", stream, entry.header_offset + 26)  # local file header
    data[item.offset + entry.header_offset + 30 + name_length + extra_length] ^= 0x01  # the tensor's first byte
    (copied / item.relative_path).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC-32") as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert "'model.0.weight'" in str(caught.value)


def test_items_saved_without_crc32_still_import(tmp_path: Path) -> None:
    """torch.serialization.set_crc32_options(False) writes zeros where the CRC-32s go: nothing to check, not damage."""
    torch.serialization.set_crc32_options(False)
    try:
        _save({"w": torch.arange(10.0), "step": 3}, tmp_path / "source")
    finally:
        torch.serialization.set_crc32_options(True)  # torch's default
    safepoint.import_checkpoint(tmp_path / "source", tmp_path / "imported")
    loaded = safepoint.load(tmp_path / "imported")
    assert_same(loaded["w"], torch.arange(10.0))
    assert loaded["step"] == 3


def _set_file(name: str) -> Callable[[Metadata], None]:
    def change(metadata: Metadata) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = name

    return change


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/passwd", "sub/__0_0.distcp"])
def test_metadata_pointing_outside_the_directory_is_unsafe(copied: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "outside.distcp").write_bytes((copied / "__0_0.distcp").read_bytes())  # a readable target
    rewrite_metadata(copied, _set_file(name))
    with pytest.raises(UnsafeCheckpointError, match="not a file name") as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert name in str(caught.value)
    assert not (tmp_path / "imported").exists()


def test_symlinked_distcp_is_unsafe(copied: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.distcp"
    os.replace(copied / "__0_0.distcp", target)
    (copied / "__0_0.distcp").symlink_to(target)
    with pytest.raises(UnsafeCheckpointError, match="symlink"):
        safepoint.import_checkpoint(copied, tmp_path / "imported")


def test_metadata_naming_a_missing_file_is_corrupt(copied: Path, tmp_path: Path) -> None:
    rewrite_metadata(copied, _set_file("__7_0.distcp"))
    with pytest.raises(CorruptCheckpointError, match="missing") as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert str(copied / "__7_0.distcp") in str(caught.value)
    assert not (tmp_path / "imported").exists()


def _grow_chunk(metadata: Metadata) -> None:
    tensor_key(metadata, "model.0.weight").chunks[0].sizes = torch.Size([4, 4])


def _overlap(metadata: Metadata) -> None:
    tensor = tensor_key(metadata, "model.0.weight")
    tensor.size = torch.Size([6, 4])  # two boxes of 3 rows, the second at row 2: they overlap, rows 5.. are bare
    tensor.chunks.append(type(tensor.chunks[0])(offsets=torch.Size([2, 0]), sizes=torch.Size([3, 4])))


def _drop_chunk(metadata: Metadata) -> None:
    tensor = tensor_key(metadata, "model.0.weight")
    tensor.size = torch.Size([6, 4])


def _wrong_dtype(metadata: Metadata) -> None:
    tensor_key(metadata, "model.0.weight").properties.dtype = torch.float64


def _extra_item(metadata: Metadata) -> None:
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[type(index)("nobody", torch.Size([0]))] = info


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_grow_chunk, "lies outside its shape"),
        (_overlap, "overlap"),
        (_drop_chunk, "hold 12 elements, its shape"),
        (_wrong_dtype, "torch.float32 of shape .3, 4.; the metadata says torch.float64"),
        (_extra_item, "'nobody' that the keys do not name"),
    ],
)
def test_chunks_that_do_not_match_the_metadata_are_corrupt(
    copied: Path, tmp_path: Path, change: Callable[[Metadata], None], message: str
) -> None:
    rewrite_metadata(copied, change)
    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert "model.0.weight" in str(caught.value) or "nobody" in str(caught.value)
    assert not (tmp_path / "imported").exists()


def _huge_tensor(metadata: Metadata) -> None:
    tensor = tensor_key(metadata, "model.0.weight")
    tensor.size = tensor.chunks[0].sizes = torch.Size([1 << 20, 1 << 20])


def _huge_item(metadata: Metadata) -> None:
    _huge_tensor(metadata)
    info = next(info for index, info in metadata.storage_data.items() if index.fqn == "model.0.weight")
    info.length = 1 << 42


@pytest.mark.parametrize(
    ("change", "message"),
    [(_huge_tensor, "declared larger than the bytes stored"), (_huge_item, r"\.\.43980465\d+: the file is truncated")],
)
def test_declared_sizes_are_bounded_by_the_files_before_anything_is_allocated(
    copied: Path, tmp_path: Path, change: Callable[[Metadata], None], message: str
) -> None:
    rewrite_metadata(copied, change)
    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        safepoint.import_checkpoint(copied, tmp_path / "imported")
    assert "'model.0.weight'" in str(caught.value)


def test_existing_destination_is_refused_and_left_alone(single: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists"):
        safepoint.import_checkpoint(single[0], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "mine"


def test_coverage_check_on_grids_of_chunks_as_tensor_parallel_writes_them() -> None:
    """Row bands (FSDP), a 2-D grid (FSDP + TP) and a grid with one box moved onto another: only the last is
    refused, whatever order the boxes come in."""
    from safepoint._dcp import _Box, _check_boxes, _TensorKey

    def key(boxes: list[tuple[tuple[int, int], tuple[int, int]]]) -> _TensorKey:
        return _TensorKey(torch.float32, (4, 6), tuple(_Box(o, s) for o, s in boxes))

    bands = [((0, 0), (2, 6)), ((2, 0), (2, 6)), ((4, 0), (0, 6))]
    grid = [((r, c), (2, 3)) for r in (0, 2) for c in (0, 3)]
    _check_boxes("m", "bands", key(bands))
    _check_boxes("m", "grid", key(grid[::-1]))
    moved = [((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 3)), ((1, 2), (2, 3))]  # covers 24, overlaps 2
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        _check_boxes("m", "moved", key(moved))
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        _check_boxes("m", "moved", key(moved[::-1]))
