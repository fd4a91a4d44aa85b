"""Sharded tensors (``DTensor``): which boxes of the global tensor each rank holds, and reading boxes back.

A *box* is a block of a tensor: per dimension an offset and a size, in elements of the global tensor. A DTensor's
local tensor is one box or, with ``_StridedShard`` (FSDP + tensor parallel), several: the global indices a rank
holds along a dimension are computed here by applying each mesh dimension's placement in turn (as torch does for
its own local shapes), then split into runs of consecutive indices; each combination of runs is one box, and a
view of the local tensor. ``Partial`` placements are refused (the values are not reduced yet).

On save, every rank writes the boxes it *owns*: a box held by several ranks (a ``Replicate`` mesh dimension: HSDP
replicas, a replicated bias under tensor parallelism) is written once, by one of its holders, chosen from the
tensor's key so that different tensors are written by different replicas. Empty boxes are not written.

Every box is one payload entry; its bytes are also checksummed in fixed-size chunks (:func:`chunk_bytes`), so a
reader can verify any byte range of it by reading the chunks that cover the range, no more (see
:class:`BoxReader`). Why chunks of at least 64 KiB and at most 128 per box: a part read costs at most two chunks
more than it needs per saved box, which keeps a resharded FSDP restore within a few percent of the bytes it needs
for boxes of a few MB and up, while a box costs at most 128 digests (2 KiB) of manifest.

A restore reads lazily (:class:`ShardedSaved`): what to read depends on the live DTensor a saved one is matched
with (its mesh and placements), known only while matching. This module never writes, and never trusts a box
before the manifest parser checked it.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import xxhash

from ._backup import InPlace, Ready, writable
from ._errors import CorruptCheckpointError, InvalidStateError

__all__ = [
    "PREFETCH_BYTES",
    "Box",
    "BoxReader",
    "BoxRecord",
    "Piece",
    "PrefetchRange",
    "ReadRange",
    "SavedBox",
    "ShardedSaved",
    "boxes_of",
    "check_cover",
    "check_sums_text",
    "chunk_bytes",
    "chunk_sums",
    "fill",
    "is_dtensor",
    "local_pieces",
    "owned_pieces",
    "pieces_at",
    "shard_like",
    "sharded_nodes",
    "slice_like",
    "view_of",
]

#: Chunks are never smaller than this (a checksum per 64 KiB keeps manifests small for small boxes) ...
MIN_CHUNK_BYTES = 64 << 10
#: ... and a box has at most this many: a reader of part of a box reads at most two partial chunks more than it
#: needs, so the bytes read on a resharded load stay within a few percent of the bytes needed (see chunk_bytes).
MAX_CHUNKS_PER_BOX = 128
#: The checksum algorithm of chunks (persisted with each box as the prefix of its sums).
CHUNK_ALGORITHM = "xxh3_64"
_DIGEST_CHARS = 16


class Box(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def volume(self) -> int:
        return math.prod(self.sizes)

    def intersect(self, other: Box) -> Box | None:
        """The common part of two boxes of one tensor, or None."""
        offsets, sizes = [], []
        for a, n, b, m in zip(self.offsets, self.sizes, other.offsets, other.sizes, strict=True):
            start, end = max(a, b), min(a + n, b + m)
            if end <= start:
                return None
            offsets.append(start)
            sizes.append(end - start)
        return Box(tuple(offsets), tuple(sizes))


class Piece(NamedTuple):
    """One box of a rank's local tensor: where it lies in the global tensor and where in the local one."""

    box: Box
    local: tuple[int, ...]  # offsets in the local tensor (sizes are the box's)


@dataclass(frozen=True)
class BoxRecord:
    """A saved box: its place in the global tensor, the entry holding its bytes (row-major, contiguous), where
    those bytes start in the entry's file, and the checksums of its chunks."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    entry: int
    at: int  # byte offset of the entry's data in its file
    chunk: int  # bytes per checksummed chunk
    sums: str  # "<algorithm>:" + one 16-hex-digit digest per chunk

    @property
    def box(self) -> Box:
        return Box(self.offsets, self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets), "sizes": list(self.sizes), "e": self.entry, "at": self.at,
            "chunk": self.chunk, "sums": self.sums,
        }  # fmt: skip

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> BoxRecord:
        """From a box the manifest parser (or the message reader) has already checked."""
        return cls(
            tuple(value["offsets"]), tuple(value["sizes"]), value["e"], value["at"], value["chunk"], value["sums"]
        )


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed when no
    DTensor can exist)."""
    if not isinstance(value, torch.Tensor) or type(value) is torch.Tensor:
        return False
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in type(value).__mro__)


# -- the box math -------------------------------------------------------------------------------------------------
def _indices(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any], key: str
) -> list[Sequence[int]]:
    """The global indices, per dimension, that the rank at ``coordinate`` holds, in local order."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard, _StridedShardOffsetMode

    indices: list[Sequence[int]] = [range(n) for n in shape]
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if placement.is_partial():
            raise InvalidStateError(
                f"state entry {key!r}: a DTensor with a Partial placement holds unreduced values; call "
                "redistribute() to a Shard or Replicate placement before saving",
                key=key,
            )
        if not isinstance(placement, (Shard, _StridedShard)):
            raise InvalidStateError(f"state entry {key!r}: unknown DTensor placement {placement!r}", key=key)
        dim = placement.dim
        current = indices[dim]
        chunks, rank = mesh_shape[mesh_dim], coordinate[mesh_dim]
        if isinstance(placement, _StridedShard):
            size, offsets = placement._local_shard_size_and_offset(
                len(current), chunks, rank, offset_mode=_StridedShardOffsetMode.ALL
            )
            picked = [] if size == 0 else list(offsets) if isinstance(offsets, list) else None
            if picked is None or len(picked) != size:
                raise InvalidStateError(f"state entry {key!r}: cannot place {placement!r}", key=key)
            indices[dim] = [current[i] for i in picked]
        else:
            size, offset = Shard.local_shard_size_and_offset(len(current), chunks, rank)
            indices[dim] = current[int(offset) : int(offset) + int(size)]
    return indices


def _runs(indices: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(local start, global start, length)`` of each run of consecutive global indices."""
    if isinstance(indices, range) and indices.step == 1:
        return [(0, indices.start, len(indices))] if len(indices) else []
    runs: list[list[int]] = []
    for local, index in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == index:
            runs[-1][2] += 1
        else:
            runs.append([local, index, 1])
    return [(a, b, c) for a, b, c in runs]


def pieces_at(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any], key: str = ""
) -> list[Piece]:
    """The non-empty boxes the rank at ``coordinate`` of a mesh holds of a tensor of ``shape``."""
    return _pieces(_indices(shape, mesh_shape, coordinate, placements, key))


def _pieces(indices: list[Sequence[int]]) -> list[Piece]:
    """The boxes of the global indices a rank holds (per dimension, in local order)."""
    per_dim = [_runs(along) for along in indices]
    pieces = []
    for combination in itertools.product(*per_dim):
        box = Box(tuple(run[1] for run in combination), tuple(run[2] for run in combination))
        pieces.append(Piece(box, tuple(run[0] for run in combination)))
    return pieces


def _coordinate(dtensor: Any, key: str) -> list[int]:
    mesh = dtensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise InvalidStateError(f"state entry {key!r}: this rank is not in the DTensor's device mesh", key=key)
    return list(coordinate)


def local_pieces(dtensor: Any, key: str = "", local: torch.Tensor | None = None) -> list[Piece]:
    """The non-empty boxes of this rank's local tensor of ``dtensor`` (``local``, when the caller has it already);
    InvalidStateError if they do not add up to its local shape (a placement this code does not model)."""
    mesh = dtensor.device_mesh
    shape = tuple(dtensor.shape)
    indices = _indices(shape, tuple(mesh.shape), _coordinate(dtensor, key), dtensor.placements, key)
    if local is None:
        local = dtensor.to_local()
    if tuple(len(i) for i in indices) != tuple(local.shape):
        raise InvalidStateError(
            f"state entry {key!r}: the DTensor's local tensor is {list(local.shape)}, but its placements "
            f"{list(dtensor.placements)} over a mesh of {list(mesh.shape)} give {[len(i) for i in indices]}; "
            "it cannot be saved as boxes (a padded or custom layout?)",
            key=key,
        )
    return _pieces(indices)


def owned_pieces(dtensor: Any, key: str, world_size: int) -> list[Piece]:
    """The boxes of this rank's local tensor that this rank writes: all of them, except boxes it holds as one of
    several replicas, which one replica writes, chosen from ``key``. Replicas are the ranks along the DTensor's
    ``Replicate`` mesh dimensions and, for a DTensor on a sub-mesh (FSDP's data-parallel mesh under FSDP + TP), the
    copies of that sub-mesh in its root mesh (the other tensor-parallel ranks hold the same shards)."""
    mesh = dtensor.device_mesh
    coordinate = _coordinate(dtensor, key)
    replicated = [d for d, placement in enumerate(dtensor.placements) if placement.is_replicate()]
    holders = math.prod(mesh.shape[d] for d in replicated)
    mine = 0
    for d in replicated:
        mine = mine * mesh.shape[d] + coordinate[d]
    copies, copy = _sub_mesh_copy(mesh, key, world_size)
    holders, mine = holders * copies, mine * copies + copy
    pieces = local_pieces(dtensor, key)
    if holders == 1:
        return pieces
    return [p for p in pieces if zlib.crc32(f"{key}@{p.box.offsets}".encode()) % holders == mine]


def _sub_mesh_copy(mesh: Any, key: str, world_size: int) -> tuple[int, int]:
    """How many copies of ``mesh`` its root mesh holds (1 for a mesh over the whole group), and which one this
    rank's is: the coordinate along the root's other named dimensions."""
    if mesh.size() == world_size:
        return 1, 0
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else None
    names, root_names = mesh.mesh_dim_names, getattr(root, "mesh_dim_names", None)
    if (
        root is None
        or root is mesh
        or root.size() != world_size
        or not names
        or not root_names
        or any(name not in root_names for name in names)
    ):
        raise InvalidStateError(
            f"state entry {key!r}: the DTensor's device mesh has {mesh.size()} ranks, the process group "
            f"{world_size}, and it is not a named slice of a mesh over the whole group; save a state whose "
            "DTensors live on a mesh over every rank, or on a named slice of one (mesh['dp'])",
            key=key,
        )
    root_coordinate = root.get_coordinate()
    copies, copy = 1, 0
    for d, name in enumerate(root_names):
        if name not in names:
            copies *= root.shape[d]
            copy = copy * root.shape[d] + root_coordinate[d]
    return copies, copy


def view_of(local: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The part of a local tensor that ``piece`` names."""
    view = local
    for dim, (start, size) in enumerate(zip(piece.local, piece.box.sizes, strict=True)):
        if start or size != view.shape[dim]:
            view = view.narrow(dim, start, size)
    return view


# -- the exact-cover check ----------------------------------------------------------------------------------------
def check_cover(shape: Sequence[int], boxes: Iterable[Box]) -> str:
    """Why ``boxes`` do not cover a tensor of ``shape`` exactly once ("" when they do): each box lies inside the
    shape and is not empty, no two overlap, and their volumes add up to the tensor's."""
    listed = sorted(boxes)
    if _tile_the_rows(shape, listed):
        return ""
    total = 0
    for box in listed:
        if len(box.offsets) != len(shape) or len(box.sizes) != len(shape):
            return f"box at {list(box.offsets)} has {len(box.sizes)} dimensions, the tensor {len(shape)}"
        if any(n <= 0 for n in box.sizes):
            return f"box at {list(box.offsets)} of sizes {list(box.sizes)} is empty"
        if any(o < 0 or o + n > m for o, n, m in zip(box.offsets, box.sizes, shape, strict=True)):
            return f"box at {list(box.offsets)} of sizes {list(box.sizes)} reaches outside the shape {list(shape)}"
        total += box.volume
    if not shape:  # a 0-d tensor: exactly one box
        return "" if len(listed) == 1 else f"{len(listed)} boxes for a 0-d tensor"
    # sweep along the dimension the boxes are split most along (rows for FSDP, columns for tensor parallel):
    # sorted by their start there, a box can only overlap the boxes that start before it ends there
    dim = max(range(len(shape)), key=lambda d: len({box.offsets[d] for box in listed}))
    listed.sort(key=lambda box: box.offsets[dim])
    for index, box in enumerate(listed):
        end = box.offsets[dim] + box.sizes[dim]
        for other in itertools.islice(listed, index + 1, None):
            if other.offsets[dim] >= end:
                break
            if box.intersect(other) is not None:
                first, second = sorted((box, other))
                return f"boxes at {list(first.offsets)} and {list(second.offsets)} overlap"
    if total != math.prod(shape):
        return f"the boxes hold {total} of the tensor's {math.prod(shape)} elements (a gap)"
    return ""


def _tile_the_rows(shape: Sequence[int], listed: Sequence[Box]) -> bool:
    """Whether boxes sorted by their offsets each span every dimension but the first and follow one another along
    it from row 0 to the last without a gap: FSDP's split, confirmed in one pass (every manifest read checks every
    sharded tensor). False says nothing: the sweep of :func:`check_cover` decides, and names what is wrong."""
    if not shape:
        return False
    rest = tuple(shape[1:])
    zeros = (0,) * len(rest)
    row = 0
    for offsets, sizes in listed:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return False
        if offsets[0] != row or sizes[1:] != rest or offsets[1:] != zeros:
            return False
        if sizes[0] <= 0:
            return False
        row += sizes[0]
    return row == shape[0]


# -- chunk checksums ----------------------------------------------------------------------------------------------
def chunk_bytes(nbytes: int) -> int:
    """The chunk size of a box of ``nbytes``: a power of two, at least MIN_CHUNK_BYTES, at most
    MAX_CHUNKS_PER_BOX chunks."""
    chunk = MIN_CHUNK_BYTES
    while chunk * MAX_CHUNKS_PER_BOX < nbytes:
        chunk *= 2
    return chunk


def chunk_sums(data: memoryview, chunk: int) -> str:
    digests = (xxhash.xxh3_64_hexdigest(data[start : start + chunk]) for start in range(0, data.nbytes, chunk))
    return CHUNK_ALGORITHM + ":" + "".join(digests)


def chunk_count(nbytes: int, chunk: int) -> int:
    return -(-nbytes // chunk)


def check_sums_text(sums: object, nbytes: int, chunk: object) -> str:
    """Why a box's chunk size and sums are malformed for ``nbytes`` ("" when they are well formed)."""
    if type(chunk) is not int or chunk < 4096 or chunk & (chunk - 1) or chunk > 1 << 40:
        return f"chunk size {str(chunk)[:40]!r} is not a power of two between 4 KiB and 1 TiB"
    if not isinstance(sums, str) or not sums.startswith(CHUNK_ALGORITHM + ":"):
        return "chunk checksums are not xxh3_64 digests"
    digits = sums[len(CHUNK_ALGORITHM) + 1 :]
    if len(digits) != chunk_count(nbytes, chunk) * _DIGEST_CHARS or digits.strip("0123456789abcdef"):
        return f"chunk checksums do not match {chunk_count(nbytes, chunk)} chunks of {chunk} bytes"
    return ""


# -- reading boxes back -------------------------------------------------------------------------------------------
def _linear(position: Sequence[int], sizes: Sequence[int]) -> int:
    index = 0
    for p, n in zip(position, sizes, strict=True):
        index = index * n + p
    return index


def _strides(sizes: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(sizes):
        strides.append(step)
        step *= n
    return strides[::-1]


#: (file path relative to the storage root, offset, buffer) -> None; raises StorageError / CorruptCheckpointError
ReadRange = Callable[[str, int, memoryview], None]


@dataclass(frozen=True)
class SavedBox:
    record: BoxRecord
    path: str  # the entry's file, relative to the storage root
    where: str  # the file, for messages


#: (file path relative to the storage root, offset, bytes) -> None: a hint that the range will be read soon
PrefetchRange = Callable[[str, int, int], None]

#: A restore hints the first this many bytes of the reads it plans: enough to keep the device busy while the
#: rest of the state is matched and backed up, not so much that the hinted bytes wait long in the page cache
#: (measured: 48 MiB did as well as all of a 126 MiB restore, see docs/performance.md).
PREFETCH_BYTES = 48 << 20


class BoxReader:
    """Reads parts of saved boxes: the smallest run of whole chunks that holds the part (a row range of a box is
    one contiguous run), each chunk verified against its checksum before any of its bytes is used.

    With ``prefetch``, :meth:`will_read` passes the first PREFETCH_BYTES of the ranges a restore plans to the
    storage as hints; the bytes are read and verified by :meth:`read_bytes` as any others."""

    def __init__(self, read_range: ReadRange, prefetch: PrefetchRange | None = None) -> None:
        self._read_range = read_range
        self._prefetch = prefetch
        self._hinted = 0

    def will_read(self, saved: SavedBox, first_byte: int, nbytes: int) -> None:
        """A hint that the box's entry bytes from ``first_byte`` on (``nbytes``) will be read soon."""
        if self._prefetch is not None and self._hinted + nbytes <= PREFETCH_BYTES:
            self._hinted += nbytes
            self._prefetch(saved.path, saved.record.at + first_byte, nbytes)

    def read(self, saved: SavedBox, part: Box, dtype: torch.dtype) -> torch.Tensor:
        """The elements of ``part`` (inside the saved box), as a tensor of ``part``'s sizes."""
        record = saved.record
        element = torch.empty((), dtype=dtype).element_size()
        first_byte, end_byte = _span(record, part, element)
        chunk = record.chunk
        lo, hi = first_byte // chunk, chunk_count(end_byte, chunk)
        start, stop = lo * chunk, min(hi * chunk, math.prod(record.sizes) * element)
        buffer = torch.empty(stop - start, dtype=torch.uint8)
        view = buffer.numpy().data if buffer.numel() else memoryview(bytearray())
        self._read_range(saved.path, record.at + start, view)
        _check_chunks(saved, view, start)
        flat = buffer.view(dtype)
        offset = (first_byte - start) // element
        return flat.as_strided(part.sizes, _strides(record.sizes), offset)

    def read_into(self, saved: SavedBox, part: Box, region: torch.Tensor) -> None:
        """Fill ``region`` (a tensor of ``part``'s sizes) with the elements of ``part``: straight into its memory
        when the part is whole rows of the box that start and end on chunk boundaries (FSDP row shards whose
        boxes line up) and ``region`` is one contiguous block, else through a buffer."""
        record = saved.record
        element = region.element_size()
        direct = region.numel() > 0 and region.device.type == "cpu" and region.is_contiguous()
        first_byte = _direct_start(record, part, element) if direct else None
        if first_byte is None:
            region.copy_(self.read(saved, part, region.dtype))
            return
        self.read_bytes(saved, first_byte, region.reshape(-1).view(torch.uint8).numpy().data)

    def read_bytes(self, saved: SavedBox, first_byte: int, view: memoryview) -> None:
        """Fill ``view`` with the box's entry bytes from ``first_byte`` (a chunk boundary; the view ends on one or
        at the box's end), verified."""
        self._read_range(saved.path, saved.record.at + first_byte, view)
        _check_chunks(saved, view, first_byte)

    def verify(self, saved: SavedBox, dtype: torch.dtype) -> None:
        """Check every chunk of a box."""
        self.read(saved, saved.record.box, dtype)


def _direct_start(record: BoxRecord, part: Box, element: int) -> int | None:
    """Where ``part``'s bytes start in the box's entry when they can be read straight into one contiguous block
    and verified as they are: whole rows of the box, starting and ending on chunk boundaries (or at the box's
    end); else None."""
    if part.sizes[1:] != record.sizes[1:]:
        return None
    first_byte, end_byte = _span(record, part, element)
    chunk = record.chunk
    if first_byte % chunk or (end_byte % chunk and end_byte != math.prod(record.sizes) * element):
        return None
    return first_byte


def _span(record: BoxRecord, part: Box, element: int) -> tuple[int, int]:
    """The bytes of the box's entry from ``part``'s first element to its last: the smallest run holding it."""
    local = [o - b for o, b in zip(part.offsets, record.offsets, strict=True)]
    last = [o + n - 1 for o, n in zip(local, part.sizes, strict=True)]
    return _linear(local, record.sizes) * element, (_linear(last, record.sizes) + 1) * element


def _check_chunks(saved: SavedBox, view: memoryview, start: int) -> None:
    """Verify ``view``, the entry's bytes from ``start`` (a chunk boundary) on, whole chunks or up to the box's end,
    against the box's chunk checksums."""
    record = saved.record
    chunk = record.chunk
    digits = record.sums[len(CHUNK_ALGORITHM) + 1 :]
    first = start // chunk
    for offset in range(0, view.nbytes, chunk):
        index = first + offset // chunk
        expected = digits[index * _DIGEST_CHARS : (index + 1) * _DIGEST_CHARS]
        if xxhash.xxh3_64_hexdigest(view[offset : offset + chunk]) != expected:
            raise CorruptCheckpointError(
                f"{saved.where}: bytes {record.at + index * chunk}.. of a box do not match their checksum (corrupted)",
                path=saved.where,
            )


def fill(
    out: torch.Tensor, target: Box, saved: Sequence[SavedBox], reader: BoxReader, ready: Ready | None = None
) -> None:
    """Fill ``out`` (a tensor holding the elements of ``target``) from the saved boxes that intersect it, calling
    ``ready(region)`` before writing each region of it; on an error its contents are undefined."""
    for box in saved:
        common = target.intersect(box.record.box)
        if common is None:
            continue
        region = out
        for dim, (o, n) in enumerate(zip(common.offsets, common.sizes, strict=True)):
            region = region.narrow(dim, o - target.offsets[dim], n)
        if ready is not None:
            ready(region)
        reader.read_into(box, common, region)


def boxes_of(node: dict[str, Any]) -> Iterator[BoxRecord]:
    for box in node["boxes"]:
        yield BoxRecord.from_json(box)


def sharded_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The sharded nodes of a (parsed) state tree, in tree order."""
    kind = node["k"]
    if kind == "sharded":
        yield node
    elif kind == "dict":
        for _, child in node["v"]:
            yield from sharded_nodes(child)
    elif kind in ("list", "tuple"):
        for child in node["v"]:
            yield from sharded_nodes(child)
    elif kind in ("object", "typed"):
        yield from sharded_nodes(node["v"])


class ShardedSaved:
    """A saved DTensor, not read yet: restore reads only the parts of it that a live target needs."""

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], boxes: list[SavedBox],
                 reader: BoxReader) -> None:  # fmt: skip
        self.key, self.dtype, self.shape, self.boxes, self.reader = key, dtype, shape, boxes, reader

    def __repr__(self) -> str:
        return f"ShardedSaved({self.key!r}, {self.dtype}, {list(self.shape)}, {len(self.boxes)} boxes)"

    def full(self) -> torch.Tensor:
        """The whole tensor (every box read and verified)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if out.numel():
            fill(out, Box((0,) * len(self.shape), self.shape), self.boxes, self.reader)
        return out

    def _read_rows(self, local: torch.Tensor, plan: list[_RowRead], ready: Ready) -> None:
        """Read every part of ``plan`` into its bytes of ``local`` (contiguous), calling ``ready`` on each first."""
        flat = local.view(-1).view(torch.uint8)
        data = flat.numpy().data
        for saved, first_byte, start, end in plan:
            ready(flat[start:end])
            self.reader.read_bytes(saved, first_byte, data[start:end])

    def placeholder(self) -> torch.Tensor:
        """A data-less tensor of the saved dtype and shape: what a mismatch message describes."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def like(self, live: Any, into: InPlace | None = None) -> Any:
        """A DTensor of the live DTensor's mesh and placements holding the saved values (in the saved dtype):
        this rank reads only the parts of the saved boxes its own local tensor covers.

        With ``into``, a live DTensor whose local tensor can take the saved bytes as they are (:func:`writable`)
        is registered there to be read into in place, behind a backup, when ``into.run()`` runs; ``live`` itself
        is returned (the caller then has nothing to copy)."""
        if into is not None:
            local = live.to_local().detach()  # the same memory
            if writable(local, self.dtype):
                pieces = local_pieces(live, self.key, local)
                plan = _row_reads(local, pieces, self.boxes)
                if plan is not None:
                    into.add(self.key, local, functools.partial(self._read_rows, local, plan))
                    for saved, first_byte, start, end in plan:  # the device starts while the rest is matched
                        self.reader.will_read(saved, first_byte, end - start)
                    return live

                def write(ready: Ready) -> None:
                    for piece in pieces:
                        fill(view_of(local, piece), piece.box, self.boxes, self.reader, ready)

                into.add(self.key, local, write)
                return live
        return shard_like(live, self.dtype, lambda out, box: fill(out, box, self.boxes, self.reader))


class _RowRead(NamedTuple):
    saved: SavedBox
    first_byte: int  # in the saved box's entry: a chunk boundary
    start: int  # the bytes of the live local tensor it fills
    end: int


def _row_reads(local: torch.Tensor, pieces: Sequence[Piece], saved: Sequence[SavedBox]) -> list[_RowRead] | None:
    """The reads that fill ``local`` (contiguous) when every part it needs of the saved boxes is whole rows, both
    of the saved box and of the local tensor, starting and ending on chunk boundaries (FSDP row shards): each
    part is then one run of bytes on both sides. None when any part is not (tensor parallel columns, a part
    that splits a chunk): those go through :func:`fill`."""
    if local.dim() == 0:
        return None
    element, row = local.element_size(), math.prod(local.shape[1:])
    trailing = tuple(local.shape[1:])
    reads = []
    for piece in pieces:
        if piece.box.sizes[1:] != trailing or any(piece.local[1:]):
            return None
        for box in saved:
            common = piece.box.intersect(box.record.box)
            if common is None:
                continue
            first_byte = _direct_start(box.record, common, element)
            if first_byte is None or common.sizes[1:] != trailing:
                return None
            start = (piece.local[0] + common.offsets[0] - piece.box.offsets[0]) * row * element
            reads.append(_RowRead(box, first_byte, start, start + common.sizes[0] * row * element))
    return reads


def shard_like(live: Any, dtype: torch.dtype, fill_box: Callable[[torch.Tensor, Box], None]) -> Any:
    """A DTensor laid out as ``live`` whose local tensor is filled, box by box, by ``fill_box(view, box)``."""
    from torch.distributed.tensor import DTensor

    local = live.to_local()
    out = torch.empty(tuple(local.shape), dtype=dtype)
    for piece in local_pieces(live):
        fill_box(view_of(out, piece), piece.box)
    return DTensor.from_local(
        out.to(local.device), live.device_mesh, live.placements, run_check=False, shape=live.shape,
        stride=live.stride(),
    )  # fmt: skip


def slice_like(live: Any, full: torch.Tensor) -> Any:
    """A DTensor laid out as ``live`` holding this rank's parts of the plain tensor ``full``."""

    def copy(out: torch.Tensor, box: Box) -> None:
        region = full
        for dim, (offset, size) in enumerate(zip(box.offsets, box.sizes, strict=True)):
            region = region.narrow(dim, offset, size)
        out.copy_(region)

    return shard_like(live, full.dtype, copy)
