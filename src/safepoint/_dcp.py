"""Reading a ``torch.distributed.checkpoint`` (DCP) checkpoint directory into full tensors, for ``import``.

What DCP's default ``FileSystemWriter`` (torch 2.13) puts on disk, and what this module relies on:

- ``.metadata``: a pickle of ``Metadata``: ``state_dict_metadata`` maps each flattened key ("optim.state.0.exp_avg")
  to a ``TensorStorageMetadata`` (dtype, global size, the chunks each rank wrote as offsets + sizes) or a
  ``BytesStorageMetadata``; ``storage_data`` maps a ``MetadataIndex`` (key, chunk offsets) to a ``_StorageInfo``
  (file name relative to the directory, byte offset, byte length, storage-extension descriptors);
  ``planner_data`` maps each flattened key to its original path, ``("optim", "state", "0", "exp_avg")``.
- ``__<rank>_<n>.distcp``: the items one after another, each a complete ``torch.save`` stream: a tensor chunk is
  ``torch.save(local_chunk)``, a bytes item is ``torch.save(value)`` of a non-tensor value (an int, a tuple, ...).
  (``serialization_format=SAFETENSORS`` and storage extensions such as compression write otherwise: refused.)

torch offers no safe reader for ``.metadata``: DCP unpickles it with plain ``pickle.load``, and
``torch.load(weights_only=True)`` refuses it even with every DCP class in ``safe_globals`` (its unpickler does not
know protocol 4's FRAME opcode, which ``pickle.dump`` writes); its allow-list would also call the real classes.

The pickle is never unpickled as such. ``_MetadataUnpickler`` resolves exactly the globals a DCP metadata pickle
names (``_ALLOWED``) to inert stand-in classes made for each load, which only record the arguments and state the
pickle gives them; no DCP class, no torch function and nothing else is ever called. Any other global is an
UnsafeCheckpointError naming the file and the global. The recorded values are then parsed strictly into this
module's own frozen dataclasses, so an allowed class built with unexpected arguments is a CorruptCheckpointError.
Items are decoded with ``torch.load(weights_only=True)``; a bytes item that needs arbitrary pickle is refused.
Before anything is allocated, every box must lie inside its tensor and the boxes must cover it exactly once, and
every byte range must lie inside a regular file of the directory; each item must then match the CRC-32s torch.save
recorded and decode to the dtype and shape of its box, before it is copied into its full tensor.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ._codec import DTYPES
from ._errors import ConversionError, CorruptCheckpointError, SafepointError, UnsafeCheckpointError, mapped_errors

__all__ = ["METADATA_NAME", "DcpCheckpoint", "read_dcp"]

METADATA_NAME = ".metadata"
#: A ``.metadata`` larger than this is refused before it is read (a model of 100k tensors on 1k ranks needs ~100 MB).
_MAX_METADATA_BYTES = 1 << 30
_MAX_DIMS = 64
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
#: Every dtype torch has, by the name its pickle uses (``torch.float32`` pickles as the global ``torch float32``).
#: Parsing refuses the ones safepoint cannot store with a ConversionError; the unpickler lets all of them through
#: so that an unusual dtype is reported as such, not as an unsafe pickle.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)
}
#: The globals a DCP ``.metadata`` pickle names, and why each is needed. Nothing else is resolved.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        (_METADATA, "Metadata"),  # the root object
        (_METADATA, "TensorStorageMetadata"),  # a tensor key: properties, global size, chunks
        (_METADATA, "BytesStorageMetadata"),  # a non-tensor key, torch.saved into a .distcp file
        (_METADATA, "ChunkStorageMetadata"),  # one rank's box of a tensor: offsets and sizes
        (_METADATA, "TensorProperties"),  # the dtype (its layout, requires_grad, memory format are deprecated)
        (_METADATA, "_MEM_FORMAT_ENCODING"),  # the enum TensorProperties pickles its memory format as
        (_METADATA, "MetadataIndex"),  # the key of storage_data: (key, chunk offsets)
        (_METADATA, "StorageMeta"),  # checkpoint_id and save_id of the save: read, never used
        (_FILESYSTEM, "_StorageInfo"),  # where an item is: file, offset, length, storage-extension descriptors
        ("torch", "Size"),  # global sizes, chunk offsets and sizes
        ("torch.serialization", "_get_layout"),  # how torch.layout pickles (torch.strided)
        # StorageMeta.checkpoint_id is the path save() was given: a pathlib object when it was one (Lightning's is)
        *((module, kind) for module in ("pathlib", "pathlib._local") for kind in ("PosixPath", "PurePosixPath")),
        *(("torch", name) for name in _TORCH_DTYPES),  # TensorProperties.dtype
    }
)


# -- the restricted unpickler -----------------------------------------------------------------------------------
class _StandIn:
    """An instance of what the pickle asked to build, held as data: the arguments of its construction (REDUCE or
    NEWOBJ) and the state BUILD gave it. Its class says which allowed global it stands for."""

    global_name = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any) -> _StandIn:
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED`` globals, each to a stand-in class made for this load (so nothing a pickle does to
    a class it was given outlives the load); refuses every other global before anything is called."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file)
        self.path = path
        self.stand_ins: dict[tuple[str, str], type[_StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafeCheckpointError(
                f"{self.path} asks for the global {module}.{name}, which a DCP metadata file never needs; "
                "it was refused and nothing in it ran",
                path=self.path,
            )
        if (module, name) not in self.stand_ins:
            self.stand_ins[(module, name)] = type(name, (_StandIn,), {"global_name": f"{module}.{name}"})
        return self.stand_ins[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.path} holds a persistent id, which a DCP metadata file never has",
                                    path=self.path)  # fmt: skip


def _unpickle_metadata(path: str) -> Any:
    with mapped_errors("read", path), open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > _MAX_METADATA_BYTES:
            raise CorruptCheckpointError(f"{path} is {size} bytes, more than a DCP metadata file may be", path=path)
        data = file.read()
    try:
        return _MetadataUnpickler(io.BytesIO(data), path).load()
    except SafepointError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            RecursionError, OverflowError, UnicodeDecodeError, MemoryError) as err:  # fmt: skip
        raise CorruptCheckpointError(f"{path} is not a readable DCP metadata file: {err!r}", path=path) from err


# -- parsing what was recorded into this module's own types ------------------------------------------------------
@dataclass(frozen=True)
class _Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def volume(self) -> int:
        volume = 1
        for size in self.sizes:
            volume *= size
        return volume


@dataclass(frozen=True)
class _TensorKey:
    dtype: torch.dtype
    shape: tuple[int, ...]
    boxes: tuple[_Box, ...]


@dataclass(frozen=True)
class _Item:
    file: str  # relative to the checkpoint directory, checked to be a plain file name
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass(frozen=True)
class _Metadata:
    keys: dict[str, _TensorKey | None]  # None: a bytes item
    paths: dict[str, tuple[str | int, ...]] | None  # planner_data
    items: dict[tuple[str, tuple[int, ...] | None], _Item]


class _Parser:
    """Turns the stand-ins of one ``.metadata`` into ``_Metadata``, refusing any shape DCP does not write."""

    def __init__(self, path: str) -> None:
        self.path = path

    def bad(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path} is not a DCP metadata file safepoint understands: {what}",
                                      path=self.path)  # fmt: skip

    def fields(self, value: Any, kind: str, names: tuple[str, ...]) -> dict[str, Any]:
        """The fields of a dataclass the pickle built, from its constructor arguments and its BUILD state."""
        if not isinstance(value, _StandIn) or value.global_name != kind:
            raise self.bad(f"expected a {kind.rsplit('.', 1)[-1]}, found {_describe(value)}")
        if len(value.args) > len(names):
            raise self.bad(f"{kind} built with {len(value.args)} arguments")
        found = dict(zip(names, value.args, strict=False))
        if value.state is not None:
            if not isinstance(value.state, dict) or not all(isinstance(k, str) for k in value.state):
                raise self.bad(f"{kind} with a state of type {type(value.state).__name__}")
            unknown = sorted(set(value.state) - set(names))
            if unknown:
                raise self.bad(f"{kind} has unknown fields {unknown}")
            found.update(value.state)
        return found

    def metadata(self, root: Any) -> _Metadata:
        names = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")
        found = self.fields(root, f"{_METADATA}.Metadata", names)
        keys = found.get("state_dict_metadata")
        if not isinstance(keys, dict) or not all(isinstance(k, str) for k in keys):
            raise self.bad("state_dict_metadata is not a dict of keys")
        version = found.get("version")
        if version is not None and not isinstance(version, str):
            raise self.bad("version is not a string")
        if found.get("storage_meta") is not None:
            self.fields(found["storage_meta"], f"{_METADATA}.StorageMeta", ("checkpoint_id", "save_id", "load_id",
                                                                            "modules"))  # fmt: skip
        return _Metadata(
            keys={key: self.storage(key, value) for key, value in keys.items()},
            paths=self.paths(found.get("planner_data")),
            items=self.items(found.get("storage_data")),
        )

    def storage(self, key: str, value: Any) -> _TensorKey | None:
        if isinstance(value, _StandIn) and value.global_name == f"{_METADATA}.BytesStorageMetadata":
            self.fields(value, value.global_name, ())
            return None
        found = self.fields(value, f"{_METADATA}.TensorStorageMetadata", ("properties", "size", "chunks"))
        shape = self.size(found.get("size"))
        chunks = found.get("chunks")
        if not isinstance(chunks, list):
            raise self.bad(f"the chunks of {key!r} are not a list")
        boxes = []
        for chunk in chunks:
            box = self.fields(chunk, f"{_METADATA}.ChunkStorageMetadata", ("offsets", "sizes"))
            boxes.append(_Box(self.size(box.get("offsets")), self.size(box.get("sizes"))))
        return _TensorKey(self.dtype(key, found.get("properties")), shape, tuple(boxes))

    def dtype(self, key: str, properties: Any) -> torch.dtype:
        if not isinstance(properties, _StandIn) or properties.global_name != f"{_METADATA}.TensorProperties":
            raise self.bad(f"the properties of {key!r} are {_describe(properties)}")
        state = properties.state
        if isinstance(state, tuple) and len(state) == 5 and not properties.args:  # TensorProperties.__getstate__
            dtype, layout, requires_grad, memory_format, pin_memory = state
        else:
            names = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
            found = self.fields(properties, properties.global_name, names)
            dtype, layout = found.get("dtype"), found.get("layout")
            requires_grad, memory_format, pin_memory = (found.get(n, False) for n in names[2:])
        if not isinstance(requires_grad, bool) or not isinstance(pin_memory, bool):
            raise self.bad(f"the properties of {key!r} hold a flag that is not a bool")
        if layout is not None and not (
            isinstance(layout, _StandIn) and layout.global_name == "torch.serialization._get_layout"
            and layout.args == ("torch.strided",) and layout.state is None
        ):  # fmt: skip
            raise ConversionError(f"{self.path}: {key!r} has the layout {_describe(layout)}; only dense "
                                  "(torch.strided) tensors can be imported", path=self.path)  # fmt: skip
        if memory_format is not None and not (
            isinstance(memory_format, _StandIn) and memory_format.global_name == f"{_METADATA}._MEM_FORMAT_ENCODING"
            and memory_format.args in ((0,), (1,), (2,)) and memory_format.state is None
        ):  # fmt: skip
            raise self.bad(f"the memory format of {key!r} is {_describe(memory_format)}")
        if not (isinstance(dtype, type) and issubclass(dtype, _StandIn) and dtype.global_name.startswith("torch.")):
            raise self.bad(f"the dtype of {key!r} is {_describe(dtype)}")
        found_dtype = _TORCH_DTYPES.get(dtype.global_name.removeprefix("torch."))
        if found_dtype is None or found_dtype not in DTYPES:
            raise ConversionError(f"{self.path}: {key!r} has the dtype {dtype.global_name}, which safepoint does "
                                  "not store", path=self.path)  # fmt: skip
        return found_dtype

    def size(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, _StandIn) or value.global_name != "torch.Size" or value.state is not None:
            raise self.bad(f"expected a torch.Size, found {_describe(value)}")
        if len(value.args) != 1 or not isinstance(value.args[0], (tuple, list)):
            raise self.bad(f"a torch.Size built from {_describe(value.args)}")
        dims = tuple(value.args[0])
        if len(dims) > _MAX_DIMS or not all(type(d) is int and 0 <= d < 1 << 62 for d in dims):
            raise self.bad(f"a torch.Size of {len(dims)} dimensions that are not all non-negative ints")
        return dims

    def paths(self, value: Any) -> dict[str, tuple[str | int, ...]] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.bad(f"planner_data is {_describe(value)}, not the map of flattened keys to paths")
        paths: dict[str, tuple[str | int, ...]] = {}
        for key, path in value.items():
            if not isinstance(key, str) or not isinstance(path, (tuple, list)) or not path:
                raise self.bad(f"planner_data maps {key!r} to {_describe(path)}")
            if not isinstance(path[0], str) or not all(
                type(part) is str or (type(part) is int and part >= 0) for part in path
            ):
                raise self.bad(f"planner_data maps {key!r} to a path of other than names and list indices")
            paths[key] = tuple(path)
        return paths

    def items(self, value: Any) -> dict[tuple[str, tuple[int, ...] | None], _Item]:
        if not isinstance(value, dict):
            raise self.bad(f"storage_data is {_describe(value)}, not the map of items to their places in files")
        items: dict[tuple[str, tuple[int, ...] | None], _Item] = {}
        for index, info in value.items():
            where = self.fields(index, f"{_METADATA}.MetadataIndex", ("fqn", "offset", "index"))
            key, offset = where.get("fqn"), where.get("offset")
            if not isinstance(key, str) or not (where.get("index") is None or type(where.get("index")) is int):
                raise self.bad(f"a MetadataIndex of {_describe(key)}")
            offsets = None if offset is None else self.size(offset)
            found = self.fields(info, f"{_FILESYSTEM}._StorageInfo",
                                ("relative_path", "offset", "length", "transform_descriptors"))  # fmt: skip
            file, start, length = found.get("relative_path"), found.get("offset"), found.get("length")
            transforms = found.get("transform_descriptors") or ()
            if not isinstance(file, str) or type(start) is not int or type(length) is not int:
                raise self.bad(f"the storage info of {key!r} is not a file name, an offset and a length")
            if start < 0 or length < 0:
                raise self.bad(f"the storage info of {key!r} has a negative offset or length")
            if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
                raise self.bad(f"the transform descriptors of {key!r} are not strings")
            if (key, offsets) in items:
                raise self.bad(f"two items of {key!r} at offsets {offsets}")
            items[(key, offsets)] = _Item(file, start, length, tuple(transforms))
        return items


def _describe(value: Any) -> str:
    if isinstance(value, _StandIn):
        return f"a {value.global_name}"
    if isinstance(value, type) and issubclass(value, _StandIn):
        return f"the global {value.global_name}"
    if not isinstance(value, (str, int, float, type(None))):
        return type(value).__name__  # never the repr of a container: a hostile one may nest 100 000 deep
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# -- checking the plan against the metadata ---------------------------------------------------------------------
def _check_boxes(path: str, key: str, tensor: _TensorKey) -> None:
    """Every box inside the global shape, and together covering it exactly once (volumes add up, none overlap)."""
    total = 0
    for box in tensor.boxes:
        if len(box.offsets) != len(tensor.shape) or len(box.sizes) != len(tensor.shape):
            raise CorruptCheckpointError(f"{path}: a chunk of {key!r} has {len(box.offsets)} dimensions, the tensor "
                                         f"{len(tensor.shape)}", path=path)  # fmt: skip
        if any(o + s > d for o, s, d in zip(box.offsets, box.sizes, tensor.shape, strict=True)):
            raise CorruptCheckpointError(f"{path}: the chunk of {key!r} at {list(box.offsets)} of sizes "
                                         f"{list(box.sizes)} lies outside its shape {list(tensor.shape)}",
                                         path=path)  # fmt: skip
        total += box.volume
    volume = _Box((), tensor.shape).volume
    if total != volume:
        raise CorruptCheckpointError(f"{path}: the chunks of {key!r} hold {total} elements, its shape "
                                     f"{list(tensor.shape)} {volume}", path=path)  # fmt: skip
    if tensor.shape:  # equal volumes and no overlap: covered exactly once (a 0-d tensor's one box has volume 1)
        _check_disjoint(path, key, tensor.boxes)


def _check_disjoint(path: str, key: str, boxes: tuple[_Box, ...]) -> None:
    """A sweep along the first dimension: each box is compared only with the boxes whose rows it meets (one for
    FSDP's row bands, the column splits for tensor parallel), not with all of them."""
    active: list[_Box] = []
    for box in sorted((b for b in boxes if b.volume), key=lambda b: b.offsets):
        active = [a for a in active if a.offsets[0] + a.sizes[0] > box.offsets[0]]
        for other in active:
            if all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(other.offsets, other.sizes, box.offsets,
                                                                        box.sizes, strict=True)):  # fmt: skip
                raise CorruptCheckpointError(f"{path}: two chunks of {key!r} overlap, at {list(other.offsets)} and "
                                             f"{list(box.offsets)}", path=path)  # fmt: skip
        active.append(box)


def _check_items(path: str, metadata: _Metadata) -> None:
    wanted: set[tuple[str, tuple[int, ...] | None]] = set()
    for key, tensor in metadata.keys.items():
        if tensor is None:
            wanted.add((key, None))
            continue
        _check_boxes(path, key, tensor)
        size = tensor.dtype.itemsize
        stored = 0
        for box in tensor.boxes:
            item = metadata.items.get((key, box.offsets))
            if item is None:
                raise CorruptCheckpointError(f"{path}: the chunk of {key!r} at {list(box.offsets)} is in no file",
                                             path=path)  # fmt: skip
            wanted.add((key, box.offsets))
            stored += item.length
        if _Box((), tensor.shape).volume * size > stored:  # bounds the allocation by what is on disk
            raise CorruptCheckpointError(f"{path}: {key!r} is declared larger than the bytes stored for it",
                                         path=path)  # fmt: skip
    for key, offsets in metadata.items:
        if (key, offsets) not in wanted:
            what = "a bytes item" if offsets is None else f"a chunk at {list(offsets)}"
            raise CorruptCheckpointError(f"{path}: storage_data has {what} of {key!r} that the keys do not name",
                                         path=path)  # fmt: skip
    if metadata.paths is not None and set(metadata.paths) != set(metadata.keys):
        odd = sorted(set(metadata.paths) ^ set(metadata.keys))
        raise CorruptCheckpointError(f"{path}: planner_data and state_dict_metadata name different keys: {odd[:5]}",
                                     path=path)  # fmt: skip


# -- reading the items ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DcpCheckpoint:
    """A DCP checkpoint read into full values."""

    state: dict[str, Any]
    flat: bool  # the metadata had no planner_data: the keys are DCP's flattened ones, kept as they are
    files: tuple[str, ...]  # the file names read


def read_dcp(folder: str) -> DcpCheckpoint:
    """Read the DCP checkpoint in ``folder``; see the module docstring for what is checked."""
    meta_path = os.path.join(folder, METADATA_NAME)
    metadata = _Parser(meta_path).metadata(_unpickle_metadata(meta_path))
    _check_items(meta_path, metadata)
    values: dict[str, Any] = {}
    by_file: dict[str, list[_Entry]] = {}
    for (key, offsets), item in metadata.items.items():
        by_file.setdefault(item.file, []).append((key, offsets, item))
    _check_files(folder, by_file)
    fulls = {key: torch.empty(t.shape, dtype=t.dtype) for key, t in metadata.keys.items() if t is not None}
    boxes = {key: {b.offsets: b for b in t.boxes} for key, t in metadata.keys.items() if t is not None}
    for name in sorted(by_file):
        for key, offsets, data in _read_items(folder, name, by_file[name]):
            where = f"{os.path.join(folder, name)} (key {key!r})"
            tensor = metadata.keys[key]
            if tensor is None:
                values[key] = _load_bytes_item(data, where)
                continue
            assert offsets is not None  # a chunk has offsets: _check_items matched every one to its box
            box = boxes[key][offsets]
            chunk = _load_chunk(data, where, tensor.dtype, box)
            region = fulls[key]
            for dim, (start, size) in enumerate(zip(box.offsets, box.sizes, strict=True)):
                region = region.narrow(dim, start, size)
            region.copy_(chunk)
    values.update(fulls)
    ordered = {key: values[key] for key in metadata.keys}
    if metadata.paths is None:
        return DcpCheckpoint(ordered, True, tuple(sorted(by_file)))
    return DcpCheckpoint(_unflatten(meta_path, ordered, metadata.paths), False, tuple(sorted(by_file)))


_Entry = tuple[str, tuple[int, ...] | None, _Item]


def _check_files(folder: str, by_file: dict[str, list[_Entry]]) -> None:
    """Before anything is allocated or read: each file a regular file in ``folder`` (a plain name, no symlink), each
    item inside it and written without storage extensions."""
    for name, items in sorted(by_file.items()):
        key = items[0][0]
        path = os.path.join(folder, name)
        if not _FILE_NAME.fullmatch(name) or name in (".", ".."):
            raise UnsafeCheckpointError(f"{os.path.join(folder, METADATA_NAME)} places {key!r} in {name!r}, which is "
                                        "not a file name in the checkpoint directory", path=path)  # fmt: skip
        try:
            with mapped_errors("read", path, FileNotFoundError):
                info = os.lstat(path)
        except FileNotFoundError as err:
            raise CorruptCheckpointError(f"{path} is missing: the metadata places {key!r} in it", path=path) from err
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeCheckpointError(f"{path} is not a regular file (a symlink or a device); it was not read",
                                        path=path)  # fmt: skip
        for key, _, item in items:
            if item.offset + item.length > info.st_size:
                raise CorruptCheckpointError(
                    f"{path} is {info.st_size} bytes, but the metadata places {key!r} at bytes {item.offset}.."
                    f"{item.offset + item.length}: the file is truncated",
                    path=path,
                )
            if item.transforms:
                raise ConversionError(f"{path}: {key!r} was written through DCP storage extensions "
                                      f"{list(item.transforms)}, which safepoint does not read", path=path)  # fmt: skip


def _read_items(folder: str, name: str, items: list[_Entry]) -> Iterator[tuple[str, tuple[int, ...] | None, bytes]]:
    """Each item's bytes, in file order (``_check_files`` has checked the file and the ranges)."""
    path = os.path.join(folder, name)
    with mapped_errors("read", path, refuse_symlinks=True):
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # no symlink swapped in since
    with mapped_errors("read", path), os.fdopen(descriptor, "rb") as file:
        for key, offsets, item in sorted(items, key=lambda entry: entry[2].offset):
            file.seek(item.offset)
            data = file.read(item.length)
            if len(data) != item.length:
                raise CorruptCheckpointError(f"{path} ended inside {key!r}: the file is truncated", path=path)
            yield key, offsets, data


def _torch_load(data: bytes, where: str) -> Any:
    """``torch.load(weights_only=True)`` of one item; torch.save's zip is checked against its CRC-32s first (torch
    records them unless told not to, but its reader does not check them)."""
    from ._interop import _numpy_globals, _refusal  # _interop imports this module when it imports a DCP folder

    if data[:4] != b"PK\x03\x04":
        raise ConversionError(f"{where} is not a torch.save stream (a DCP checkpoint written with "
                              "serialization_format=SAFETENSORS or by another storage writer)", path=where)  # fmt: skip
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # all zero: saved under torch.serialization.set_crc32_options(False), which records no CRC-32 to check
            recorded = any(entry.CRC for entry in archive.infolist())
            damaged = archive.testzip() if recorded else None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as err:
        raise CorruptCheckpointError(f"{where} is not a readable torch.save stream: {err}", path=where) from err
    if damaged is not None:
        raise CorruptCheckpointError(f"{where} is damaged: {damaged} does not match its CRC-32", path=where)
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"{where} needs arbitrary pickle to load, which could run code; it was refused "
                                    f"and nothing in it ran ({_refusal(err)})", path=where) from err  # fmt: skip
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as err:
        raise CorruptCheckpointError(f"{where} is not a readable torch.save stream: {err}", path=where) from err


def _load_bytes_item(data: bytes, where: str) -> Any:
    return _torch_load(data, where)


def _load_chunk(data: bytes, where: str, dtype: torch.dtype, box: _Box) -> torch.Tensor:
    chunk = _torch_load(data, where)
    offsets = box.offsets
    if type(chunk) is not torch.Tensor:
        raise CorruptCheckpointError(f"{where}: the chunk at {list(offsets)} holds {type(chunk).__name__}, "
                                     "not a tensor", path=where)  # fmt: skip
    if chunk.dtype != dtype or tuple(chunk.shape) != box.sizes:
        raise CorruptCheckpointError(
            f"{where}: the chunk at {list(offsets)} is {chunk.dtype} of shape {list(chunk.shape)}; the metadata "
            f"says {dtype} of shape {list(box.sizes)}",
            path=where,
        )
    return chunk


def _unflatten(path: str, flat: dict[str, Any], paths: dict[str, tuple[str | int, ...]]) -> dict[str, Any]:
    """The nested state from DCP's flattened keys and planner_data's paths: a str is a dict key, an int a list
    index (each list must come out whole: 0..n-1)."""
    root: dict[str | int, Any] = {}
    nodes: set[int] = {id(root)}  # the containers built here, as opposed to values (a dict in a bytes item)
    for key, value in flat.items():
        node = root
        *parents, last = paths[key]
        for part in parents:
            if part not in node:
                node[part] = {}
                nodes.add(id(node[part]))
            elif id(node[part]) not in nodes:
                raise CorruptCheckpointError(f"{path}: the path of {key!r} runs through a value", path=path)
            node = node[part]
        if last in node:
            raise CorruptCheckpointError(f"{path}: two keys have the path of {key!r}", path=path)
        node[last] = value
    result = _lists(path, root, nodes)
    assert isinstance(result, dict)
    return result


def _lists(path: str, node: Any, nodes: set[int]) -> Any:
    if id(node) not in nodes:
        return node
    built = {part: _lists(path, child, nodes) for part, child in node.items()}
    kinds = {type(part) for part in built}
    if kinds == {int}:
        if sorted(built) != list(range(len(built))):
            raise CorruptCheckpointError(f"{path}: a list has the indices {sorted(built)[:10]}, not 0..n-1",
                                         path=path)  # fmt: skip
        return [built[i] for i in range(len(built))]
    if int in kinds:
        raise CorruptCheckpointError(f"{path}: a container has both list indices and names", path=path)
    return _optimizer_ids(built)


def _optimizer_ids(node: dict[str | int, Any]) -> dict[str | int, Any]:
    """An optimizer's ``state_dict()`` with its int parameter ids back. DCP's flattening writes every dict key
    with ``str()``, and ``Optimizer.load_state_dict`` matches ``state`` by the ints of ``param_groups[i]["params"]``:
    with the keys "0", "1" the moments would be silently left out. Only this exact layout is changed: a dict of
    ``state`` and ``param_groups`` whose state keys are all decimal strings of ids the groups list."""
    groups, state = node.get("param_groups"), node.get("state")
    if set(node) != {"state", "param_groups"} or not isinstance(groups, list) or not isinstance(state, dict):
        return node
    ids: set[int] = set()
    for group in groups:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            return node
        ids.update(params)
    if not all(isinstance(k, str) and k.isdecimal() and k.isascii() and int(k) in ids for k in state):
        return node
    return {"state": {int(k): v for k, v in state.items()}, "param_groups": groups}
