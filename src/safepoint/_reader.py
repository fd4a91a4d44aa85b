"""Reading committed checkpoints: the manifest first, then every payload file verified against it.

Nothing read here reaches a live object: callers get verified plain values and decide what to apply.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ._backup import TensorBackups
from ._codec import DTYPE_NAMES, Sharded, assemble
from ._errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ._layout import MANIFEST_NAME, join
from ._manifest import MAX_MANIFEST_BYTES, EntryRecord, Manifest, check_relative_path
from ._payload import CopyTargets, read_file
from ._sharded import BoxReader, ReadRange, SavedBox, ShardedSaved, boxes_of, sharded_nodes
from ._storage import LocalStorage, Storage
from ._storage.base import Prefetch, PrefetchRanges, RangeFiles, RangeReads

__all__ = [
    "LoadedCheckpoint",
    "lazy_sharded",
    "range_reader",
    "read_checkpoint",
    "read_leaves",
    "read_manifest",
    "saved_boxes",
    "verify_checkpoint",
]


@dataclass(frozen=True)
class LoadedCheckpoint:
    checkpoint: str  # relative to the storage root
    manifest: Manifest
    leaves: list[Any]  # entry index -> verified value (tensor, ndarray, PickledPayload)
    #: how a sharded node becomes a value: by default the full tensor from its (read) boxes' leaves
    sharded: Sharded = assemble
    #: the live tensors this read wrote in place (its leaves are those tensors), with their bytes from before: the
    #: restore puts them back if it does not complete (see :func:`read_leaves`)
    backups: TensorBackups | None = None


def read_manifest(storage: Storage, checkpoint: str, *, step: int | None = None, prefetch: bool = False) -> Manifest:
    """The parsed manifest of a committed checkpoint; CheckpointNotFoundError if it is not committed.

    With ``step``, a manifest for another step (moved or copied from another checkpoint) is corrupt, and is
    reported as the bad file before any payload is read. With ``prefetch``, the first payload files the readers
    will open are hinted to the storage before the manifest is parsed (see :func:`_prefetch`)."""
    path = join(checkpoint, MANIFEST_NAME)
    where = storage.describe(path)
    try:
        data = storage.read_bytes(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.describe(checkpoint)}") from err
    if prefetch and isinstance(storage, Prefetch):
        _prefetch(storage, checkpoint, data)
    manifest = Manifest.from_json(data, where)
    if step is not None and manifest.step != step:
        raise CorruptCheckpointError(
            f"{where} is the manifest of step {manifest.step}, not of step {step} (a file was moved or copied)",
            path=where,
        )
    return manifest


#: The paths of the file records in a manifest's canonical JSON (sorted keys: "checksum", "path", "size"); no
#: other object in a manifest has a "path" field followed by "size".
_FILE_PATHS = re.compile(rb'"path":"([^"\\]{1,600})","size":')


def _prefetch(storage: Prefetch, checkpoint: str, data: bytes) -> None:
    """Start the storage on the payload files the readers open first while the manifest is parsed and checked
    (for 10 000 entries that took 0.2 s, with the disk idle): the files are found in the raw text, before the
    manifest is verified, so only safe relative names are used, and only as a hint; nothing is read from them
    here. At most the first READER_THREADS files: a hint for all of a checkpoint larger than memory would push
    the first files out of the page cache before they are read."""
    for match in itertools.islice(_FILE_PATHS.finditer(data), READER_THREADS):
        try:
            name = check_relative_path(match.group(1).decode("ascii"), checkpoint)
        except (UnicodeDecodeError, UnsafeCheckpointError):
            continue
        storage.prefetch(join(checkpoint, name))


def _by_file(manifest: Manifest) -> dict[int, list[tuple[int, EntryRecord]]]:
    grouped: dict[int, list[tuple[int, EntryRecord]]] = defaultdict(list)
    for index, entry in enumerate(manifest.entries):
        grouped[entry.file].append((index, entry))
    return grouped


#: Files read at once: reads, waits for the disk and checksums of large buffers release the interpreter.
READER_THREADS = 4


def read_checkpoint(
    storage: Storage,
    checkpoint: str,
    *,
    step: int | None = None,
    mmap: bool = False,
    copied: Callable[[Manifest], Collection[int]] | None = None,
    backups: TensorBackups | None = None,
) -> LoadedCheckpoint:
    """Read and verify every byte of a checkpoint, several files at once; raise CorruptCheckpointError naming
    the first bad file (in manifest order). ``mmap``, ``copied`` (called with the verified manifest) and
    ``backups``: see :func:`read_leaves`."""
    manifest = read_manifest(storage, checkpoint, step=step, prefetch=not mmap)
    shared = copied(manifest) if copied is not None else ()
    leaves = read_leaves(storage, checkpoint, manifest, mmap=mmap, copied=shared, backups=backups)
    return LoadedCheckpoint(checkpoint, manifest, leaves, backups=backups)


def read_leaves(
    storage: Storage,
    checkpoint: str,
    manifest: Manifest,
    only: Collection[int] | None = None,
    *,
    mmap: bool = False,
    copied: Collection[int] = (),
    backups: TensorBackups | None = None,
) -> list[Any]:
    """The verified value of every entry (of the entries in ``only``; the others stay None), several files at
    once. A file holding none of the wanted entries is not read at all.

    ``copied``: entries the caller only copies from and then drops (restore's plain tensor copies): their
    values may share memory with each other, which saves an allocation, a scatter-read buffer and a hash call
    per value. Every other value owns its memory (see :func:`~safepoint._payload.read_file`).

    With ``backups``, local storage, and ``copied`` a mapping from those entries to the live tensors they are
    copied into, the large ones go straight into their live tensor, behind a backup (see
    :func:`~safepoint._payload.direct_target`): their leaves are the live tensors, already holding the verified
    bytes. If any file fails, every tensor written is put back before the error propagates, once every reader
    has stopped; after a success the caller owns ``backups``: it puts them back if the restore does not complete.
    """
    leaves: list[Any] = [None] * len(manifest.entries)
    grouped = _by_file(manifest)
    # local files only: on an object store the network, not a copy, bounds a restore, so the plain path stays
    into = _targets(copied) if backups is not None and not mmap and isinstance(storage, LocalStorage) else {}
    if isinstance(copied, CopyTargets):  # a module's values are read into its tensors, or own their memory
        copied = copied.shareable()
    wanted_files = [
        index
        for index in range(len(manifest.files))
        if only is None or any(entry in only for entry, _ in grouped.get(index, []))
    ]  # a file holding none of the wanted entries is not read at all

    def read(file_index: int) -> dict[int, Any]:
        record = manifest.files[file_index]
        return read_file(storage, checkpoint, record, grouped.get(file_index, []), mmap=mmap, copied=copied,
                         into=into, backups=backups)  # fmt: skip

    try:
        results = _read_files(read, wanted_files)
    except BaseException as err:
        if backups is not None:  # every reader has stopped: nothing writes into a live tensor any more
            backups.roll_back(err)
        raise
    for values in results:
        for index, value in values.items():
            leaves[index] = value
    wanted = range(len(leaves)) if only is None else only
    # the parser guarantees every entry has a file
    if any(leaves[index] is None for index in wanted):  # pragma: no cover
        raise CorruptCheckpointError(f"{storage.describe(checkpoint)}: an entry has no data")
    return leaves


def _read_files(read: Callable[[int], dict[int, Any]], files: list[int]) -> list[dict[int, Any]]:
    """``read`` every file, several at once; raise the first failure in file order, only once no read runs."""
    if len(files) <= 1:
        return [read(i) for i in files]
    with ThreadPoolExecutor(min(READER_THREADS, len(files)), thread_name_prefix="safepoint-read") as pool:
        futures = [pool.submit(read, i) for i in files]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:  # files not started yet are not read; those being read finish first
                future.cancel()
            raise


def _targets(copied: Collection[int]) -> dict[int, torch.Tensor]:
    """The live tensors that copied entries may be read into, each tensor at most once (one that two entries would
    be copied into keeps the copies, in their order); the reader checks each one (:func:`direct_target`)."""
    if not isinstance(copied, Mapping):
        return {}
    seen: dict[int, int] = {}
    for tensor in copied.values():
        seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {entry: tensor for entry, tensor in copied.items() if seen[id(tensor)] == 1}


def verify_checkpoint(storage: Storage, checkpoint: str, *, step: int | None = None) -> Manifest:
    """Check every byte of a checkpoint and every file's header against the manifest, one file at a time; the
    bytes go through a small reused buffer, so no value is built and memory stays bounded. Every box of a
    sharded tensor is also checked against its chunk checksums (what a resharding restore verifies)."""
    manifest = read_manifest(storage, checkpoint, step=step)
    grouped = _by_file(manifest)
    for file_index, record in enumerate(manifest.files):
        read_file(storage, checkpoint, record, grouped.get(file_index, []), keep=False)
    reader = BoxReader(range_reader(storage))
    places = file_places(storage, checkpoint, manifest)
    for node in sharded_nodes(manifest.tree):
        for box in saved_boxes(manifest, node, places):
            reader.verify(box, DTYPE_NAMES[node["dtype"]])
    return manifest


def file_places(storage: Storage, checkpoint: str, manifest: Manifest) -> list[tuple[str, str]]:
    """Each payload file's path in the storage and its description (for messages), in the manifest's order: worked
    out once per checkpoint, not once per box."""
    places = []
    for record in manifest.files:
        path = join(checkpoint, record.path)
        places.append((path, storage.describe(path)))
    return places


def saved_boxes(manifest: Manifest, node: dict[str, Any], places: Sequence[tuple[str, str]]) -> list[SavedBox]:
    """The boxes of a sharded node, each with its file's place (``places``, from :func:`file_places`)."""
    found = []
    for record in boxes_of(node):
        path, where = places[manifest.entries[record.entry].file]
        found.append(SavedBox(record, path, where))
    return found


def lazy_sharded(storage: Storage, checkpoint: str, manifest: Manifest, files: RangeFiles | None = None) -> Sharded:
    """Sharded nodes as :class:`ShardedSaved` values: read later, only where a live target needs them (through
    ``files``, held open by the caller, where given)."""
    reader = BoxReader(
        range_reader(storage, files), files.prefetch_range if isinstance(files, PrefetchRanges) else None
    )

    places = file_places(storage, checkpoint, manifest)

    def value(node: Mapping[str, Any], leaves: Sequence[Any]) -> ShardedSaved:
        boxes = saved_boxes(manifest, dict(node), places)
        key = manifest.entries[boxes[0].record.entry].key if boxes else ""
        return ShardedSaved(key, DTYPE_NAMES[node["dtype"]], tuple(node["shape"]), boxes, reader)

    return value


def range_reader(storage: Storage, files: RangeFiles | None = None) -> ReadRange:
    """Reads of byte ranges: through ``files`` where given, ranged reads where the backend has them, else the
    whole file, then the range (correct, not economical). A file that is missing or too short is corrupt."""
    ranged = files if files is not None else storage if isinstance(storage, RangeReads) else None

    def read(path: str, offset: int, buffer: memoryview) -> None:
        try:
            if ranged is not None:
                ranged.read_range(path, offset, buffer)
                return
            whole = bytearray(storage.size(path))
            storage.read_into(path, memoryview(whole), None)
        except FileNotFoundError as err:
            where = storage.describe(path)  # only for the message: a restore makes hundreds of these reads
            raise CorruptCheckpointError(f"{where} is missing", path=where) from err
        if offset + buffer.nbytes > len(whole):
            where = storage.describe(path)
            raise CorruptCheckpointError(f"{where} is too short (truncated)", path=where)
        buffer[:] = whole[offset : offset + buffer.nbytes]

    return read
