"""The box math of sharded tensors, without processes: which boxes each rank of a mesh holds, the exact-cover check,
chunk checksums and partial reads of a box, and rank 0's refusal of a plan whose boxes do not cover a tensor.

Placements are torch's own (``Shard``, ``Replicate``, ``_StridedShard``): their split rules are torch's, and the
expected boxes below are written out by hand from ``torch.chunk``'s rule (ceil(n / ranks) rows each, the last ranks
short or empty).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import safepoint
from safepoint import CoordinationError, CorruptCheckpointError, InvalidStateError
from safepoint._cli import main
from safepoint._manifest import EntryRecord, FileRecord
from safepoint._messages import RankPart, ShardedPart
from safepoint._pipeline import _with_boxes
from safepoint._sharded import (
    MIN_CHUNK_BYTES,
    Box,
    BoxReader,
    BoxRecord,
    Piece,
    SavedBox,
    ShardedSaved,
    _row_reads,
    check_cover,
    chunk_bytes,
    chunk_sums,
    pieces_at,
)
from tests.helpers import edit_manifest


def boxes(shape: tuple[int, ...], mesh: tuple[int, ...], placements: list[Any]) -> list[list[Box]]:
    """The boxes of every rank of a mesh, rank by rank (row-major coordinates)."""
    found = []
    for rank in range(math.prod(mesh)):
        coordinate, rest = [], rank
        for size in reversed(mesh):
            coordinate.insert(0, rest % size)
            rest //= size
        found.append([piece.box for piece in pieces_at(shape, mesh, coordinate, placements)])
    return found


def test_even_rows() -> None:
    assert boxes((8, 3), (4,), [Shard(0)]) == [[Box((2 * r, 0), (2, 3))] for r in range(4)]


def test_uneven_rows_13_over_3() -> None:
    assert boxes((13, 4), (3,), [Shard(0)]) == [[Box((0, 0), (5, 4))], [Box((5, 0), (5, 4))], [Box((10, 0), (3, 4))]]


def test_two_rows_over_four_ranks_leave_two_empty() -> None:
    assert boxes((2, 5), (4,), [Shard(0)]) == [[Box((0, 0), (1, 5))], [Box((1, 0), (1, 5))], [], []]


def test_columns() -> None:
    assert boxes((3, 5), (2,), [Shard(1)]) == [[Box((0, 0), (3, 3))], [Box((0, 3), (3, 2))]]


def test_replicated_on_every_rank() -> None:
    assert boxes((4,), (3,), [Replicate()]) == [[Box((0,), (4,))]] * 3


def test_hsdp_2d_mesh_replicas_hold_the_same_box() -> None:
    # mesh (replicate=2, shard=3): ranks 0-2 and 3-5 are two replicas of the same 3 shards
    found = boxes((7, 2), (2, 3), [Replicate(), Shard(0)])
    assert found[:3] == found[3:]
    assert found[:3] == [[Box((0, 0), (3, 2))], [Box((3, 0), (3, 2))], [Box((6, 0), (1, 2))]]


def test_2d_mesh_sharding_two_dims() -> None:
    found = boxes((4, 6), (2, 2), [Shard(0), Shard(1)])
    assert found == [[Box((0, 0), (2, 3))], [Box((0, 3), (2, 3))], [Box((2, 0), (2, 3))], [Box((2, 3), (2, 3))]]


def test_two_mesh_dims_sharding_one_dim_nest() -> None:
    # Shard(0) twice: rows split in 2, then each half split in 2 again
    found = boxes((8, 1), (2, 2), [Shard(0), Shard(0)])
    assert found == [[Box((2 * r, 0), (2, 1))] for r in range(4)]


def test_strided_shard_of_fsdp_over_tp_gives_each_rank_one_run() -> None:
    # FSDP2 over tensor parallelism: (_StridedShard(0, sf=2), Shard(0)) on (dp, tp): each TP half of the rows is
    # split again by the data-parallel rank, and every rank's rows are one run
    found = boxes((8, 2), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)])
    assert found == [[Box((0, 0), (2, 2))], [Box((4, 0), (2, 2))], [Box((2, 0), (2, 2))], [Box((6, 0), (2, 2))]]


def test_strided_shard_whose_rows_are_not_one_run_is_split_into_boxes() -> None:
    # torch's own example (compute_local_shape_and_global_offset): Shard(0) then _StridedShard(0, sf=2) on 8 rows
    # gives ranks the rows [0, 2], [1, 3], [4, 6], [5, 7]: each row its own box
    found = boxes((8, 2), (2, 2), [Shard(0), _StridedShard(0, split_factor=2)])
    rows = [[(box.offsets[0], box.sizes[0]) for box in rank] for rank in found]
    assert rows == [[(0, 1), (2, 1)], [(1, 1), (3, 1)], [(4, 1), (6, 1)], [(5, 1), (7, 1)]]
    pieces = pieces_at((8, 2), (2, 2), [0, 1], [Shard(0), _StridedShard(0, split_factor=2)])
    assert [piece.local for piece in pieces] == [(0, 0), (1, 0)]  # local row 0 is global row 1, local 1 is 3


def test_boxes_of_every_layout_cover_the_tensor_exactly_once() -> None:
    layouts: list[tuple[tuple[int, ...], tuple[int, ...], list[Any]]] = [
        ((13, 4), (3,), [Shard(0)]), ((2, 5), (4,), [Shard(0)]), ((3, 5), (2,), [Shard(1)]),
        ((9, 7), (2, 3), [Shard(0), Shard(1)]), ((7, 2), (2, 3), [Replicate(), Shard(0)]),
        ((10, 3), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
        ((11, 3), (2, 2), [Shard(0), _StridedShard(0, split_factor=2)]),
    ]  # fmt: skip
    for shape, mesh, placements in layouts:
        distinct = sorted({box for rank in boxes(shape, mesh, placements) for box in rank})
        assert check_cover(shape, distinct) == "", (shape, mesh, placements)


# -- the exact-cover check -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "listed", "fragment"),
    [
        ((4, 2), [Box((0, 0), (2, 2))], "a gap"),
        ((4, 2), [Box((0, 0), (3, 2)), Box((2, 0), (2, 2))], "overlap"),
        ((4, 2), [Box((0, 0), (4, 2)), Box((0, 0), (4, 2))], "overlap"),
        ((4, 2), [Box((0, 0), (2, 2)), Box((2, 0), (3, 2))], "outside the shape"),
        ((4, 2), [Box((0, 0), (4, 2)), Box((4, 0), (0, 2))], "empty"),
        ((4, 2), [Box((0,), (4,))], "dimensions"),
        ((), [], "0 boxes"),
        # rows that follow one another, but a box that does not span every column: not FSDP's tiling
        ((4, 2), [Box((0, 0), (2, 1)), Box((2, 0), (2, 2))], "a gap"),
        ((4, 2), [Box((0, 1), (2, 2)), Box((2, 0), (2, 2))], "outside the shape"),
        ((4, 2), [Box((0, 0), (2, 2)), Box((2, 0), (2, 2)), Box((0, 0), (0, 2))], "empty"),
        ((4,), [Box((0,), ())], "dimensions"),
    ],
    ids=[
        "gap",
        "overlap",
        "duplicate",
        "outside",
        "empty-box",
        "rank",
        "0-d",
        "narrow",
        "shifted",
        "empty-first",
        "no-sizes",
    ],
)
def test_a_broken_cover_is_named(shape: tuple[int, ...], listed: list[Box], fragment: str) -> None:
    assert fragment in check_cover(shape, listed)


def test_an_empty_tensor_needs_no_box() -> None:
    assert check_cover((0, 3), []) == ""
    assert check_cover((), [Box((), ())]) == ""


# -- chunk checksums and partial reads -------------------------------------------------------------------------------
def test_chunks_are_at_least_64_kib_and_at_most_128_per_box() -> None:
    assert chunk_bytes(10) == MIN_CHUNK_BYTES
    assert chunk_bytes(128 * MIN_CHUNK_BYTES) == MIN_CHUNK_BYTES
    assert chunk_bytes(128 * MIN_CHUNK_BYTES + 1) == 2 * MIN_CHUNK_BYTES
    big = 1 << 30
    assert math.ceil(big / chunk_bytes(big)) <= 128


class _File:
    """A file in memory, counting what is read of it."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.read = 0

    def __call__(self, path: str, offset: int, buffer: memoryview) -> None:
        buffer[:] = self.data[offset : offset + buffer.nbytes]
        self.read += buffer.nbytes


def _saved(values: torch.Tensor, at: int = 24) -> tuple[_File, SavedBox]:
    raw = values.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    chunk = chunk_bytes(len(raw))
    record = BoxRecord((0, 0), tuple(values.shape), 0, at, chunk, chunk_sums(memoryview(raw), chunk))
    return _File(b"\0" * at + raw), SavedBox(record, "f", "the file")


def test_a_row_range_reads_only_the_chunks_that_hold_it() -> None:
    values = torch.arange(1000 * 256, dtype=torch.float32).reshape(1000, 256)  # 1 MB: 16 chunks of 64 KiB
    file, saved = _saved(values)
    part = Box((300, 0), (200, 256))
    got = BoxReader(file).read(saved, part, torch.float32)
    assert torch.equal(got, values[300:500])
    needed = 200 * 256 * 4
    assert needed <= file.read <= needed + 2 * saved.record.chunk


def test_rows_on_chunk_boundaries_are_read_straight_into_the_target() -> None:
    values = torch.arange(1024 * 128, dtype=torch.float32).reshape(1024, 128)  # 512 KiB: 8 chunks of 64 KiB
    file, saved = _saved(values)
    out = torch.zeros(512, 128)
    BoxReader(file).read_into(saved, Box((256, 0), (256, 128)), out[128:384])  # rows 256-511: chunks 2 and 3
    assert torch.equal(out[128:384], values[256:512])
    assert not out[:128].any()
    assert not out[384:].any()
    assert file.read == 256 * 128 * 4  # exactly the rows: no buffer, no partial chunk


def test_a_flipped_byte_read_straight_into_the_target_is_corruption() -> None:
    values = torch.arange(1024 * 128, dtype=torch.float32).reshape(1024, 128)
    file, saved = _saved(values)
    file.data[24 + 300 * 128 * 4] ^= 0x01
    with pytest.raises(CorruptCheckpointError, match="do not match their checksum"):
        BoxReader(file).read_into(saved, Box((256, 0), (256, 128)), torch.zeros(256, 128))


def test_a_column_range_reads_its_enclosing_run() -> None:
    values = torch.arange(40 * 30, dtype=torch.int64).reshape(40, 30)
    file, saved = _saved(values)
    got = BoxReader(file).read(saved, Box((5, 10), (20, 7)), torch.int64)
    assert torch.equal(got, values[5:25, 10:17])


def test_a_flipped_byte_in_a_chunk_read_is_corruption() -> None:
    values = torch.arange(1000 * 256, dtype=torch.float32).reshape(1000, 256)
    file, saved = _saved(values)
    file.data[24 + 400 * 256 * 4 + 3] ^= 0x10
    with pytest.raises(CorruptCheckpointError, match="the file"):
        BoxReader(file).read(saved, Box((300, 0), (200, 256)), torch.float32)
    # a range away from the damage reads, and verifies, without it
    assert torch.equal(BoxReader(file).read(saved, Box((0, 0), (100, 256)), torch.float32), values[:100])


def test_chunk_sums_are_xxh3_of_each_chunk() -> None:
    data = bytes(range(256)) * 600
    sums = chunk_sums(memoryview(data), 65536)
    assert sums.startswith("xxh3_64:")
    digits = sums.removeprefix("xxh3_64:")
    assert digits[:16] == xxhash.xxh3_64_hexdigest(data[:65536])
    assert digits[-16:] == xxhash.xxh3_64_hexdigest(data[2 * 65536 :])
    assert len(digits) == 16 * 3


# -- rank 0's check before publishing --------------------------------------------------------------------------------
def _part(boxes: list[Box], layout: str = "L") -> RankPart:
    entries = tuple(EntryRecord("w", "tensor", "F32", box.sizes, 0, f"w#{i}") for i, box in enumerate(boxes))
    records = tuple(
        (0, BoxRecord(box.offsets, box.sizes, i, 8, 65536, "xxh3_64:" + "0" * 16)) for i, box in enumerate(boxes)
    )
    return RankPart(None, None, ShardedPart((FileRecord("f", 1000, "xxh3_64:" + "0" * 16),), entries, records, layout))


def _tree() -> dict[str, Any]:
    return {"k": "dict", "v": [["w", {"k": "sharded", "dtype": "F32", "shape": [4, 2], "boxes": []}]]}


def test_a_plan_that_covers_the_tensor_fills_the_boxes_in() -> None:
    tree = _tree()
    parts = [_part([Box((0, 0), (2, 2))]), _part([Box((2, 0), (2, 2))])]
    files: list[FileRecord] = []
    entries: list[EntryRecord] = []
    merged = _with_boxes(tree, parts, files, entries)
    node = merged["v"][0][1]
    assert [(b["offsets"], b["sizes"], b["e"]) for b in node["boxes"]] == [([0, 0], [2, 2], 0), ([2, 0], [2, 2], 1)]
    assert [e.file for e in entries] == [0, 1]
    assert tree["v"][0][1]["boxes"] == []  # the encoder's tree (maybe cached) is not changed


@pytest.mark.parametrize(
    ("first", "second", "fragment"),
    [
        ([Box((0, 0), (3, 2))], [Box((2, 0), (2, 2))], "overlap"),
        ([Box((0, 0), (2, 2))], [], "gap"),
        ([Box((0, 0), (2, 2))], [Box((2, 0), (3, 2))], "outside"),
    ],
    ids=["overlap", "gap", "outside"],
)
def test_a_plan_that_does_not_cover_the_tensor_is_refused(first: list[Box], second: list[Box], fragment: str) -> None:
    with pytest.raises(InvalidStateError, match=fragment) as info:
        _with_boxes(_tree(), [_part(first), _part(second)], [], [])
    assert info.value.key == "w"
    assert "nothing was committed" in str(info.value)


def test_ranks_that_disagree_on_the_dtensors_are_refused() -> None:
    with pytest.raises(CoordinationError, match="disagree") as info:
        _with_boxes(_tree(), [_part([Box((0, 0), (2, 2))]), _part([Box((2, 0), (2, 2))], layout="other")], [], [])
    assert info.value.ranks == (1,)


# -- the format 3 fixture through the CLI and verify -----------------------------------------------------------------
FIXTURE = Path(__file__).resolve().parents[1] / "compat" / "format_v3" / "run"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_inspect_shows_each_sharded_tensor_and_how_it_is_split(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "inspect", str(FIXTURE))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("sharded/")}
    assert rows["sharded/rows"][1:5] == ["sharded", "float32", "[13,", "4]"]
    assert "2 boxes over 2 ranks" in " ".join(rows["sharded/rows"])
    assert "1 box over 1 rank" in " ".join(rows["sharded/replicated"])
    assert "0 boxes over 0 ranks" in " ".join(rows["sharded/empty"])


def test_export_writes_the_full_tensors(tmp_path: Path) -> None:
    # the fixture holds a pickled entry: only the Python call can allow it (export reads the whole state)
    safepoint.export_checkpoint(FIXTURE, tmp_path / "x.pt", format="torch", key="sharded", allow_pickle=True)
    exported = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(exported["rows"], torch.arange(52, dtype=torch.float32).reshape(13, 4) / 8)
    assert torch.equal(exported["cols"], torch.arange(15).reshape(3, 5) - 7)
    assert exported["empty"].shape == (0, 3)


def test_verify_checks_the_chunk_checksums_of_every_box(tmp_path: Path) -> None:
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    assert safepoint.verify(run).ok
    (checkpoint,) = run.iterdir()

    def wrong_sum(body: dict[str, Any]) -> None:
        rows = next(node for key, node in dict(body["tree"]["v"])["sharded"]["v"] if key == "rows")
        box = rows["boxes"][1]
        box["sums"] = box["sums"][:-1] + ("0" if box["sums"][-1] != "0" else "1")

    edit_manifest(checkpoint, wrong_sum)  # the files and their checksums are untouched: only a box's sums differ
    report = safepoint.verify(run)
    assert not report.ok
    (bad,) = report.bad
    assert bad.error is not None
    assert "checksum" in bad.error


# -- FSDP row shards read straight into the live tensor, planned once per tensor ----------------------------------
def _row_boxes(values: torch.Tensor, starts: list[int]) -> tuple[_File, list[SavedBox]]:
    """``values`` saved as boxes of whole rows beginning at ``starts``, one after the other in one file."""
    data, saved = bytearray(b"\0" * 24), []
    for index, (first, end) in enumerate(zip(starts, [*starts[1:], values.shape[0]], strict=True)):
        raw = values[first:end].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        chunk = chunk_bytes(len(raw))
        sums = chunk_sums(memoryview(raw), chunk)
        record = BoxRecord((first, 0), (end - first, values.shape[1]), index, len(data), chunk, sums)
        saved.append(SavedBox(record, "f", "the file"))
        data += raw
    return _File(bytes(data)), saved


def test_fsdp_rows_over_whole_boxes_are_planned_as_one_read_per_box_and_filled_in_place() -> None:
    values = torch.randn(2048, 64)  # 512 KiB: four saved boxes of 512 rows (128 KiB, two 64 KiB chunks each)
    file, saved = _row_boxes(values, [0, 512, 1024, 1536])
    local = torch.zeros(1024, 64)  # the second of two ranks: rows 1024-2047
    plan = _row_reads(local, [Piece(Box((1024, 0), (1024, 64)), (0, 0))], saved)
    assert plan is not None
    assert [(read.saved.record.offsets[0], read.first_byte, read.start, read.end) for read in plan] == [
        (1024, 0, 0, 512 * 64 * 4),
        (1536, 0, 512 * 64 * 4, 1024 * 64 * 4),
    ]
    readied: list[tuple[int, int]] = []

    def ready(region: torch.Tensor) -> None:  # called before each region is written: it still holds zeros
        assert not region.any()
        readied.append((region.data_ptr() - local.data_ptr(), region.nbytes))

    sharded = ShardedSaved("w", torch.float32, (2048, 64), saved, BoxReader(file))
    sharded._read_rows(local, plan, ready)
    assert torch.equal(local, values[1024:])
    assert readied == [(0, 512 * 64 * 4), (512 * 64 * 4, 512 * 64 * 4)]
    assert file.read == 1024 * 64 * 4  # exactly the rows needed


def test_rows_that_start_inside_a_box_on_a_chunk_boundary_are_planned_too() -> None:
    values = torch.randn(2048, 64)
    file, saved = _row_boxes(values, [0, 1024])  # two boxes of 256 KiB: 64 KiB chunks, 256 rows each
    local = torch.zeros(512, 64)
    plan = _row_reads(local, [Piece(Box((768, 0), (512, 64)), (0, 0))], saved)  # rows 768-1279: both boxes
    assert plan is not None
    assert [(read.first_byte, read.start, read.end) for read in plan] == [
        (768 * 64 * 4, 0, 256 * 64 * 4),
        (0, 256 * 64 * 4, 512 * 64 * 4),
    ]
    ShardedSaved("w", torch.float32, (2048, 64), saved, BoxReader(file))._read_rows(local, plan, lambda _: None)
    assert torch.equal(local, values[768:1280])


def test_a_flipped_byte_in_a_planned_row_read_is_corruption() -> None:
    values = torch.randn(2048, 64)
    file, saved = _row_boxes(values, [0, 512, 1024, 1536])
    file.data[saved[3].record.at + 100 * 64 * 4] ^= 0x04
    local = torch.zeros(1024, 64)
    plan = _row_reads(local, [Piece(Box((1024, 0), (1024, 64)), (0, 0))], saved)
    assert plan is not None
    with pytest.raises(CorruptCheckpointError, match="do not match their checksum"):
        ShardedSaved("w", torch.float32, (2048, 64), saved, BoxReader(file))._read_rows(local, plan, lambda _: None)


def test_parts_that_are_not_whole_rows_on_chunk_boundaries_are_not_planned() -> None:
    values = torch.randn(2048, 64)
    _, saved = _row_boxes(values, [0, 1024])
    # a part ending inside a chunk: rows 0-99 of the first box
    assert _row_reads(torch.zeros(100, 64), [Piece(Box((0, 0), (100, 64)), (0, 0))], saved) is None
    # tensor parallel columns: the local rows are half of each saved row
    assert _row_reads(torch.zeros(2048, 32), [Piece(Box((0, 32), (2048, 32)), (0, 0))], saved) is None
    # a 0-d tensor
    assert _row_reads(torch.zeros(()), [Piece(Box((), ()), ())], saved) is None
