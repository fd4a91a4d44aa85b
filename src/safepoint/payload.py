"""Tensor payload files in the safetensors format: a streaming writer and a strict, verifying reader.

Why not ``safetensors.torch.save_file``/``load_file``: the commit protocol needs the checksum computed in the
same pass as the write (no second read of the data), an fsync before the file counts, and a reader that checks
every byte against the manifest *before* any of it is interpreted. The files are standard safetensors (the
test-suite opens them with the safetensors library), so other tools read them directly.

Layout choices: tensors are ordered by decreasing element size, so every tensor starts at an offset aligned to
its element size and can be viewed in place from one read buffer with no copy; the header is padded with spaces
to 8 bytes, as the format allows. Small tensors are coalesced into one write buffer; large ones are hashed and
written in chunks that stay in cache between the hash and the write.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .budget import ByteBudget
from .checksum import Hasher, format_checksum, new_hasher
from .codec import DTYPE_NAMES, DTYPES, PickledPayload
from .errors import ConfigError, CorruptCheckpointError, SafepointError, StorageError
from .manifest import EntryRecord, FileRecord, element_size
from .storage import FileSink, LocalStorage, Storage

__all__ = ["PlannedFile", "PlannedTensor", "is_dense_on_cpu", "plan_file", "read_file", "write_file"]

#: Headers larger than this are refused before they are parsed.
MAX_HEADER_BYTES = 256 << 20
#: Tensors below this size are copied into the write buffer; larger ones are written from their own memory.
_COALESCE_BYTES = 1 << 20
#: Large tensors are hashed and written in chunks of this size, so the hash and the write share the cache.
_CHUNK_BYTES = 8 << 20
WRITE_BUFFER_BYTES = 16 << 20


class PlannedTensor(NamedTuple):  # a NamedTuple: one per tensor, and a frozen dataclass costs 5x to build
    leaf: int  # index into the encoded leaves
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets in the data section, as safetensors records them
    end: int


@dataclass(frozen=True)
class PlannedFile:
    path: str
    header: bytes
    tensors: tuple[PlannedTensor, ...]

    @property
    def size(self) -> int:
        return len(self.header) + (self.tensors[-1].end if self.tensors else 0)

    @property
    def buffer_bytes(self) -> int:
        """The write buffer this file needs: its header and small tensors are coalesced, at most 16 MiB."""
        small = sum(t.end - t.begin for t in self.tensors if t.end - t.begin < _COALESCE_BYTES)
        return min(WRITE_BUFFER_BYTES, len(self.header) + small)


def plan_file(path: str, items: Sequence[tuple[int, str, torch.Tensor]]) -> PlannedFile:
    """Lay out ``(leaf index, name, tensor)`` items in one file: order, offsets and the exact header bytes."""
    described = [(leaf, name, DTYPES[tensor.dtype], tensor.shape, tensor.numel()) for leaf, name, tensor in items]
    described.sort(key=lambda item: -element_size(item[2]))  # stable: keeps state order within a size
    planned: list[PlannedTensor] = []
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "safepoint"}}
    offset = 0
    for leaf, name, dtype, shape, numel in described:
        end = offset + numel * element_size(dtype)
        planned.append(PlannedTensor(leaf, name, dtype, tuple(shape), offset, end))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return PlannedFile(path, struct.pack("<Q", len(text)) + text, tuple(planned))


def is_dense_on_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous() and not (tensor.is_conj() or tensor.is_neg())


def host_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """The tensor's bytes in host memory; copies only a tensor that is not already dense on the CPU.
    The returned tensor must be kept alive while the view is used."""
    if not is_dense_on_cpu(tensor):
        tensor = tensor.to("cpu").resolve_conj().resolve_neg().contiguous()
    numel = tensor.numel()
    if numel == 0:
        return tensor, memoryview(b"")
    # not reshape(-1): a contiguous tensor may keep any stride on a size-1 dim ([::2] of two elements has
    # stride 2), which view(uint8) refuses; the elements are dense from the storage offset, so flatten by hand
    flat = tensor if tensor.dim() == 1 else tensor.as_strided((numel,), (1,))
    return tensor, flat.view(torch.uint8).numpy().data


def write_file(
    sink: FileSink,
    planned: PlannedFile,
    leaves: Sequence[torch.Tensor],
    buffer: bytearray,
    budget: ByteBudget,
    *,
    written: Callable[[int], None] | None = None,
) -> str:
    """Stream one planned file into ``sink``, hashing in the same pass; return the persisted checksum.

    Tensors that must be copied first (on a GPU, or not dense) are copied one at a time within ``budget``.
    ``written(leaf)`` is called as soon as nothing points into a leaf's memory any more (its bytes are in the
    sink or in the write buffer): a background save hands its staging buffer back there."""
    hasher = new_hasher()
    out = _BufferedWriter(sink, hasher, buffer)
    out.put(memoryview(planned.header))
    for item in planned.tensors:
        tensor = leaves[item.leaf]
        nbytes = item.end - item.begin
        if not is_dense_on_cpu(tensor):
            with budget.hold(nbytes):
                keep, data = host_bytes(tensor)
                out.put(_checked(data, item))
                out.flush()  # the copy is released with the budget: nothing may still point into it
                del keep
        elif nbytes < _COALESCE_BYTES:
            if tensor.numel() * tensor.element_size() != nbytes:
                raise SafepointError(f"tensor {item.name!r} changed size while it was being saved")
            out.copy_small(tensor.data_ptr(), nbytes)  # the hot path of many small tensors: one memmove
        else:
            out.put(_checked(host_bytes(tensor)[1], item))
        if written is not None:
            written(item.leaf)
    out.flush()
    return format_checksum(hasher)


def _checked(data: memoryview, item: PlannedTensor) -> memoryview:
    if data.nbytes != item.end - item.begin:
        raise SafepointError(f"tensor {item.name!r} changed size while it was being saved")
    return data


class _BufferedWriter:
    def __init__(self, sink: FileSink, hasher: Hasher, buffer: bytearray) -> None:
        self.sink, self.hasher, self.fill = sink, hasher, 0
        self.buffer = memoryview(buffer)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if len(buffer) else 0

    def copy_small(self, address: int, size: int) -> None:
        """Append ``size`` bytes at ``address`` (a dense CPU tensor's data, kept alive by the caller)."""
        if size > len(self.buffer) - self.fill:
            self.flush()
        ctypes.memmove(self.address + self.fill, address, size)
        self.fill += size

    def put(self, data: memoryview) -> None:
        size = data.nbytes
        if size < _COALESCE_BYTES:
            if size > len(self.buffer) - self.fill:
                self.flush()
            self.buffer[self.fill : self.fill + size] = data
            self.fill += size
            return
        self.flush()
        for start in range(0, size, _CHUNK_BYTES):
            chunk = data[start : start + _CHUNK_BYTES]
            self.hasher.update(chunk)
            self.sink.write(chunk)

    def flush(self) -> None:
        if self.fill:
            chunk = self.buffer[: self.fill]
            self.hasher.update(chunk)
            self.sink.write(chunk)
            self.fill = 0


def read_file(
    storage: Storage,
    base: str,
    record: FileRecord,
    entries: Sequence[tuple[int, EntryRecord]],
    *,
    mmap: bool = False,
) -> dict[int, Any]:
    """Read one payload file, verify its size and checksum, then check its header against the manifest entries.

    Returns ``{entry index: value}``: tensors are views of one read buffer (the file is read straight into the
    memory the tensors keep: no second copy); ndarray entries become numpy arrays sharing that memory; pickle
    entries become :class:`PickledPayload` (never unpickled here). With ``mmap``, the buffer is a private
    memory map of the file instead (local storage only); its checksum is still verified before anything is
    returned, which reads every page once, into the page cache rather than into the process's own memory.
    """
    path = f"{base}/{record.path}" if base else record.path
    where = storage.describe(path)
    try:
        size = storage.size(path)
    except FileNotFoundError as err:
        raise CorruptCheckpointError(f"{where} is missing", path=where) from err
    if size != record.size:
        raise CorruptCheckpointError(
            f"{where} is {size} bytes, but the manifest says {record.size} (truncated or overwritten)",
            path=where,
        )
    hasher = new_hasher()
    try:
        buffer = _mapped(storage, path, hasher) if mmap else _read(storage, path, size, hasher)
    except FileNotFoundError as err:
        raise CorruptCheckpointError(f"{where} disappeared while it was read", path=where) from err
    if buffer.numel() != record.size:
        raise CorruptCheckpointError(f"{where} changed size while it was read", path=where)
    if format_checksum(hasher) != record.checksum:
        raise CorruptCheckpointError(f"{where} does not match its checksum (corrupted)", path=where)
    return _Header(where, buffer).tensors(entries)


def _read(storage: Storage, path: str, size: int, hasher: Hasher) -> torch.Tensor:
    try:
        buffer = torch.empty(size, dtype=torch.uint8)
    except RuntimeError as err:
        where = storage.describe(path)
        raise StorageError(f"cannot allocate {size} bytes to read {where}", path=where) from err
    storage.read_into(path, buffer.numpy().data, hasher)
    return buffer


def _mapped(storage: Storage, path: str, hasher: Hasher) -> torch.Tensor:
    if not isinstance(storage, LocalStorage):
        raise ConfigError(f"mmap=True needs a checkpoint on a local file system, not {storage.describe(path)}")
    if storage.size(path) == 0:  # nothing to map (mmap refuses empty files); the header check reports it
        return torch.empty(0, dtype=torch.uint8)
    mapping = storage.map_file(path)  # the tensor keeps the mapping alive
    view = memoryview(mapping)
    for start in range(0, len(view), _CHUNK_BYTES):
        hasher.update(view[start : start + _CHUNK_BYTES])
    view.release()
    return torch.frombuffer(mapping, dtype=torch.uint8)


class _Header:
    def __init__(self, where: str, buffer: torch.Tensor) -> None:
        self.where, self.buffer = where, buffer

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {message}", path=self.where)

    def tensors(self, entries: Sequence[tuple[int, EntryRecord]]) -> dict[int, Any]:
        size = self.buffer.numel()
        if size < 8:
            raise self.fail("too short to be a safetensors file")
        (length,) = struct.unpack("<Q", self.buffer[:8].numpy().tobytes())
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise self.fail(f"declares a header of {length} bytes in a file of {size}")
        try:
            header = json.loads(self.buffer[8 : 8 + length].numpy().tobytes())
        except (ValueError, RecursionError) as err:
            raise self.fail(f"header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise self.fail("header is not an object")
        header.pop("__metadata__", None)
        expected = {entry.name for _, entry in entries}
        if set(header) != expected:
            raise self.fail(f"holds tensors {sorted(set(header) ^ expected)[:5]} that the manifest does not agree on")
        start = 8 + length
        return {index: self.value(header[entry.name], entry, start, size) for index, entry in entries}

    def value(self, spec: Any, entry: EntryRecord, start: int, size: int) -> Any:
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise self.fail(f"header entry for {entry.key!r} is malformed")
        if spec["dtype"] != entry.dtype or spec["shape"] != list(entry.shape):
            raise self.fail(f"{entry.key!r} is {spec['dtype']} {spec['shape']} in the file, "
                            f"{entry.dtype} {list(entry.shape)} in the manifest")  # fmt: skip
        offsets = spec["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise self.fail(f"{entry.key!r} has malformed offsets")
        begin, end = start + offsets[0], start + offsets[1]
        if not start <= begin <= end <= size or end - begin != entry.nbytes:
            raise self.fail(f"{entry.key!r} has offsets {offsets} that do not fit its shape or the file")
        raw = self.buffer[begin:end]
        if entry.kind == "pickle":
            return PickledPayload(raw.numpy().tobytes(), entry.key)
        dtype = DTYPE_NAMES[entry.dtype]
        if begin % element_size(entry.dtype):
            raw = raw.clone()  # a file not laid out by us: copy to an aligned buffer rather than fail
        tensor = raw.view(dtype).reshape(entry.shape)
        if entry.kind == "ndarray":
            array = tensor.numpy()
            # the parser admits scalar only for one element; reshape: shape [1] is how older writers stored them
            return array.reshape(())[()] if entry.scalar else array
        return tensor
