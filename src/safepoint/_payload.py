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

import contextlib
import ctypes
import itertools
import json
import struct
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._backup import TensorBackups, writable
from ._budget import ByteBudget
from ._checksum import Hasher, format_checksum, new_hasher
from ._codec import DTYPE_NAMES, DTYPES, PickledPayload
from ._errors import ConfigError, CorruptCheckpointError, SafepointError, StorageError
from ._manifest import EntryRecord, FileRecord, element_size
from ._sharded import chunk_bytes, chunk_sums
from ._storage import FileSink, LocalStorage, Storage
from ._storage.base import FileReader, SequentialReads

__all__ = [
    "CopyTargets",
    "PlannedFile",
    "PlannedTensor",
    "direct_target",
    "is_dense_on_cpu",
    "plan_file",
    "read_file",
    "write_file",
]

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
    chunk_sums: dict[int, str] | None = None,
) -> str:
    """Stream one planned file into ``sink``, hashing in the same pass; return the persisted checksum.

    Tensors that must be copied first (on a GPU, or not dense) are copied one at a time within ``budget``.
    ``written(leaf)`` is called as soon as nothing points into a leaf's memory any more (its bytes are in the
    sink or in the write buffer): a background save hands its staging buffer back there. With ``chunk_sums``,
    each tensor's bytes are also checksummed in chunks (:func:`safepoint._sharded.chunk_sums`), by leaf index."""
    hasher = new_hasher()
    out = _BufferedWriter(sink, hasher, buffer)
    out.put(memoryview(planned.header))
    for item in planned.tensors:
        tensor = leaves[item.leaf]
        nbytes = item.end - item.begin
        if not is_dense_on_cpu(tensor):
            with budget.hold(nbytes):
                keep, data = host_bytes(tensor)
                _chunked(chunk_sums, item, _checked(data, item))
                out.put(_checked(data, item))
                out.flush()  # the copy is released with the budget: nothing may still point into it
                del keep
        elif nbytes < _COALESCE_BYTES:
            if tensor.numel() * tensor.element_size() != nbytes:
                raise SafepointError(f"tensor {item.name!r} changed size while it was being saved")
            if chunk_sums is not None:
                _chunked(chunk_sums, item, host_bytes(tensor)[1])
            out.copy_small(tensor.data_ptr(), nbytes)  # the hot path of many small tensors: one memmove
        else:
            data = _checked(host_bytes(tensor)[1], item)
            _chunked(chunk_sums, item, data)
            out.put(data)
        if written is not None:
            written(item.leaf)
    out.flush()
    return format_checksum(hasher)


def _chunked(sums: dict[int, str] | None, item: PlannedTensor, data: memoryview) -> None:
    if sums is not None:
        sums[item.leaf] = chunk_sums(data, chunk_bytes(data.nbytes))


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
    keep: bool = True,
    copied: Collection[int] = (),
    into: Mapping[int, torch.Tensor] | None = None,
    backups: TensorBackups | None = None,
) -> dict[int, Any]:
    """Read one payload file, check its header against the manifest entries and verify its size and checksum.

    Returns ``{entry index: value}``, and only once every byte of the file matched its checksum. Every tensor
    owns a fresh allocation of exactly its size (as from ``torch.empty``: aligned, storage offset 0), and the
    file is read straight into those allocations in one sequential pass that also hashes every byte: the header
    is read and checked against the manifest first, so nothing is allocated for a file that disagrees with it.
    ndarray entries become numpy arrays over such memory; pickle entries become :class:`PickledPayload` (never
    unpickled here). With ``keep=False`` the file is only verified: its bytes go through a small scratch buffer.

    With ``mmap``, the values are views of a private memory map of the file instead (local storage only); its
    checksum is still verified before anything is returned, which reads every page once, into the page cache
    rather than into the process's own memory.

    ``copied`` names tensor entries that the caller only copies from and drops (restore's plain copies into live
    tensors): small ones that lie next to each other in the file become views of one buffer, read with one call
    and hashed once, instead of one allocation, one scatter-read buffer and one hash call each. Never pass an
    entry whose value anything could keep: it would share memory it does not show.

    ``into`` (with ``backups``) names copied entries to read straight into the live tensor they would be copied
    into (each one a :func:`direct_target`): its bytes are first kept in ``backups``, then the file's bytes are
    read into the tensor's own memory and hashed there; the value returned is the live tensor itself. On any
    failure the caller must put ``backups`` back (the file's pass stops at the first error).
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
    try:
        if mmap:
            return _read_mapped(storage, path, where, record, entries)
        with contextlib.closing(_open_reader(storage, path, size)) as reader:
            return _Pass(reader, where, record).run(entries, keep, copied, into or {}, backups)
    except FileNotFoundError as err:
        raise CorruptCheckpointError(f"{where} disappeared while it was read", path=where) from err


# -- the eager read: one pass, straight into owned tensors --------------------------------------------------------
#: Bytes per read call: small enough that hashing them right after the read finds them in the cache. Values
#: larger than this are read in slices of it; smaller ones are gathered into runs of about this size, each read
#: with one scatter read (``readv``) straight into the values' own memory.
_SLICE_BYTES = 4 << 20
#: Padding up to this size is read along with the values around it; a larger gap ends the run.
_GAP_BYTES = 64 << 10

_scratch = threading.local()  # one scratch buffer per reader thread, kept between files


def _scratch_buffer() -> memoryview:
    """``_SLICE_BYTES`` for bytes that hold no kept value: padding, and whole files that are only verified."""
    buffer: bytearray | None = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = bytearray(_SLICE_BYTES)
    return memoryview(buffer)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous tensor, as writable bytes (any dtype). The view does not keep the tensor alive:
    the caller does."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _open_reader(storage: Storage, path: str, size: int) -> FileReader:
    if isinstance(storage, SequentialReads):
        return storage.open_reader(path)
    # a backend without sequential reads: the whole file in one read_into, then served from memory
    where = storage.describe(path)
    try:
        buffer = torch.empty(size, dtype=torch.uint8)
    except RuntimeError as err:
        raise StorageError(f"cannot allocate {size} bytes to read {where}", path=where) from err
    reader = _MemoryReader(buffer)
    storage.read_into(path, reader.data, None)
    return reader


class _MemoryReader:
    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer  # owns the memory that ``data`` points into
        self.data, self.position = _bytes_of(buffer), 0

    def readinto(self, buffers: Sequence[memoryview]) -> None:
        for buffer in buffers:
            end = self.position + buffer.nbytes
            buffer.cast("B")[:] = self.data[self.position : end]
            self.position = end

    def close(self) -> None:
        self.data.release()


class _Slot(NamedTuple):
    begin: int  # offsets in the file
    end: int
    at: int  # the entry's index in the manifest
    entry: EntryRecord


class _Pass:
    """One front-to-back pass over a file: every byte is read once, hashed in file order, then checked."""

    def __init__(self, reader: FileReader, where: str, record: FileRecord) -> None:
        self.reader, self.where, self.record = reader, where, record
        self.hasher = new_hasher()
        self.position = 0

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {message}", path=self.where)

    def run(
        self,
        entries: Sequence[tuple[int, EntryRecord]],
        keep: bool,
        copied: Collection[int] = (),
        into: Mapping[int, torch.Tensor] | None = None,
        backups: TensorBackups | None = None,
    ) -> dict[int, Any]:
        try:
            slots = _Layout(self.where, self.record.size).slots(self._header(), entries)
            values = self._values(slots, copied, into if into and backups is not None else {}, backups) if keep else {}
        except CorruptCheckpointError:
            self._skip(self.record.size - self.position)
            self._check()  # damage anywhere is reported as damage; a header that disagrees, only if it is sealed
            raise
        self._skip(self.record.size - self.position)
        self._check()
        return values

    def _header(self) -> tuple[bytes, int]:
        size = self.record.size
        if size < 8:
            raise self.fail("too short to be a safetensors file")
        prefix = bytearray(8)
        self._read([memoryview(prefix)])
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise self.fail(f"declares a header of {length} bytes in a file of {size}")
        text = bytearray(length)
        self._read([memoryview(text)])
        return bytes(text), 8 + length

    def _check(self) -> None:
        if format_checksum(self.hasher) != self.record.checksum:
            raise self.fail("does not match its checksum (corrupted)")

    def _read(self, views: Sequence[memoryview]) -> None:
        """Fill ``views`` with the next bytes of the file (one call), then hash them in order."""
        self.reader.readinto(views)
        for view in views:
            self.hasher.update(view)
            self.position += view.nbytes

    def _skip(self, nbytes: int) -> None:
        """Read (and hash) bytes that hold no value: padding, trailing bytes, values not kept."""
        scratch = _scratch_buffer()
        while nbytes > 0:
            count = min(nbytes, scratch.nbytes)
            self._read([scratch[:count]])
            nbytes -= count

    def _values(
        self,
        slots: list[_Slot],
        copied: Collection[int],
        into: Mapping[int, torch.Tensor],
        backups: TensorBackups | None,
    ) -> dict[int, Any]:
        values: dict[int, Any] = {}
        run: list[memoryview] = []  # the next scatter read: small values, and the padding between them
        run_bytes = padding = 0  # padding: how much of the scratch buffer the run's gaps use
        together: list[_Slot] = []  # the next shared read: small copied values next to each other in the file
        in_place: list[tuple[_Slot, torch.Tensor]] = []  # the next read in place: small values, live tensors
        for slot in slots:
            target = into.get(slot.at)
            if target is not None and backups is not None and direct_target(target, slot.entry):
                if run:  # what is gathered before it, first (at most one of the three): the pass reads in order
                    self._read(run)
                self._read_together(together, values)
                run, run_bytes, padding, together = [], 0, 0, []
                in_place = self._into_live(slot, target, in_place, values, backups)
                continue
            if in_place and backups is not None:  # in_place is only filled with backups
                self._read_in_place(in_place, values, backups)
                in_place = []
            if slot.at in copied and slot.end - slot.begin < _SLICE_BYTES:
                if run:
                    self._read(run)
                    run, run_bytes, padding = [], 0, 0
                if together and (
                    slot.begin - together[-1].end > _GAP_BYTES or slot.end - together[0].begin > _SLICE_BYTES
                ):
                    self._read_together(together, values)
                    together = []
                together.append(slot)
                continue
            if together:
                self._read_together(together, values)
                together = []
            gap = slot.begin - self.position - run_bytes
            if run and (gap > _GAP_BYTES or run_bytes + gap + slot.end - slot.begin > _SLICE_BYTES):
                self._read(run)
                run, run_bytes, padding, gap = [], 0, 0, slot.begin - self.position
            if not run:
                self._skip(gap)
                gap = 0
            value, memory = self._allocate(slot)
            values[slot.at] = value
            if memory.nbytes >= _SLICE_BYTES:  # a large value: read alone, slice by slice
                for start in range(0, memory.nbytes, _SLICE_BYTES):
                    self._read([memory[start : start + _SLICE_BYTES]])
                continue
            if gap:  # each gap its own part of the scratch buffer: all are hashed after the one read
                run.append(_scratch_buffer()[padding : padding + gap])
                padding += gap
            run.append(memory)
            run_bytes += gap + memory.nbytes
        if run:
            self._read(run)
        self._read_together(together, values)  # at most one of the three is pending
        if in_place and backups is not None:
            self._read_in_place(in_place, values, backups)
        return {slot.at: _finish(values[slot.at], slot.entry) for slot in slots}

    def _into_live(
        self,
        slot: _Slot,
        target: torch.Tensor,
        pending: list[tuple[_Slot, torch.Tensor]],
        values: dict[int, Any],
        backups: TensorBackups,
    ) -> list[tuple[_Slot, torch.Tensor]]:
        """Read ``slot`` into its live tensor ``target``: a large value now, alone; a small one joins the
        ``pending`` run of small values next to each other (read first if it cannot). Returns the pending run."""
        if slot.end - slot.begin >= DIRECT_BYTES:
            self._read_in_place(pending, values, backups)
            values[slot.at] = self._read_direct(slot, target, backups)
            return []
        if pending and (slot.begin - pending[-1][0].end > _GAP_BYTES or slot.end - pending[0][0].begin > _SLICE_BYTES):
            self._read_in_place(pending, values, backups)
            pending = []
        pending.append((slot, target))
        return pending

    def _read_in_place(
        self, items: list[tuple[_Slot, torch.Tensor]], values: dict[int, Any], backups: TensorBackups
    ) -> None:
        """Read small values that lie next to each other in the file straight into their live tensors (each a
        :func:`direct_target`): all their bytes are kept first in one backup, then one scatter read fills them
        (the padding between them goes to the scratch buffer), hashed in file order; the values are the tensors."""
        if not items:
            return
        self._skip(items[0][0].begin - self.position)
        backups.keep_run([(slot.entry.key, target) for slot, target in items])
        views: list[memoryview] = []
        scratch, padding, position = _scratch_buffer(), 0, items[0][0].begin
        for slot, target in items:
            if slot.begin > position:  # the run spans at most _SLICE_BYTES, the scratch buffer's size
                views.append(scratch[padding : padding + slot.begin - position])
                padding += slot.begin - position
            views.append(_bytes_of(target))
            position = slot.end
            values[slot.at] = target
        self._read(views)

    def _read_direct(self, slot: _Slot, target: torch.Tensor, backups: TensorBackups) -> torch.Tensor:
        """Read ``slot`` straight into the live tensor ``target``, once its bytes are kept in ``backups``."""
        self._skip(slot.begin - self.position)
        backup = backups.keep(slot.entry.key, target)  # the keeper thread copies it aside while this reads
        memory = _bytes_of(target)
        for start in range(0, memory.nbytes, _SLICE_BYTES):
            backup.keep_to(start + _SLICE_BYTES)  # every byte is kept before it is written
            self._read([memory[start : start + _SLICE_BYTES]])
        return target

    def _read_together(self, slots: list[_Slot], values: dict[int, Any]) -> None:
        """Read the bytes from the first slot's start to the last one's end (padding included) into one buffer,
        with one call and one hash; each value is a view of it (copied values only: see read_file)."""
        if not slots:
            return
        self._skip(slots[0].begin - self.position)
        start = slots[0].begin
        try:
            buffer = torch.empty(slots[-1].end - start, dtype=torch.uint8)
        except RuntimeError as err:
            raise StorageError(f"cannot allocate {slots[-1].end - start} bytes to read {self.where}",
                               path=self.where) from err  # fmt: skip
        if buffer.numel():
            self._read([_bytes_of(buffer)])
        for slot in slots:
            entry, offset = slot.entry, slot.begin - start
            raw = buffer[offset : slot.end - start]
            if offset % element_size(entry.dtype):
                raw = raw.clone()  # a file not laid out by us: an aligned copy rather than a failed view
            values[slot.at] = raw.view(DTYPE_NAMES[entry.dtype]).view(entry.shape)

    def _allocate(self, slot: _Slot) -> tuple[Any, memoryview]:
        """A fresh value for ``slot`` and the memory its bytes are read into."""
        entry = slot.entry
        if entry.kind == "pickle":
            data = bytearray(slot.end - slot.begin)
            return data, memoryview(data)
        try:
            tensor = torch.empty(entry.shape, dtype=DTYPE_NAMES[entry.dtype])
        except RuntimeError as err:
            raise StorageError(f"cannot allocate {entry.nbytes} bytes for {entry.key!r} of {self.where}",
                               path=self.where) from err  # fmt: skip
        return tensor, _bytes_of(tensor)


#: Values at least this large are read into their live tensor alone, slice by slice, while the keeper thread copies
#: it aside; smaller ones lie next to each other in runs of up to this size, each kept in one backup and read with one
#: scatter read.
DIRECT_BYTES = _SLICE_BYTES


class CopyTargets(dict[int, torch.Tensor]):
    """Restore's copied entries (see :func:`read_file`'s ``copied``), each with the live tensor it is copied into.

    :attr:`given` names those that a module's ``load_state_dict`` receives instead of a plain ``copy_`` (its
    parameters and buffers): each may still be read straight into its live tensor, where the module's own copy
    then finds the bytes already in place; but read any other way, its value owns its memory, as a module may
    keep what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.given: set[int] = set()

    def shareable(self) -> set[int]:
        """The entries whose values may share one buffer: those only ``copy_`` receives."""
        return self.keys() - self.given


def direct_target(live: torch.Tensor, entry: EntryRecord) -> bool:
    """Whether ``entry``'s bytes, exactly as the file holds them, may be read into ``live``'s own memory: a plain
    (no subclass), dense, contiguous CPU tensor of the saved dtype and shape (so no cast, no byte swap), not an
    inference tensor (``copy_`` refuses those outside inference mode), and the only
    tensor that uses its storage: no view, tie or ``state_dict()`` copy elsewhere sees the bytes change while the
    restore is not yet complete, or could be written by something else in the same restore."""
    return (
        entry.kind == "tensor"
        and sys.byteorder == "little"
        and writable(live, DTYPE_NAMES[entry.dtype])
        and tuple(live.shape) == tuple(entry.shape)
        and not live.is_inference()
        and _sole_user(live)
    )


def _sole_user(tensor: torch.Tensor) -> bool:
    """No other tensor shares ``tensor``'s storage. torch keeps the count of a storage's users (each tensor, and
    each Python storage object such as the one asked for here); without that count, nothing is assumed."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # pragma: no cover - every torch this project supports has it
        return False
    storage = tensor.untyped_storage()
    return bool(use_count(storage._cdata) == 2)


def _finish(value: Any, entry: EntryRecord) -> Any:
    """The value an entry stands for: the tensor, a numpy array (or scalar) sharing its memory, or the pickle."""
    if entry.kind == "pickle":
        return PickledPayload(bytes(value), entry.key)
    tensor = value
    if entry.kind == "ndarray":
        array = tensor.numpy()
        # the parser admits scalar only for one element; reshape: shape [1] is how older writers stored them
        return array.reshape(())[()] if entry.scalar else array
    return tensor


# -- the mapped read: views of the file's pages ----------------------------------------------------------------
def _read_mapped(
    storage: Storage, path: str, where: str, record: FileRecord, entries: Sequence[tuple[int, EntryRecord]]
) -> dict[int, Any]:
    if not isinstance(storage, LocalStorage):
        raise ConfigError(f"mmap=True needs a checkpoint on a local file system, not {where}")
    hasher = new_hasher()
    if record.size == 0:  # nothing to map (mmap refuses empty files); the header check reports it
        buffer = torch.empty(0, dtype=torch.uint8)
    else:
        mapping = storage.map_file(path)  # the tensors keep the mapping alive
        view = memoryview(mapping)
        for start in range(0, len(view), _CHUNK_BYTES):
            hasher.update(view[start : start + _CHUNK_BYTES])
        view.release()
        buffer = torch.frombuffer(mapping, dtype=torch.uint8)
    if buffer.numel() != record.size:
        raise CorruptCheckpointError(f"{where} changed size while it was read", path=where)
    if format_checksum(hasher) != record.checksum:
        raise CorruptCheckpointError(f"{where} does not match its checksum (corrupted)", path=where)
    layout = _Layout(where, record.size)
    if record.size < 8:
        raise layout.fail("too short to be a safetensors file")
    (length,) = struct.unpack("<Q", buffer[:8].numpy().tobytes())
    if length > min(MAX_HEADER_BYTES, record.size - 8):
        raise layout.fail(f"declares a header of {length} bytes in a file of {record.size}")
    header = buffer[8 : 8 + length].numpy().tobytes()
    values: dict[int, Any] = {}
    for slot in layout.slots((header, 8 + length), entries):
        raw = buffer[slot.begin : slot.end]
        if slot.entry.kind == "pickle":
            values[slot.at] = PickledPayload(raw.numpy().tobytes(), slot.entry.key)
            continue
        if slot.begin % element_size(slot.entry.dtype):
            raw = raw.clone()  # a file not laid out by us: copy to an aligned buffer rather than fail
        values[slot.at] = _finish(raw.view(DTYPE_NAMES[slot.entry.dtype]).reshape(slot.entry.shape), slot.entry)
    return values


# -- the header, checked against the manifest before anything is allocated ----------------------------------------
class _Layout:
    def __init__(self, where: str, size: int) -> None:
        self.where, self.size = where, size

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {message}", path=self.where)

    def slots(self, header_text: tuple[bytes, int], entries: Sequence[tuple[int, EntryRecord]]) -> list[_Slot]:
        """Where each entry's bytes lie, in file order: every entry agrees with the manifest (dtype, shape, size),
        lies after the header and inside the file, and overlaps no other."""
        text, start = header_text
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise self.fail(f"header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise self.fail("header is not an object")
        header.pop("__metadata__", None)
        expected = {entry.name for _, entry in entries}
        if set(header) != expected:
            raise self.fail(f"holds tensors {sorted(set(header) ^ expected)[:5]} that the manifest does not agree on")
        slots = sorted(self.slot(header[entry.name], index, entry, start) for index, entry in entries)
        for before, after in itertools.pairwise(slots):
            if after.begin < before.end:
                raise self.fail(f"{before.entry.key!r} and {after.entry.key!r} overlap in the file")
        return slots

    def slot(self, spec: Any, index: int, entry: EntryRecord, start: int) -> _Slot:
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise self.fail(f"header entry for {entry.key!r} is malformed")
        if spec["dtype"] != entry.dtype or spec["shape"] != list(entry.shape):
            raise self.fail(f"{entry.key!r} is {spec['dtype']} {spec['shape']} in the file, "
                            f"{entry.dtype} {list(entry.shape)} in the manifest")  # fmt: skip
        offsets = spec["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise self.fail(f"{entry.key!r} has malformed offsets")
        begin, end = start + offsets[0], start + offsets[1]
        if not start <= begin <= end <= self.size or end - begin != entry.nbytes:
            raise self.fail(f"{entry.key!r} has offsets {offsets} that do not fit its shape or the file")
        return _Slot(begin, end, index, entry)
