"""What ranks tell each other: frozen dataclasses with explicit JSON forms, one per kind of post and outcome.

Every message crosses ranks as canonical JSON written by its own ``to_json`` and read back by its own
``from_json``, which checks the shape it expects; nothing is unpickled, and no untyped dict travels between the
coordinator and the save or restore that uses it. Errors travel separately (see :mod:`safepoint._distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ._errors import CoordinationError
from ._manifest import EntryRecord, FileRecord
from ._sharded import BoxRecord

__all__ = [
    "Candidates",
    "Check",
    "Committed",
    "Done",
    "Json",
    "Message",
    "OwnPart",
    "RankPart",
    "ReplicatedPart",
    "ReplicatedPlan",
    "RestoreBegin",
    "SaveBegin",
    "SaveBegun",
    "ShardedPart",
    "Verdict",
]

Json = Any  # a value json.dumps accepts


class Message(Protocol):
    """A value one rank sends to the others; its class's ``from_json`` reads ``to_json``'s output back."""

    def to_json(self) -> Json: ...


def _field(value: Json, name: str) -> Json:
    if not isinstance(value, Mapping) or name not in value:
        raise CoordinationError(f"a message between ranks lacks {name!r}: {value!s:.200}")
    return value[name]


def _keys_json(keys: Sequence[tuple[str, bool]]) -> Json:
    return [[key, per_rank] for key, per_rank in keys]


def _keys(value: Json) -> tuple[tuple[str, bool], ...]:
    return tuple((str(key), bool(per_rank)) for key, per_rank in value)


def _file_json(record: FileRecord) -> Json:
    return [record.path, record.size, record.checksum]


def _file(value: Json) -> FileRecord:
    path, size, checksum = value
    return FileRecord(str(path), int(size), str(checksum))


def _entry_json(entry: EntryRecord) -> Json:
    return [entry.key, entry.kind, entry.dtype, list(entry.shape), entry.file, entry.name, entry.scalar]


def _entry(value: Json) -> EntryRecord:
    key, kind, dtype, shape, file, name, scalar = value
    return EntryRecord(
        str(key), str(kind), str(dtype), tuple(int(n) for n in shape), int(file), str(name), bool(scalar)
    )


@dataclass(frozen=True)
class Done:
    """A post or outcome that carries nothing but its arrival."""

    def to_json(self) -> Json:
        return None

    @classmethod
    def from_json(cls, value: Json) -> Done:
        return cls()


# -- saving -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveBegin:
    """A rank's opening of a save: the step it saves and its top-level entries (name, whether PerRank)."""

    step: int
    keys: tuple[tuple[str, bool], ...]

    def to_json(self) -> Json:
        return {"step": self.step, "keys": _keys_json(self.keys)}

    @classmethod
    def from_json(cls, value: Json) -> SaveBegin:
        return cls(int(_field(value, "step")), _keys(_field(value, "keys")))


@dataclass(frozen=True)
class SaveBegun:
    """Rank 0's answer: the save attempt every rank writes into."""

    save_id: str

    def to_json(self) -> Json:
        return {"save_id": self.save_id}

    @classmethod
    def from_json(cls, value: Json) -> SaveBegun:
        return cls(str(_field(value, "save_id")))


@dataclass(frozen=True)
class ReplicatedPlan:
    """Rank 0's plan of the replicated entries: every file's path, the entries and their tree, the metrics."""

    paths: tuple[str, ...]
    entries: tuple[EntryRecord, ...]
    tree: Json
    metrics: dict[str, float]

    def to_json(self) -> Json:
        entries = [_entry_json(entry) for entry in self.entries]
        return {"paths": list(self.paths), "entries": entries, "tree": self.tree, "metrics": self.metrics}

    @classmethod
    def from_json(cls, value: Json) -> ReplicatedPlan:
        return cls(
            tuple(str(path) for path in _field(value, "paths")),
            tuple(_entry(item) for item in _field(value, "entries")),
            _field(value, "tree"),
            {str(k): v for k, v in _field(value, "metrics").items()},
        )


@dataclass(frozen=True)
class ReplicatedPart:
    """The replicated files a rank wrote (by index in rank 0's plan) and the digest of their layout."""

    files: tuple[tuple[int, FileRecord], ...]
    layout: str
    plan: ReplicatedPlan | None  # rank 0's only

    def to_json(self) -> Json:
        files = [[index, _file_json(record)] for index, record in self.files]
        plan = None if self.plan is None else self.plan.to_json()
        return {"files": files, "layout": self.layout, "plan": plan}

    @classmethod
    def from_json(cls, value: Json) -> ReplicatedPart:
        plan = _field(value, "plan")
        return cls(
            tuple((int(index), _file(record)) for index, record in _field(value, "files")),
            str(_field(value, "layout")),
            None if plan is None else ReplicatedPlan.from_json(plan),
        )


@dataclass(frozen=True)
class OwnPart:
    """The files, entries and tree of a rank's own (PerRank) entries."""

    files: tuple[FileRecord, ...]
    entries: tuple[EntryRecord, ...]
    tree: Json

    def to_json(self) -> Json:
        files = [_file_json(record) for record in self.files]
        return {"files": files, "entries": [_entry_json(entry) for entry in self.entries], "tree": self.tree}

    @classmethod
    def from_json(cls, value: Json) -> OwnPart:
        return cls(
            tuple(_file(record) for record in _field(value, "files")),
            tuple(_entry(item) for item in _field(value, "entries")),
            _field(value, "tree"),
        )


@dataclass(frozen=True)
class ShardedPart:
    """The boxes of DTensors a rank wrote: its files and entries, each box (the DTensor's index in tree order,
    and the box with its entry index among this part's entries), and the digest of every DTensor's key, dtype
    and shape, which every rank must agree on."""

    files: tuple[FileRecord, ...]
    entries: tuple[EntryRecord, ...]
    boxes: tuple[tuple[int, BoxRecord], ...]
    layout: str

    def to_json(self) -> Json:
        return {
            "files": [_file_json(record) for record in self.files],
            "entries": [_entry_json(entry) for entry in self.entries],
            "boxes": [[slot, box.to_json()] for slot, box in self.boxes],
            "layout": self.layout,
        }

    @classmethod
    def from_json(cls, value: Json) -> ShardedPart:
        boxes = []
        for slot, box in _field(value, "boxes"):
            checked = {name: _field(box, name) for name in ("offsets", "sizes", "e", "at", "chunk", "sums")}
            record = BoxRecord(
                tuple(int(n) for n in checked["offsets"]), tuple(int(n) for n in checked["sizes"]),
                int(checked["e"]), int(checked["at"]), int(checked["chunk"]), str(checked["sums"]),
            )  # fmt: skip
            boxes.append((int(slot), record))
        return cls(
            tuple(_file(record) for record in _field(value, "files")),
            tuple(_entry(item) for item in _field(value, "entries")),
            tuple(boxes),
            str(_field(value, "layout")),
        )


@dataclass(frozen=True)
class RankPart:
    """What one rank wrote into the attempt, every file durable."""

    rep: ReplicatedPart | None
    own: OwnPart | None
    shd: ShardedPart | None = None

    def to_json(self) -> Json:
        return {
            "rep": None if self.rep is None else self.rep.to_json(),
            "own": None if self.own is None else self.own.to_json(),
            "shd": None if self.shd is None else self.shd.to_json(),
        }

    @classmethod
    def from_json(cls, value: Json) -> RankPart:
        rep, own, shd = _field(value, "rep"), _field(value, "own"), _field(value, "shd")
        return cls(
            None if rep is None else ReplicatedPart.from_json(rep),
            None if own is None else OwnPart.from_json(own),
            None if shd is None else ShardedPart.from_json(shd),
        )


@dataclass(frozen=True)
class Committed:
    """The committed checkpoint, as every rank reports it."""

    save_id: str
    nbytes: int
    created: float
    metrics: dict[str, float]

    def to_json(self) -> Json:
        return {"save_id": self.save_id, "nbytes": self.nbytes, "created": self.created, "metrics": self.metrics}

    @classmethod
    def from_json(cls, value: Json) -> Committed:
        return cls(
            str(_field(value, "save_id")),
            int(_field(value, "nbytes")),
            float(_field(value, "created")),
            {str(k): v for k, v in _field(value, "metrics").items()},
        )


# -- restoring ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreBegin:
    """A rank's opening of a restore: the step it asks for (None: the newest that verifies) and its entries."""

    step: int | None
    keys: tuple[tuple[str, bool], ...]

    def to_json(self) -> Json:
        return {"step": self.step, "keys": _keys_json(self.keys)}

    @classmethod
    def from_json(cls, value: Json) -> RestoreBegin:
        step = _field(value, "step")
        return cls(None if step is None else int(step), _keys(_field(value, "keys")))


@dataclass(frozen=True)
class Candidates:
    """The steps to try, newest first, as rank 0 listed them."""

    steps: tuple[int, ...]

    def to_json(self) -> Json:
        return {"steps": list(self.steps)}

    @classmethod
    def from_json(cls, value: Json) -> Candidates:
        return cls(tuple(int(step) for step in _field(value, "steps")))


@dataclass(frozen=True)
class Check:
    """How a candidate read on one rank: fits (ok), does not verify (corrupt, why), or was removed (gone)."""

    status: Literal["ok", "corrupt", "gone"]
    reason: str = ""

    def to_json(self) -> Json:
        return {"status": self.status, "reason": self.reason}

    @classmethod
    def from_json(cls, value: Json) -> Check:
        status = _field(value, "status")
        if status not in ("ok", "corrupt", "gone"):
            raise CoordinationError(f"unknown restore status {status!r} from another rank")
        return cls(status, str(_field(value, "reason")))


@dataclass(frozen=True)
class Verdict:
    """Rank 0's decision on a candidate, the same for every rank."""

    verdict: Literal["apply", "skip", "gone"]
    reason: str = ""

    def to_json(self) -> Json:
        return {"verdict": self.verdict, "reason": self.reason}

    @classmethod
    def from_json(cls, value: Json) -> Verdict:
        verdict = _field(value, "verdict")
        if verdict not in ("apply", "skip", "gone"):
            raise CoordinationError(f"unknown restore verdict {verdict!r} from rank 0")
        return cls(verdict, str(_field(value, "reason")))
