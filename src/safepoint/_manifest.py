"""The manifest: the one record that makes a checkpoint visible, and its strict parser.

A manifest is canonical JSON (sorted keys, no NaN) carrying the format version, step, save id, creation time,
metrics, user state version, world size, every data file with size and checksum, every tensor entry with key
path, dtype and shape, and the state tree. Its own checksum covers everything else in it.

Parsing is strict: an unknown field, a missing field, a wrong type, a path that could leave the checkpoint,
a dtype outside the table or a declared size that does not add up is an error naming the problem, before any
payload byte is read or allocated. A format version newer than :data:`FORMAT_VERSION` is refused by name, and a
node kind newer than the manifest's own format version is corruption.

Format 2 adds two node kinds, checked here so that decoding them cannot go wrong: a ``view`` must lie inside its
entry (a 1-D tensor entry; offset, sizes and strides non-negative 64-bit ints), because ``as_strided`` would read
whatever memory follows; a ``typed`` node must name an entry of :data:`~safepoint._codec.TYPED` and hold the inner
node that entry is built from (a set: distinct scalars). An entry is referenced by exactly one tensor, ndarray or
pickle node, or by one or more views; its key is where the tree first references it.

Format 3 adds the ``sharded`` node (a DTensor saved by every rank, see :mod:`safepoint._sharded`): its global
dtype and shape, and its boxes. Each box names a tensor entry of its dtype whose shape is the box's sizes, where
that entry's bytes start in its file (inside the file), and checksums of fixed-size chunks of those bytes; the
boxes lie inside the shape and cover it exactly once (no gap, no overlap), or the manifest is corrupt.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._checksum import ChecksumFormatError, format_checksum, new_hasher, parse_checksum
from ._codec import DTYPE_NAMES, MAX_TREE_DEPTH, SCALAR_KINDS, TYPED, decode_tree, float_to_json, key_path
from ._errors import CorruptCheckpointError, FormatVersionError, UnsafeCheckpointError
from ._sharded import Box, check_cover, check_sums_text

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "EntryRecord",
    "FileRecord",
    "Manifest",
    "check_relative_path",
]

#: The on-disk format this code writes. Readers accept every version up to this one.
#: 1: the first release. 2: ``view`` nodes (shared storage written once) and ``typed`` nodes
#: (:data:`~safepoint._codec.TYPED`). 3: ``sharded`` nodes (DTensors written by every rank, in boxes).
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
#: Manifests larger than this are refused before they are read (about 2 million entries).
MAX_MANIFEST_BYTES = 512 << 20
_MAX_NDIM = 64
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # used with fullmatch: "$" would allow "\n"
_SAVE_ID = re.compile(r"[0-9a-f]{32}")
_ELEMENT_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
assert set(_ELEMENT_SIZE) == set(DTYPE_NAMES), "every persisted dtype needs an element size"


def element_size(dtype: str) -> int:
    return _ELEMENT_SIZE[dtype]


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the checkpoint directory
    size: int
    checksum: str


class EntryRecord(NamedTuple):  # a NamedTuple: one per tensor, and a frozen dataclass costs 5x to build
    key: str  # the key path, e.g. "optimizer/state/0/exp_avg"
    kind: str  # "tensor" | "ndarray" | "pickle"
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: int  # index into Manifest.files
    name: str  # the tensor's name inside that safetensors file
    scalar: bool = False  # an ndarray entry that was a numpy scalar

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ELEMENT_SIZE[self.dtype]


@dataclass(frozen=True)
class Manifest:
    step: int
    save_id: str
    created: float  # seconds since the epoch
    files: tuple[FileRecord, ...]
    entries: tuple[EntryRecord, ...]
    tree: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    state_version: int = 1
    world_size: int = 1
    writer: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, compact) with the checksum of the rest as its first field."""
        canonical = _canonical(self._body())
        # "checksum" sorts before every other field, so prepending it keeps the text canonical: one serialisation
        return b'{"checksum":"' + _checksum_of(canonical).encode() + b'",' + canonical[1:] + b"\n"

    def _body(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "step": self.step,
            "save_id": self.save_id,
            "created": self.created,
            "metrics": {k: float_to_json(v) for k, v in self.metrics.items()},
            "state_version": self.state_version,
            "world_size": self.world_size,
            "writer": self.writer,
            "files": [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in self.files],
            "entries": [
                {
                    "key": e.key,
                    "kind": e.kind,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "file": e.file,
                    "name": e.name,
                    "scalar": e.scalar,
                }
                for e in self.entries
            ],
            "tree": self.tree,
        }

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Manifest:
        """Parse and validate a manifest read from ``source`` (named in every error)."""
        try:
            return _Parser(source).manifest(data)
        except RecursionError as err:  # json.loads may cope with a nesting that re-serialising (the checksum) cannot
            raise CorruptCheckpointError(f"{source}: nested too deeply to be a manifest", path=source) from err


#: A manifest's text as :meth:`Manifest.to_json` writes it: the checksum first, over the canonical rest.
_ENVELOPE = re.compile(rb'\{"checksum":"([^"\\]{1,200})",')


def save_id_of(data: bytes, source: str) -> str:
    """The save id a manifest names, for the collector, which needs nothing else of it. A manifest whose text
    is exactly what the writer wrote (its checksum matches the text itself, not a re-serialisation of it) is
    only decoded, not validated field by field, since its save id is the one the writer committed; any other
    (damaged, or written otherwise) goes through :meth:`Manifest.from_json`, and its errors, like every reader.
    A newer format version is a FormatVersionError either way."""
    envelope = _ENVELOPE.match(data)
    if envelope is None or not data.endswith(b"}\n"):
        return Manifest.from_json(data, source).save_id
    canonical = b"{" + data[envelope.end() : -1]
    if _checksum_of(canonical) != envelope.group(1).decode("ascii", "replace"):
        return Manifest.from_json(data, source).save_id  # the error names what is wrong
    try:
        body = json.loads(canonical)
    except (ValueError, RecursionError):  # a checksum is not a signature: crafted text can match one
        body = None
    version = body.get("format_version") if isinstance(body, dict) else None
    save_id = body.get("save_id") if isinstance(body, dict) else None
    if type(version) is not int or version > FORMAT_VERSION or not isinstance(save_id, str):
        return Manifest.from_json(data, source).save_id  # FormatVersionError, or a manifest that is not one
    if not _SAVE_ID.fullmatch(save_id):
        raise CorruptCheckpointError(f"{source}: save_id {save_id[:80]!r} is malformed", path=source)
    return save_id


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _checksum_of(canonical: bytes) -> str:
    hasher = new_hasher()
    hasher.update(canonical)
    return format_checksum(hasher)


def _body_checksum(body: Mapping[str, Any]) -> str:
    return _checksum_of(_canonical(body))


def _checksum_matches(data: bytes, body: Mapping[str, Any], checksum: str) -> bool:
    """Whether ``checksum`` is that of the manifest's content (``body``, parsed from ``data``). Text laid out as
    :meth:`Manifest.to_json` writes it (the checksum first, then the canonical rest) is checked on the text itself,
    which is that rest: re-serialising the body (2-3 ms for the 200 KB manifest of a 4-rank FSDP checkpoint) is
    only needed for text written otherwise. A checksum guards against damage, not forgery: every field is
    validated after it either way."""
    envelope = _ENVELOPE.match(data)
    if (
        envelope is not None
        and data.endswith(b"}\n")
        and envelope.group(1) == checksum.encode("ascii", "replace")
        and _checksum_of(b"{" + data[envelope.end() : -1]) == checksum
    ):
        return True
    return _body_checksum(body) == checksum


def check_relative_path(path: object, source: str) -> str:
    """Accept only plain relative paths made of safe names: no '..', no absolute paths, no NUL, no oddities."""
    if not isinstance(path, str):
        raise UnsafeCheckpointError(f"{source}: file path {path!r} is not a string", path=source)
    parts = path.split("/")
    if len(parts) > 4 or not all(_PATH_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise UnsafeCheckpointError(
            f"{source}: file path {path[:200]!r} is not a plain relative name inside the checkpoint",
            path=source,
        )
    return path


_FIELDS = {
    "format_version", "step", "save_id", "created", "metrics", "state_version", "world_size", "writer",
    "files", "entries", "tree", "checksum",
}  # fmt: skip
assert min(_FIELDS - {"checksum"}) > "checksum", "to_json puts the checksum first: it must sort first"
_FILE_FIELDS = {"path", "size", "checksum"}
_ENTRY_FIELDS = {"key", "kind", "dtype", "shape", "file", "name", "scalar"}
_ENTRY_KINDS = ("tensor", "ndarray", "pickle")
_NODE_FIELDS = {
    "dict": {"k", "v"}, "list": {"k", "v"}, "tuple": {"k", "v"}, "object": {"k", "type", "v"},
    "tensor": {"k", "e"}, "ndarray": {"k", "e"}, "pickle": {"k", "e"},
    "int": {"k", "v"}, "bool": {"k", "v"}, "str": {"k", "v"}, "float": {"k", "v"}, "bytes": {"k", "v"},
    "none": {"k"},
    "view": {"k", "e", "offset", "shape", "stride"}, "typed": {"k", "t", "v"},
    "sharded": {"k", "dtype", "shape", "boxes"},
}  # fmt: skip
_BOX_FIELDS = {"offsets", "sizes", "e", "at", "chunk", "sums"}
#: The format version that introduced each node kind: a kind in an older manifest is corruption.
_NODE_SINCE = {"view": 2, "typed": 2, "sharded": 3}
_INT64 = 1 << 63


def _naturals(values: list[Any]) -> bool:
    """Whether every value is an int >= 0 (not a bool): a loop, ~3x faster than ``all()`` over a generator on the
    two- to four-element lists of shapes and offsets that every entry and box of a manifest has."""
    for value in values:  # noqa: SIM110 - the loop is the point
        if type(value) is not int or value < 0:
            return False
    return True


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.version = FORMAT_VERSION
        self.entries: tuple[EntryRecord, ...] = ()
        self.files: tuple[FileRecord, ...] = ()

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.source}: {message}", path=self.source)

    def manifest(self, data: bytes) -> Manifest:
        try:
            raw = json.loads(data, object_pairs_hook=self.no_duplicates, parse_constant=self.no_constants)
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise self.fail(f"not a valid manifest ({type(err).__name__}: {str(err)[:200]})") from err
        body = self.obj(raw, "manifest")
        # The checksum comes first: every format version keeps this envelope (a "checksum" of the canonical rest),
        # so that a bit flip in a field name or in format_version reads as corruption, which restore falls back
        # over, and never as "written by a newer safepoint", which stops it.
        checksum = body.pop("checksum", None)
        if not isinstance(checksum, str) or not _checksum_matches(data, body, checksum):
            raise self.fail("manifest checksum does not match its content")
        version = body.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{self.source}: written by checkpoint format version {version}, but this safepoint reads versions "
                f"up to {FORMAT_VERSION}; upgrade safepoint to read it",
                path=self.source,
            )
        self.fields(body, _FIELDS - {"checksum"}, "manifest")
        if self.integer(version, "format_version") < 1:
            raise self.fail(f"format_version {version} is not valid")
        files = tuple(self.file(f, i) for i, f in enumerate(self.array(body["files"], "files")))
        if len({f.path for f in files}) != len(files):
            raise self.fail("a file is listed twice")
        entries = tuple(self.entry(e, i, files) for i, e in enumerate(self.array(body["entries"], "entries")))
        self.names_unique(entries)
        self.version = self.integer(version, "format_version", minimum=1)
        self.entries, self.files = entries, files
        referenced: list[tuple[int, str, str]] = []
        tree = self.node(body["tree"], 0, (), referenced)
        if tree["k"] != "dict":
            raise self.fail("the state tree must be a dict")
        self.references(referenced)
        save_id = body["save_id"]
        if not isinstance(save_id, str) or not _SAVE_ID.fullmatch(save_id):
            raise self.fail(f"save_id {str(save_id)[:80]!r} is malformed")
        created = body["created"]
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
            raise self.fail("created is not a time")
        writer = body["writer"]
        if not isinstance(writer, str):
            raise self.fail("writer is not a string")
        return Manifest(
            format_version=self.integer(version, "format_version", minimum=1),
            step=self.integer(body["step"], "step"),
            save_id=save_id,
            created=float(created),
            metrics=self.metrics(body["metrics"]),
            state_version=self.integer(body["state_version"], "state_version"),
            world_size=self.integer(body["world_size"], "world_size", minimum=1),
            writer=writer,
            files=files,
            entries=entries,
            tree=tree,
        )

    # -- helpers -----------------------------------------------------------------------------------------------
    def no_duplicates(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key in a JSON object")
        return result

    def no_constants(self, name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    def obj(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} is not an object")
        return value

    def array(self, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(f"{what} is not a list")
        return value

    def fields(self, value: Mapping[str, Any], expected: set[str], what: str) -> None:
        unknown = sorted(set(value) - expected)
        if unknown:
            raise FormatVersionError(
                f"{self.source}: {what} has fields this version of safepoint does not know: {unknown[:5]}",
                path=self.source,
            )
        missing = sorted(expected - set(value))
        if missing:
            raise self.fail(f"{what} lacks fields {missing}")

    def integer(self, value: Any, what: str, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(f"{what} must be an integer >= {minimum}, not {str(value)[:40]!r}")
        return value

    def file(self, value: Any, index: int) -> FileRecord:
        record = self.obj(value, f"files[{index}]")
        self.fields(record, _FILE_FIELDS, f"files[{index}]")
        path = check_relative_path(record["path"], self.source)
        try:
            parse_checksum(record["checksum"]) if isinstance(record["checksum"], str) else None
        except ChecksumFormatError as err:
            raise self.fail(f"files[{index}]: {err}") from err
        if not isinstance(record["checksum"], str):
            raise self.fail(f"files[{index}]: checksum is not a string")
        return FileRecord(path, self.integer(record["size"], f"files[{index}].size"), record["checksum"])

    def entry(self, value: Any, index: int, files: tuple[FileRecord, ...]) -> EntryRecord:
        plain = self.plain_entry(value, files)
        if plain is not None:
            return plain
        where = f"entries[{index}]"
        record = self.obj(value, where)
        self.fields(record, _ENTRY_FIELDS, where)
        key, kind, dtype, name = record["key"], record["kind"], record["dtype"], record["name"]
        # any string: names are key paths, which hold whatever str keys the state had (safetensors accepts them)
        if not isinstance(key, str) or not isinstance(name, str):
            raise self.fail(f"{where}: key and name must be strings")
        if kind not in ("tensor", "ndarray", "pickle"):
            raise self.fail(f"{where} ({key}): unknown kind {str(kind)[:40]!r}")
        if not isinstance(dtype, str) or dtype not in DTYPE_NAMES:
            raise self.fail(f"{where} ({key}): unknown dtype {str(dtype)[:40]!r}")
        shape = self.array(record["shape"], f"{where}.shape")
        if len(shape) > _MAX_NDIM:
            raise self.fail(f"{where} ({key}): {len(shape)} dimensions is more than {_MAX_NDIM}")
        if all(type(d) is int and d >= 0 for d in shape):  # the usual case, without building a message per dim
            dims = tuple(shape)
        else:
            dims = tuple(self.integer(d, f"{where}.shape") for d in shape)
        file_index = self.integer(record["file"], f"{where}.file")
        if file_index >= len(files):
            raise self.fail(f"{where} ({key}): names file {file_index}, but there are {len(files)}")
        if not isinstance(record["scalar"], bool):
            raise self.fail(f"{where}: scalar must be a boolean")
        if record["scalar"] and (kind != "ndarray" or math.prod(dims) != 1):
            raise self.fail(f"{where} ({key}): only a one-element ndarray entry can be a numpy scalar")
        entry = EntryRecord(key, kind, dtype, dims, file_index, name, record["scalar"])
        if entry.nbytes > files[file_index].size:  # absurd shapes are refused before anything is allocated
            raise self.fail(
                f"{where} ({key}): shape {list(dims)} needs {entry.nbytes} bytes, "
                f"more than its file {files[file_index].path} holds ({files[file_index].size})"
            )
        return entry

    def plain_entry(self, value: Any, files: tuple[FileRecord, ...]) -> EntryRecord | None:
        """The entry when every check of :meth:`entry` passes and it is not a numpy scalar, checked without building
        any message; None when any check fails (or it is a scalar), for :meth:`entry` to look closer."""
        if type(value) is not dict or value.keys() != _ENTRY_FIELDS:
            return None
        key, kind, dtype, name, shape = value["key"], value["kind"], value["dtype"], value["name"], value["shape"]
        file_index = value["file"]
        if type(key) is not str or type(name) is not str or type(dtype) is not str or value["scalar"] is not False:
            return None
        if kind not in _ENTRY_KINDS or dtype not in DTYPE_NAMES or type(shape) is not list or len(shape) > _MAX_NDIM:
            return None
        if type(file_index) is not int or not 0 <= file_index < len(files):
            return None
        if not _naturals(shape):
            return None
        entry = EntryRecord(key, kind, dtype, tuple(shape), file_index, name, False)
        return entry if entry.nbytes <= files[file_index].size else None

    def names_unique(self, entries: tuple[EntryRecord, ...]) -> None:
        seen: set[tuple[int, str]] = set()
        for entry in entries:
            if (entry.file, entry.name) in seen:
                raise self.fail(f"tensor name {entry.name[:80]!r} appears twice in one file")
            seen.add((entry.file, entry.name))

    def metrics(self, value: Any) -> dict[str, float]:
        result: dict[str, float] = {}
        for name, metric in self.obj(value, "metrics").items():
            if isinstance(metric, str) and metric in ("nan", "inf", "-inf"):
                result[name] = float(metric)
            elif isinstance(metric, (int, float)) and not isinstance(metric, bool):
                result[name] = metric
            else:
                raise self.fail(f"metric {name!r} is not a number")
        return result

    def node(
        self,
        value: Any,
        depth: int,
        path: tuple[str | int, ...],
        referenced: list[tuple[int, str, str]],
    ) -> dict[str, Any]:
        if depth > MAX_TREE_DEPTH:
            raise self.fail(f"state tree nested deeper than {MAX_TREE_DEPTH}")
        node = self.obj(value, "tree node")
        kind = node.get("k")
        if not isinstance(kind, str) or kind not in _NODE_FIELDS:
            raise self.fail(f"tree node of unknown kind {str(kind)[:40]!r}")
        if _NODE_SINCE.get(kind, 1) > self.version:
            raise self.fail(f"tree node of kind {kind!r} in a manifest of format version {self.version}")
        if set(node) != _NODE_FIELDS[kind]:
            raise self.fail(f"tree node {kind!r} has fields {sorted(node)}")
        payload: Any = node.get("v")
        if kind == "dict":
            for item in self.array(payload, "dict node"):
                if not (isinstance(item, list) and len(item) == 2):
                    raise self.fail("dict node items must be [key, node] pairs")
                key = item[0]
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise self.fail(f"dict key {str(key)[:40]!r} is not a str or int")
                self.node(item[1], depth + 1, (*path, key), referenced)
            if len({(type(k), k) for k, _ in payload}) != len(payload):
                raise self.fail("dict node has a duplicate key")
        elif kind in ("list", "tuple"):
            for i, item in enumerate(self.array(payload, f"{kind} node")):
                self.node(item, depth + 1, (*path, i), referenced)
        elif kind == "object":
            if not isinstance(node["type"], str):
                raise self.fail("object node type is not a string")
            self.node(payload, depth + 1, path, referenced)
        elif kind == "typed":
            self.typed(node, depth, path, referenced)
        elif kind == "sharded":
            self.sharded(node, key_path(path), referenced)
        elif kind in ("tensor", "ndarray", "pickle", "view"):
            index = node["e"]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.entries):
                raise self.fail(f"tree references entry {str(index)[:40]!r}, which does not exist")
            if kind == "view":
                self.view(node, self.entries[index])
            referenced.append((index, kind, key_path(path)))
        else:
            self.scalar(kind, payload)
        return node

    def typed(
        self, node: dict[str, Any], depth: int, path: tuple[str | int, ...], referenced: list[tuple[int, str, str]]
    ) -> None:
        """A value of :data:`~safepoint._codec.TYPED`: a known name, and the inner node that name is built from."""
        name = node["t"]
        if not isinstance(name, str) or name not in TYPED:
            raise self.fail(f"typed node of unknown type {str(name)[:80]!r}")
        kind = TYPED[name]
        inner = self.node(node["v"], depth + 1, path, referenced)
        if inner["k"] != kind.inner:
            raise self.fail(f"typed node {name!r} holds a {inner['k']} node, not a {kind.inner} node")
        items = inner["v"]
        if kind.inner == "dict" and kind.str_keys and not all(isinstance(k, str) for k, _ in items):
            raise self.fail(f"typed node {name!r} has a key that is not a str")
        if kind.inner == "list":  # a set: distinct scalars (1, 1.0 and True would collapse into one)
            if not all(item["k"] in SCALAR_KINDS for item in items):
                raise self.fail(f"typed node {name!r} holds something other than scalars")
            values = [decode_tree(item, []) for item in items]
            if len(set(values)) != len(values):
                raise self.fail(f"typed node {name!r} holds equal items")
        if name == "builtins.complex" and [item["k"] for item in items] != ["float", "float"]:
            raise self.fail("a complex node must hold two floats")
        if name == "torch.Size" and not all(item["k"] == "int" and -_INT64 <= item["v"] < _INT64 for item in items):
            raise self.fail("a torch.Size node must hold 64-bit ints")

    def sharded(self, node: dict[str, Any], where: str, referenced: list[tuple[int, str, str]]) -> None:
        """A DTensor's boxes: each an entry of the node's dtype and of the box's sizes, inside its file, with
        well-formed chunk checksums; together they cover the global shape exactly once."""
        dtype = node["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_NAMES:
            raise self.fail(f"sharded tensor {where[:200]!r} has unknown dtype {str(dtype)[:40]!r}")
        shape = self.array(node["shape"], "sharded shape")
        if len(shape) > _MAX_NDIM:
            raise self.fail(f"sharded tensor {where[:200]!r} has {len(shape)} dimensions")
        dims = tuple(self.integer(n, "sharded shape") for n in shape)
        if any(n >= _INT64 for n in dims):
            raise self.fail(f"sharded tensor {where[:200]!r} has a dimension beyond 64 bits")
        boxes = []
        for index, value in enumerate(self.array(node["boxes"], "sharded boxes")):
            plain = self.plain_box(value, dtype)
            if plain is not None:  # as a writer makes it: the checks below, without building a message per box
                referenced.append((plain[1], "sharded", where))
                boxes.append(plain[0])
                continue
            what = f"box {index} of {where[:200]!r}"
            box = self.obj(value, what)
            if set(box) != _BOX_FIELDS:
                raise self.fail(f"{what} has fields {sorted(box)[:10]}")
            offsets = tuple(self.integer(n, f"{what} offsets") for n in self.array(box["offsets"], what))
            sizes = tuple(self.integer(n, f"{what} sizes") for n in self.array(box["sizes"], what))
            entry_index = self.integer(box["e"], f"{what} entry")
            if entry_index >= len(self.entries):
                raise self.fail(f"{what} references entry {entry_index}, which does not exist")
            entry = self.entries[entry_index]
            if entry.kind != "tensor" or entry.dtype != dtype or entry.shape != sizes:
                raise self.fail(
                    f"{what} is {dtype} {list(sizes)}, its entry {entry.key[:200]!r} is {entry.kind} {entry.dtype} "
                    f"{list(entry.shape)}"
                )
            at = self.integer(box["at"], f"{what} at", minimum=8)
            if at + entry.nbytes > self.files[entry.file].size:
                raise self.fail(f"{what}: bytes {at}..{at + entry.nbytes} lie outside its file")
            problem = check_sums_text(box["sums"], entry.nbytes, box["chunk"])
            if problem:
                raise self.fail(f"{what}: {problem}")
            referenced.append((entry_index, "sharded", where))
            boxes.append(Box(offsets, sizes))
        problem = check_cover(dims, boxes)
        if problem:
            raise self.fail(f"the boxes of sharded tensor {where[:200]!r} do not cover it exactly once: {problem}")

    def plain_box(self, value: Any, dtype: str) -> tuple[Box, int] | None:
        """A box and its entry's index when every check of :meth:`sharded` passes, checked without building any
        message (a manifest has a box per saved shard); None when any check fails, for :meth:`sharded` to find
        which and say so."""
        if type(value) is not dict or value.keys() != _BOX_FIELDS:
            return None
        offsets, sizes, entry_index, at = value["offsets"], value["sizes"], value["e"], value["at"]
        if type(offsets) is not list or type(sizes) is not list or type(entry_index) is not int or type(at) is not int:
            return None
        if not (_naturals(offsets) and _naturals(sizes)):
            return None
        if not 0 <= entry_index < len(self.entries) or at < 8:
            return None
        entry = self.entries[entry_index]
        shape = tuple(sizes)
        if entry.kind != "tensor" or entry.dtype != dtype or entry.shape != shape:
            return None
        if at + entry.nbytes > self.files[entry.file].size or check_sums_text(
            value["sums"], entry.nbytes, value["chunk"]
        ):
            return None
        return Box(tuple(offsets), shape), entry_index

    def view(self, node: dict[str, Any], base: EntryRecord) -> None:
        """A view must lie inside its entry: ``as_strided`` checks nothing that would stop a read out of bounds."""
        shape, stride = self.array(node["shape"], "view shape"), self.array(node["stride"], "view stride")
        if len(shape) > _MAX_NDIM or len(shape) != len(stride):
            raise self.fail(f"view of {base.key[:200]!r} has {len(shape)} sizes and {len(stride)} strides")
        sizes = [self.integer(n, "view shape") for n in shape]
        steps = [self.integer(s, "view stride") for s in stride]
        offset = self.integer(node["offset"], "view offset")
        if base.kind != "tensor" or len(base.shape) != 1:
            raise self.fail(f"entry {base.key[:200]!r} is viewed, but is not a 1-D tensor entry")
        numel = math.prod(sizes)
        if numel >= _INT64 or offset >= _INT64 or any(n >= _INT64 for n in sizes) or any(s >= _INT64 for s in steps):
            raise self.fail(f"view of {base.key[:200]!r} has sizes beyond 64 bits")
        last = offset + sum((n - 1) * s for n, s in zip(sizes, steps, strict=True)) if numel else offset - 1
        if last >= base.shape[0] or offset > base.shape[0]:
            raise self.fail(
                f"view of {base.key[:200]!r} (offset {offset}, shape {sizes}, stride {steps}) reaches past its "
                f"{base.shape[0]} elements"
            )

    def references(self, referenced: list[tuple[int, str, str]]) -> None:
        """Each entry is referenced by exactly one tensor, ndarray or pickle node, or by one or more views;
        its key is where the tree first references it (errors and allow_pickle name entries by key)."""
        first: dict[int, tuple[str, str]] = {}
        for index, kind, where in referenced:
            if index not in first:
                first[index] = (kind, where)
            elif kind != "view" or first[index][0] != "view":
                raise self.fail("the state tree does not reference every entry exactly once")
        if len(first) != len(self.entries):
            raise self.fail("the state tree does not reference every entry exactly once")
        for index, (kind, where) in first.items():
            entry = self.entries[index]
            if entry.kind != ("tensor" if kind in ("view", "sharded") else kind):
                raise self.fail(f"entry {entry.key!r} is a {entry.kind}, the tree says {kind}")
            if entry.key != where:
                raise self.fail(f"entry {entry.key[:200]!r} sits at {where[:200]!r} in the state tree")

    def scalar(self, kind: str, payload: Any) -> None:
        ok = {
            "int": isinstance(payload, int) and not isinstance(payload, bool),
            "bool": isinstance(payload, bool),
            "str": isinstance(payload, str),
            "bytes": isinstance(payload, str),
            "float": (isinstance(payload, (int, float)) and not isinstance(payload, bool))
            or payload in ("nan", "inf", "-inf"),
            "none": True,
        }[kind]
        if kind == "bytes" and ok:
            try:
                base64.b64decode(payload, validate=True)
            except ValueError:
                ok = False
        if not ok:
            raise self.fail(f"{kind} node holds {type(payload).__name__}")
