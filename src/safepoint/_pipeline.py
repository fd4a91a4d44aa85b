"""The one save pipeline: every save, of one process or many ranks, synchronous or in the background.

A save is ``snapshot -> plan -> write and fsync -> seal across ranks -> publish -> retention``:

    snapshot   (caller's thread) encode this rank's share of the state; a background save then copies it into
               reused staging buffers (:mod:`safepoint._writer`), a synchronous one borrows the live tensors
    begin      exchange ``save.begin``: every rank posts its step and entry names (or why its snapshot failed);
               rank 0 checks they agree and that the step is free, takes the attempt lock and makes <save_id>/;
               every rank learns the one save id
    write      every rank plans its files under <save_id>/ and writes and fsyncs them (:func:`commit.write_files`)
    seal       exchange ``save.commit``: every rank posts the records of its durable files, or its error; rank 0
               merges them into one manifest, writes it, PUBLISHES it and fsyncs the directory, or on any error
               removes the whole attempt; then runs retention; every rank learns the same outcome

A single process is the one-rank case of the same path: its :class:`~safepoint._distributed.LocalCoordinator`
runs each decision on the one post, and its files keep their single-process names (``<save_id>/00000...``).
Whether ``write`` and ``seal`` run on the caller's thread or on a background thread is the ``blocking``
parameter of :meth:`Saver.save`, nothing more. A :class:`SaveAttempt` is one save: ``begin``, ``write``,
``seal``, ``abort``; the protocol's fault points are reached from its methods and from :mod:`safepoint._commit`.

Replicated entries (identical on every rank) are written once, by rank 0 (see :data:`SPLIT_REPLICATED`).
Entries wrapped in :class:`~safepoint._distributed.PerRank` are written by every rank for itself. With several
ranks or any PerRank entry, every payload file name starts with the rank that wrote it
(``r00001-rep-00000.safetensors``, ``r00001-own-00000...``), and a per-rank entry is a state-tree node
``{"k": "object", "type": "safepoint.PerRank", "v": {rank: value, ...}}``: no new manifest field, so the format
version stays 1 and any reader of it reads these checkpoints.

This module never unpickles, never reads a checkpoint's values, and never deletes a committed step except
through retention, after the new step is durable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from . import _faults as faults
from ._codec import Encoded, Leaf, LeafKind, ShardedSlot, check_is_state, encode_state
from ._commit import (
    SHARD_BYTES,
    SavePlan,
    abort_attempt,
    begin_attempt,
    check_metrics,
    finish_save,
    plan_save,
    write_files,
    write_manifest,
    writer_version,
)
from ._distributed import Coordinator, LocalCoordinator, Operation, PerRank, Post, first_failure, require_all
from ._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CoordinationError,
    InvalidStateError,
    SafepointError,
    StorageError,
)
from ._gc import GcReport, collect, remove_checkpoint
from ._layout import join, new_save_id, step_dir
from ._manifest import EntryRecord, FileRecord, Manifest
from ._messages import (
    Committed,
    OwnPart,
    RankPart,
    ReplicatedPart,
    ReplicatedPlan,
    SaveBegin,
    SaveBegun,
    ShardedPart,
)
from ._reader import read_manifest, verify_checkpoint
from ._resolve import Kind, resolve, step_dirs
from ._retention import RetentionPolicy, steps_to_keep
from ._sharded import Box, BoxRecord, check_cover, chunk_bytes, owned_pieces, view_of
from ._storage import AttemptLock, Storage, open_storage
from ._structure import StructureCache
from ._validate import non_negative_int
from ._verify import VerifyReport, verify_storage
from ._writer import BackgroundWriter, SaveHandle

__all__ = [
    "PER_RANK_TYPE",
    "SPLIT_REPLICATED",
    "CheckpointInfo",
    "SaveAttempt",
    "Saver",
    "Snapshot",
    "agree",
    "apply_retention",
    "collect_leftovers",
    "entry_keys",
    "gc_paused",
    "has_per_rank",
    "open_manager_directory",
    "open_saver",
    "save_to",
]

logger = logging.getLogger("safepoint")

#: The type name of the state-tree node that holds a per-rank entry, keyed by rank.
PER_RANK_TYPE = "safepoint.PerRank"
#: Whether replicated entries are split across the ranks (file ``i`` written by rank ``i % world_size``, as
#: torchsnapshot does) instead of written by rank 0 alone. Measured by benchmarks/bench_distributed.py (512 MiB,
#: one machine, one disk, two runs): split took 0.89x and 1.33x the time of rank 0 alone with 2 ranks, 1.08x and
#: 0.78x with 4: no consistent gain where the disk is the limit, so rank 0 writes them. Where every rank has its
#: own path to storage (many nodes, an object store) splitting should pay; measure it there before turning it on.
SPLIT_REPLICATED = False

Written = Callable[[int], None]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its manifest describes it."""

    step: int
    path: str
    save_id: str
    nbytes: int
    created: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest, path: str) -> CheckpointInfo:
        return cls(manifest.step, path, manifest.save_id, manifest.nbytes, manifest.created, dict(manifest.metrics))


def has_per_rank(state: object) -> bool:
    return isinstance(state, Mapping) and any(isinstance(value, PerRank) for value in state.values())


def entry_keys(state: object) -> tuple[tuple[str, bool], ...]:
    """The top-level entries and which are PerRank: what every rank must agree on."""
    if not isinstance(state, Mapping):
        raise InvalidStateError(f"the state must be a dict of named entries, not {type(state).__name__}")
    return tuple((key, isinstance(value, PerRank)) for key, value in state.items())


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """A save allocates a few objects per tensor; in a training process with millions of live objects, the
    collections those allocations trigger would scan all of them, so the collector waits until the save ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# -- snapshot -----------------------------------------------------------------------------------------------------
#: One cache for the replicated entries, one for this rank's PerRank entries (see :mod:`safepoint._structure`).
Structures = tuple[StructureCache, StructureCache]


@dataclass(frozen=True)
class _Part:
    """The replicated or the own entries of a snapshot: their tree, and where their leaves lie in the snapshot's."""

    prefix: str  # "" in the single-process layout, else "rep-" or "own-"
    tree: dict[str, Any]
    start: int
    stop: int
    structure: Any = None  # the StructureCache's structure the encoding came from: its plan is reused


@dataclass(frozen=True)
class Snapshot:
    """This rank's share of a state, encoded; the leaves themselves are held by whoever writes them (borrowed
    live tensors, or staged copies), so a snapshot never keeps a live tensor alive."""

    rep: _Part | None  # the replicated entries, on the ranks that write them
    own: _Part | None  # this rank's PerRank entries
    keys: tuple[tuple[str, LeafKind, bool], ...]  # key, kind, scalar of every leaf
    ranked: bool  # file names start with the writing rank
    specs: tuple[tuple[torch.dtype, torch.Size], ...] = ()  # dtype and shape of every leaf: enough to plan
    shd: _Part | None = None  # the boxes of DTensors this rank writes, one leaf each
    boxes: tuple[tuple[int, Box], ...] = ()  # each shd leaf's DTensor (its index in tree order) and box
    shd_layout: str = ""  # the digest of every DTensor's key, dtype and shape: equal on every rank

    @classmethod
    def take(
        cls,
        state: Mapping[str, Any],
        rank: int,
        *,
        ranked: bool,
        structures: Structures | None = None,
        world_size: int = 1,
    ) -> tuple[Snapshot, list[Leaf], list[int] | None]:
        """Encode ``state`` (InvalidStateError naming a bad key); its leaves, to borrow or to stage, and their
        ``data_ptr()`` where every leaf is dense (see ``Encoded.pointers``; None: not known). With ``structures``,
        a state of the structure saved last is not encoded (nor planned) again.

        Every rank encodes the replicated entries (to find the DTensors among them), but only the ranks that
        write them keep their leaves; every rank keeps the boxes of DTensors it writes (see _sharded)."""
        check_is_state(state)
        replicated = {key: value for key, value in state.items() if not isinstance(value, PerRank)}
        own = {key: {rank: value.value} for key, value in state.items() if isinstance(value, PerRank)}
        leaves: list[Leaf] = []
        keys: tuple[tuple[str, LeafKind, bool], ...] = ()
        specs: list[tuple[torch.dtype, torch.Size]] = []
        parts: list[_Part | None] = []
        writes_replicated = rank == 0 or SPLIT_REPLICATED
        wanted = (
            (replicated if writes_replicated or world_size > 1 else None, "rep-" if ranked else ""),
            (own or None, "own-"),
        )
        sharded: Sequence[ShardedSlot] = ()
        pointers: list[int] | None = []
        for entries, prefix in wanted:
            if entries is None:
                parts.append(None)
                continue
            encoded = structures[prefix == "own-"].encode(entries) if structures else encode_state(entries)
            if prefix == "own-" and encoded.sharded:
                raise InvalidStateError(
                    f"state entry {encoded.sharded[0].key!r}: a DTensor inside safepoint.PerRank; a DTensor is "
                    "saved by every rank already (each its own shards): leave it out of PerRank",
                    key=encoded.sharded[0].key,
                )
            if prefix != "own-":
                sharded = encoded.sharded
                if not writes_replicated:
                    parts.append(None)
                    continue
            start = len(leaves)
            parts.append(_Part(prefix, encoded.tree, start, start + len(encoded.leaves), encoded.structure))
            leaves += encoded.leaves
            # a cached structure knows its leaves' keys: no tuple made per leaf
            keys += encoded.structure.keys if encoded.structure is not None else _keys(encoded.leaves)
            specs += encoded.specs or [(leaf.tensor.dtype, leaf.tensor.shape) for leaf in encoded.leaves]
            pointers = None if pointers is None or encoded.pointers is None else pointers + list(encoded.pointers)
        shd, boxes, layout = None, [], ""
        if sharded:
            start = len(leaves)
            for index, slot in enumerate(sharded):
                local = slot.tensor.to_local()
                for piece in owned_pieces(slot.tensor, slot.key, world_size):
                    view = view_of(local, piece)
                    leaves.append(Leaf(slot.key, "tensor", view))
                    specs.append((view.dtype, view.shape))
                    boxes.append((index, piece.box))
            shd, pointers = _Part("shd-", {"k": "dict", "v": []}, start, len(leaves)), None
            layout = _sharded_digest(sharded)
            keys += _keys(leaves[start:])
        snapshot = cls(parts[0], parts[1], keys, ranked, tuple(specs), shd, tuple(boxes), layout)
        return snapshot, leaves, pointers

    def structure(self) -> tuple[object, ...] | None:
        """The structure cache's entries this snapshot was encoded from, one per part (None: a part was encoded
        afresh, or the state holds DTensors, whose boxes are found afresh on every save). The same entries again
        mean the same leaves by kind, dtype, shape and device."""
        parts = (self.rep, self.own)
        if self.shd is not None or any(part is not None and part.structure is None for part in parts):
            return None
        return tuple(None if part is None else part.structure for part in parts)

    def shapes(self) -> list[torch.Tensor]:
        """Data-less (meta) tensors of the leaves' dtypes and shapes: a plan made from them is the plan of the
        leaves, and making it waits for no staged copy (the copy may wait for the writer to free room)."""
        return [torch.empty(shape, dtype=dtype, device="meta") for dtype, shape in self.specs]

    def encoded(self, part: _Part, tensors: Sequence[torch.Tensor]) -> Encoded:
        leaves = [Leaf(*self.keys[i][:2], tensors[i], self.keys[i][2]) for i in range(part.start, part.stop)]
        return Encoded(part.tree, leaves, structure=part.structure)


def _keys(leaves: Sequence[Leaf]) -> tuple[tuple[str, LeafKind, bool], ...]:
    return tuple((leaf.key, leaf.kind, leaf.scalar) for leaf in leaves)


def _sharded_digest(sharded: Sequence[ShardedSlot]) -> str:
    digest = hashlib.sha256()
    for slot in sharded:
        digest.update(repr((slot.key, str(slot.tensor.dtype), list(slot.tensor.shape))).encode())
    return digest.hexdigest()


class _Shifted(Sequence[torch.Tensor]):
    """A part's leaves, numbered from 0, over the snapshot's leaves."""

    def __init__(self, tensors: Sequence[torch.Tensor], part: _Part) -> None:
        self._tensors, self._start, self._length = tensors, part.start, part.stop - part.start

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(index, slice):
            raise TypeError("leaves are read one at a time")
        return self._tensors[self._start + index]


# -- one save attempt ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveRequest:
    checkpoint: str  # the checkpoint directory, relative to the storage root
    step: int
    metrics: dict[str, float]
    state_version: int


class SaveAttempt:
    """One save of one step, on this rank: ``begin`` -> ``write`` -> ``seal`` (or ``abort``).

    Rank 0 holds the attempt (its lock and <save_id>/); every rank writes its own files into it.
    ``retain`` runs on rank 0 once the commit is durable, before the other ranks learn the outcome, so every
    rank sees the same steps afterwards; it must not raise."""

    def __init__(
        self,
        storage: Storage,
        operation: Operation,
        request: SaveRequest,
        snapshot: Snapshot,
        *,
        retain: Callable[[int], None] | None = None,
    ) -> None:
        self._storage, self._operation, self._request, self._snapshot = storage, operation, request, snapshot
        self._retain = retain
        self._plan: SavePlan | None = None  # rank 0's, once begun
        self._lock: AttemptLock | None = None
        self.save_id = ""

    def run(
        self,
        opening: Post[SaveBegin],
        tensors: Sequence[torch.Tensor],
        written: Written,
        *,
        shapes: Sequence[torch.Tensor] | None = None,
    ) -> CheckpointInfo:
        """The whole attempt; ``opening`` is this rank's begin post (its step and keys, or its snapshot's error).
        ``shapes`` plan the files when reading ``tensors`` may wait (staged copies still being made)."""
        self.begin(opening)
        try:
            part: Post[RankPart] = Post(self.write(tensors, written, shapes=shapes))
        except Exception as error:
            part = Post(error=error)
        except BaseException as error:  # interrupted: no rank can seal this attempt; remove what rank 0 holds
            self.abort(error)
            raise
        return self.seal(part)

    def begin(self, opening: Post[SaveBegin]) -> None:
        begun = self._operation.exchange(
            "save.begin", opening, self._open, reads=(SaveBegin.from_json, SaveBegun.from_json)
        )
        self.save_id = begun.save_id

    def _open(self, posts: list[Post[SaveBegin] | None]) -> SaveBegun:
        checked = require_all("save.begin", posts, self._operation.timeout)
        first_failure(checked)
        opened = [post.message() for post in checked]
        step = agree([o.step for o in opened], "the step to save")
        agree([o.keys for o in opened], "the state's entries and which are PerRank")
        request = self._request
        plan = SavePlan(request.checkpoint, step, new_save_id(), (), (), {}, {}, request.state_version)
        faults.point("save.begin")
        try:
            lock = begin_attempt(self._storage, plan)
        except CheckpointExistsError as err:
            raise existing_error(self._storage, plan.checkpoint, step, err) from err
        try:
            self._storage.ensure_dir(plan.staging)
            faults.point("staging.mkdir.after")
        except BaseException as err:
            abort_attempt(self._storage, plan, lock, err)
            raise
        self._plan, self._lock = plan, lock
        return SaveBegun(plan.save_id)

    def write(
        self, tensors: Sequence[torch.Tensor], written: Written, *, shapes: Sequence[torch.Tensor] | None = None
    ) -> RankPart:
        """Plan this rank's files under the attempt (from ``shapes``, else ``tensors``) and write and fsync them."""
        snapshot, rank = self._snapshot, self._operation.rank
        planning = tensors if shapes is None else shapes
        rep = own = None
        if snapshot.rep is not None:
            plan, records, mine = self._write_part(snapshot.rep, tensors, planning, written, replicated=True)
            layout = _layout_digest(plan) if snapshot.ranked else ""
            lead = None
            if rank == 0:
                paths = tuple(planned.path for planned in plan.files)
                lead = ReplicatedPlan(paths, plan.entries, plan.tree, plan.metrics)
            rep = ReplicatedPart(tuple(zip(mine, records, strict=True)), layout, lead)
        if snapshot.own is not None:
            plan, records, _ = self._write_part(snapshot.own, tensors, planning, written, replicated=False)
            own = OwnPart(tuple(records), plan.entries, plan.tree)
        shd = None
        if snapshot.shd is not None:
            sums: dict[int, str] = {}
            plan, records, _ = self._write_part(
                snapshot.shd, tensors, planning, written, replicated=False, chunk_sums=sums
            )
            boxes = _box_records(plan, snapshot.boxes, sums)
            shd = ShardedPart(tuple(records), plan.entries, boxes, snapshot.shd_layout)
        return RankPart(rep, own, shd)

    def _write_part(
        self,
        part: _Part,
        tensors: Sequence[torch.Tensor],
        planning: Sequence[torch.Tensor],
        written: Written,
        *,
        replicated: bool,
        chunk_sums: dict[int, str] | None = None,
    ) -> tuple[SavePlan, list[FileRecord], list[int]]:
        request, rank, world = self._request, self._operation.rank, self._operation.world_size
        plan = plan_save(
            self._snapshot.encoded(part, planning), checkpoint=request.checkpoint, step=request.step,
            metrics=request.metrics if replicated else None, state_version=request.state_version,
            save_id=self.save_id, file_prefix=part.prefix, shard_bytes=self._storage.shard_bytes or SHARD_BYTES,
        )  # fmt: skip
        if replicated:
            writers = [index % world if SPLIT_REPLICATED else 0 for index in range(len(plan.files))]
        else:
            writers = [rank] * len(plan.files)
        if self._snapshot.ranked:
            plan = _named_by_writer(plan, writers)
        mine = [index for index, writer in enumerate(writers) if writer == rank]
        own_files = dataclasses.replace(plan, files=tuple(plan.files[i] for i in mine))
        records = write_files(
            self._storage, own_files, _Shifted(tensors, part), lambda index: written(part.start + index),
            chunk_sums=chunk_sums,
        )  # fmt: skip
        return plan, records, mine

    def seal(self, part: Post[RankPart]) -> CheckpointInfo:
        """Post this rank's files (or its error); rank 0 publishes or removes the attempt; every rank learns."""
        committed = self._operation.exchange(
            "save.commit", part, self._commit, reads=(RankPart.from_json, Committed.from_json)
        )
        where = self._storage.describe(self._request.checkpoint)
        return CheckpointInfo(
            self._request.step, where, committed.save_id, committed.nbytes, committed.created, committed.metrics
        )

    def _commit(self, posts: list[Post[RankPart] | None]) -> Committed:
        plan, lock, world = self._plan, self._lock, self._operation.world_size
        assert plan is not None, "rank 0 began the attempt"
        assert lock is not None, "rank 0 holds the attempt lock"

        def seal_files() -> Manifest:
            checked = require_all("save.commit", posts, self._operation.timeout)
            first_failure(checked)
            self._storage.sync_dir(plan.staging)
            faults.point("staging.fsync.after")
            manifest = _merge(plan, [post.message() for post in checked], world)
            write_manifest(self._storage, plan, manifest)
            return manifest

        try:
            manifest = finish_save(self._storage, plan, lock, seal_files)
        except CheckpointExistsError as err:
            raise existing_error(self._storage, plan.checkpoint, plan.step, err) from err
        finally:
            self._lock = None  # finish_save released or handed it over
        if self._retain is not None:
            self._retain(manifest.step)
        return Committed(manifest.save_id, manifest.nbytes, manifest.created, dict(manifest.metrics))

    def abort(self, error: BaseException) -> None:
        """Remove the attempt, if this rank holds it and it is not sealed. Never raises."""
        if self._plan is not None and self._lock is not None:
            abort_attempt(self._storage, self._plan, self._lock, error)
            self._lock = None


def agree(values: list[Any], what: str) -> Any:
    """The value every rank posted, or a CoordinationError naming the ranks that differ."""
    differing = [rank for rank, value in enumerate(values) if value != values[0]]
    if differing:
        shown = "; ".join(f"rank {rank}: {_shown(values[rank])!r:.200}" for rank in [0, *differing[:7]])
        raise CoordinationError(
            f"the ranks disagree on {what} ({shown}); nothing was committed", ranks=tuple(differing)
        )
    return values[0]


def _shown(value: Any) -> Any:
    """Entry names as the messages have always shown them: lists of [key, per_rank]."""
    if isinstance(value, tuple):
        return [_shown(item) for item in value]
    return value


def _named_by_writer(plan: SavePlan, writers: list[int]) -> SavePlan:
    """Every file's name starts with the rank that writes it: ``<save_id>/r00003-rep-00007.safetensors``."""
    files = tuple(
        dataclasses.replace(planned, path=join(plan.save_id, f"r{writer:05d}-" + planned.path.split("/", 1)[1]))
        for planned, writer in zip(plan.files, writers, strict=True)
    )
    return dataclasses.replace(plan, files=files)


def _box_records(
    plan: SavePlan, boxes: Sequence[tuple[int, Box]], sums: Mapping[int, str]
) -> tuple[tuple[int, BoxRecord], ...]:
    """Each written box: its DTensor, place, entry (the leaf's, in this part), bytes in the file and chunk sums."""
    found: dict[int, tuple[int, BoxRecord]] = {}
    for planned in plan.files:
        for item in planned.tensors:
            slot, box = boxes[item.leaf]
            start = len(planned.header) + item.begin
            chunk = chunk_bytes(item.end - item.begin)
            found[item.leaf] = (slot, BoxRecord(box.offsets, box.sizes, item.leaf, start, chunk, sums[item.leaf]))
    return tuple(found[leaf] for leaf in range(len(boxes)))


def _layout_digest(plan: SavePlan) -> str:
    """Equal on ranks whose replicated entries have the same names, dtypes and shapes (the file headers)."""
    digest = hashlib.sha256()
    for planned in plan.files:
        digest.update(planned.header)
    return digest.hexdigest()


def _merge(attempt: SavePlan, parts: list[RankPart], world: int) -> Manifest:
    """One manifest from every rank's part: replicated files and entries first, then each rank's own."""
    head = parts[0].rep
    assert head is not None, "rank 0 writes the replicated entries"
    assert head.plan is not None, "rank 0 posts its plan"
    lead = head.plan
    rep_files: dict[int, FileRecord] = {}
    for rank, part in enumerate(parts):
        if part.rep is None:
            continue
        if part.rep.layout != head.layout:
            raise CoordinationError(
                f"rank {rank}'s replicated entries differ from rank 0's in names, dtypes or shapes; replicated "
                "entries must be identical on every rank (wrap rank-local state in safepoint.PerRank)",
                ranks=(rank,),
            )
        rep_files.update(part.rep.files)
    files = [rep_files[index] for index in range(len(lead.paths))]
    entries: list[EntryRecord] = list(lead.entries)
    tree_items: list[list[Any]] = list(lead.tree["v"])
    per_rank: dict[str, list[list[Any]]] = {}
    for part in parts:
        own = part.own
        if own is None:
            continue
        file_offset, entry_offset = len(files), len(entries)
        files += own.files
        entries += [entry._replace(file=entry.file + file_offset) for entry in own.entries]
        for key, node in own.tree["v"]:
            per_rank.setdefault(key, []).extend([r, _shift(sub, entry_offset)] for r, sub in node["v"])
    for key, items in per_rank.items():
        tree_items.append([key, {"k": "object", "type": PER_RANK_TYPE, "v": {"k": "dict", "v": items}}])
    tree: dict[str, Any] = {"k": "dict", "v": tree_items}
    if any(part.shd is not None for part in parts):
        tree = _with_boxes(tree, parts, files, entries)
    return Manifest(
        step=attempt.step,
        save_id=attempt.save_id,
        created=time.time(),
        files=tuple(files),
        entries=tuple(entries),
        tree=tree,
        metrics=dict(lead.metrics),
        state_version=attempt.state_version,
        world_size=world,
        writer=writer_version(),
    )


def _with_boxes(
    tree: dict[str, Any], parts: list[RankPart], files: list[FileRecord], entries: list[EntryRecord]
) -> dict[str, Any]:
    """The tree with every rank's boxes in its sharded nodes (their files and entries appended to ``files`` and
    ``entries``), after checking that the boxes of each DTensor cover it exactly once: a plan that does not
    (ranks that disagree on a layout, a placement modelled wrongly) is refused before anything is visible."""
    shaped: list[dict[str, Any]] = []
    tree = _sharded_nodes(tree, shaped)
    found: list[list[dict[str, Any]]] = [node["boxes"] for node in shaped]
    layouts = [(rank, part.shd.layout) for rank, part in enumerate(parts) if part.shd is not None]
    if len(layouts) != len(parts) or any(layout != layouts[0][1] for _, layout in layouts):
        head = layouts[0][1] if layouts else ""
        differing = tuple(rank for rank, part in enumerate(parts) if part.shd is None or part.shd.layout != head)
        raise CoordinationError(
            "the ranks disagree on the DTensors of the state (their keys, dtypes or global shapes); every rank "
            "must save the same DTensors; nothing was committed",
            ranks=differing,
        )
    for part in parts:
        shd = part.shd
        assert shd is not None
        file_offset, entry_offset = len(files), len(entries)
        files += shd.files
        entries += [entry._replace(file=entry.file + file_offset) for entry in shd.entries]
        for slot, box in shd.boxes:
            if not 0 <= slot < len(found):
                raise CoordinationError(f"a rank wrote a box of DTensor {slot}, but the state has {len(found)}")
            found[slot].append(dataclasses.replace(box, entry=box.entry + entry_offset).to_json())
    for node, boxes in zip(shaped, found, strict=True):
        boxes.sort(key=lambda box: box["offsets"])
        problem = check_cover(node["shape"], [Box(tuple(b["offsets"]), tuple(b["sizes"])) for b in boxes])
        if problem:
            key = entries[boxes[0]["e"]].key if boxes else "?"
            raise InvalidStateError(
                f"state entry {key!r}: the boxes the ranks wrote do not cover the DTensor exactly once "
                f"({problem}); nothing was committed",
                key=key,
            )
    return tree


def _sharded_nodes(node: Any, found: list[dict[str, Any]]) -> Any:
    """A copy of ``node`` whose sharded nodes are fresh copies with an empty boxes list, appended to ``found`` in
    tree order (the order the encoder numbered the DTensors in): a cached encoding's tree is never changed."""
    kind = node["k"]
    if kind == "sharded":
        copy = {**node, "boxes": []}
        found.append(copy)
        return copy
    if kind == "dict":
        return {**node, "v": [[key, _sharded_nodes(child, found)] for key, child in node["v"]]}
    if kind in ("list", "tuple"):
        return {**node, "v": [_sharded_nodes(child, found) for child in node["v"]]}
    if kind in ("object", "typed"):
        return {**node, "v": _sharded_nodes(node["v"], found)}
    return node


def _shift(node: Any, offset: int) -> Any:
    """A copy of a state-tree node with every entry index moved by ``offset``."""
    if "e" in node:
        return {**node, "e": node["e"] + offset}
    kind = node["k"]
    if kind == "dict":
        return {**node, "v": [[key, _shift(child, offset)] for key, child in node["v"]]}
    if kind in ("list", "tuple"):
        return {**node, "v": [_shift(child, offset) for child in node["v"]]}
    if kind in ("object", "typed"):
        return {**node, "v": _shift(node["v"], offset)}
    return node


def existing_error(storage: Storage, checkpoint: str, step: int, err: CheckpointExistsError) -> CheckpointExistsError:
    """The error of a save that found ``checkpoint`` committed (``err``): which step is there, whether another
    writer committed it while this save was writing, and whether it verifies.

    In a manager directory the step directory names the step; a single checkpoint directory may hold any step,
    so the step is the one its manifest names (None when the manifest does not read)."""
    where = storage.describe(checkpoint)
    try:
        there: int | None = read_manifest(storage, checkpoint).step
    except SafepointError:
        there = step if checkpoint else None
    raced = isinstance(err.__cause__, FileExistsError)  # the publication lost: see commit.finish_save
    if there == step:
        headline = (
            f"step {step} was committed by another writer at {where} while this save was writing"
            if raced
            else f"step {step} is already committed at {where}"
        )
    elif there is None:
        headline = f"{where} already holds a committed checkpoint (this save was of step {step})"
    else:
        headline = f"{where} already holds the committed checkpoint of step {there}, not of step {step}"
    try:
        # a step directory holding another step's manifest is corrupt: read_manifest says so
        manifest = verify_checkpoint(storage, checkpoint, step=step if checkpoint else None)
    except SafepointError as problem:
        return CheckpointExistsError(
            f"{headline}; it does NOT verify ({problem}). It was left untouched: inspect it, remove it by hand, "
            "or save under another step",
            step=there,
            path=where,
            verified=False,
        )
    if there != step:
        return CheckpointExistsError(
            f"{headline}; it verifies (save id {manifest.save_id}) and was left untouched. A directory holds one "
            f"checkpoint: save step {step} to another directory, or use a CheckpointManager for numbered steps",
            step=there,
            path=where,
            verified=True,
        )
    return CheckpointExistsError(
        f"{headline}; it verifies (save id {manifest.save_id}, {manifest.nbytes} bytes), so a retry after an "
        "ambiguous commit can treat the step as saved",
        step=step,
        path=where,
        verified=True,
    )


# -- the pipeline -------------------------------------------------------------------------------------------------
def _opening(step: object, state: Mapping[str, Any], failure: BaseException | None) -> Post[SaveBegin]:
    """This rank's begin post: its step and entry names, or why it cannot save."""
    if failure is not None:
        return Post(error=failure)
    try:
        return Post(SaveBegin(non_negative_int("step", step), entry_keys(state)))
    except Exception as error:
        return Post(error=error)


def save_to(
    storage: Storage,
    checkpoint: str,
    step: int,
    state: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None,
    state_version: int,
    coordinator: Coordinator | None = None,
    retain: Callable[[int], None] | None = None,
    structures: Structures | None = None,
) -> CheckpointInfo:
    """Save ``state`` as ``checkpoint`` on the caller's thread, borrowing the live tensors; on a step already
    committed, verify it and say so (CheckpointExistsError). ``structures``: see :meth:`Snapshot.take`."""
    coordinator = coordinator or LocalCoordinator()
    ranked = coordinator.world_size > 1 or has_per_rank(state)
    with gc_paused():
        operation = coordinator.operation("save")
        failure: BaseException | None = None
        snapshot, leaves = Snapshot(None, None, (), ranked), list[Leaf]()
        try:
            checked = check_metrics(metrics or {})
            snapshot, leaves, _ = Snapshot.take(
                state, coordinator.rank, ranked=ranked, structures=structures, world_size=coordinator.world_size
            )
        except Exception as error:
            if coordinator.world_size == 1:
                raise  # nobody else waits: the error as it is, before anything is touched
            failure, checked = error, {}
        request = SaveRequest(checkpoint, step, checked, state_version)
        attempt = SaveAttempt(storage, operation, request, snapshot, retain=retain)
        tensors = [leaf.tensor for leaf in leaves]
        return attempt.run(_opening(step, state, failure), tensors, lambda index: None)


class Saver:
    """The saves of one manager: synchronous ones on the caller's thread, background ones on a thread each,
    both through :class:`SaveAttempt`; the background saves in flight and their failures."""

    def __init__(
        self,
        storage: Storage,
        coordinator: Coordinator,
        *,
        state_version: int,
        retain: Callable[[int], None],
        background: BackgroundWriter,
    ) -> None:
        self._storage, self._coordinator, self._state_version = storage, coordinator, state_version
        self._retain = retain
        self.background = background
        self._structures = (StructureCache(), StructureCache())  # replicated and per-rank entries

    @property
    def storage(self) -> Storage:
        return self._storage

    def wait(self) -> None:
        """Wait until every background save is durable (or failed); raise a failure not reported yet, once."""
        self.background.wait_all()
        self.background.raise_failures()

    def close(self) -> None:
        """Finish the background saves, give the staging buffers back, then raise a failure not reported yet."""
        self.background.wait_all()
        self.background.pool.clear()
        self.background.raise_failures()

    def verify(self) -> VerifyReport:
        """Check every byte of every committed checkpoint of the directory."""
        return verify_storage(self._storage)

    def gc(self) -> GcReport:
        """Remove what failed or crashed saves left behind (their writer certainly gone): on rank 0 only, the
        others report nothing removed."""
        return collect(self._storage) if self._coordinator.rank == 0 else GcReport((), ())

    def save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None, *, blocking: bool
    ) -> CheckpointInfo | SaveHandle[CheckpointInfo]:
        local = self._coordinator.world_size == 1 and not has_per_rank(state)
        if local:
            non_negative_int("step", step)
        if any(handle.step == step for handle in self.background.in_flight()):
            raise CheckpointExistsError(f"step {step} is already being saved in the background", step=step)
        if blocking:
            self.background.wait_all()  # earlier steps commit (and retain) first
        else:
            self.background.wait_for_room()
        self.background.raise_failures()
        checkpoint = step_dir(step) if isinstance(step, int) else ""
        if blocking:
            return save_to(
                self._storage, checkpoint, step, state, metrics=metrics, state_version=self._state_version,
                coordinator=self._coordinator, retain=self._retain, structures=self._structures,
            )  # fmt: skip
        return self._save_in_background(checkpoint, step, state, metrics)

    def _save_in_background(
        self, checkpoint: str, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None
    ) -> SaveHandle[CheckpointInfo]:
        operation = self._coordinator.operation("save")  # on the caller's thread: every rank numbers it alike
        with gc_paused():
            handle = self._stage(operation, checkpoint, step, state, metrics)
        # the collector runs again only once the snapshot's per-tensor objects (its leaves) died with _stage's
        # frame: a collection now, due after the allocations of this save, would scan them on the caller's time
        return handle

    def _stage(
        self,
        operation: Operation,
        checkpoint: str,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None,
    ) -> SaveHandle[CheckpointInfo]:
        """Snapshot ``state`` into staging buffers and start its save attempt on the writer's thread."""
        coordinator = self._coordinator
        ranked = coordinator.world_size > 1 or has_per_rank(state)
        try:
            checked = check_metrics(metrics or {})
            snapshot, leaves, pointers = Snapshot.take(
                state, coordinator.rank, ranked=ranked, structures=self._structures,
                world_size=coordinator.world_size,
            )  # fmt: skip
        except Exception as error:
            if coordinator.world_size > 1:  # the others wait for this rank: tell them why it cannot save
                failed = SaveAttempt(self._storage, operation, SaveRequest(checkpoint, step, {}, 0), _EMPTY)
                with contextlib.suppress(SafepointError):
                    failed.begin(Post(error=error))
            raise
        request = SaveRequest(checkpoint, step, checked, self._state_version)
        attempt = SaveAttempt(self._storage, operation, request, snapshot, retain=self._retain)
        opening = _opening(step, state, None)

        def order() -> list[int]:
            """The order the writer consumes the leaves in (a provisional plan: plans are deterministic)."""
            found: list[int] = []
            for part in (snapshot.rep, snapshot.own, snapshot.shd):
                if part is None:
                    continue
                plan = plan_save(
                    snapshot.encoded(part, [leaf.tensor for leaf in leaves]), checkpoint=checkpoint, step=0,
                    save_id="provisional", shard_bytes=self._storage.shard_bytes or SHARD_BYTES,
                )  # fmt: skip
                found += [part.start + item.leaf for planned in plan.files for item in planned.tensors]
            return found

        def job(tensors: Sequence[torch.Tensor], written: Written) -> CheckpointInfo:
            return attempt.run(opening, tensors, written, shapes=snapshot.shapes())

        return self.background.submit(
            step, leaves, job, order, specs=snapshot.specs, structure=snapshot.structure(), pointers=pointers
        )


_EMPTY = Snapshot(None, None, (), True)


def open_manager_directory(
    directory: object, storage_options: Mapping[str, Any] | None, grace_period: float | None
) -> Storage:
    """The storage of a manager directory, made if missing; ConfigError for a single checkpoint's directory."""
    if not isinstance(directory, (str, os.PathLike, Storage)):
        raise ConfigError(f"directory must be a path, a URL or a Storage, not {type(directory).__name__}")
    storage = open_storage(directory, storage_options, grace_period=grace_period)
    where = storage.describe("")
    location = resolve(storage)
    if location.kind is Kind.FILE:
        raise StorageError(f"{where} exists and is not a directory", path=where)
    if location.is_committed_checkpoint:
        raise ConfigError(
            f"{where} is a single checkpoint, not a manager directory; "
            "use safepoint.restore() or safepoint.load() on it"
        )
    storage.ensure_dir("")
    return storage


def open_saver(
    directory: object,
    storage_options: Mapping[str, Any] | None,
    grace_period: float | None,
    coordinator: Coordinator,
    *,
    policy: RetentionPolicy,
    background: BackgroundWriter,
    state_version: int,
) -> Saver:
    """The saves of a manager directory (see :func:`open_manager_directory`), with ``policy`` applied after each
    one is durable; on rank 0, what crashed saves left there is removed first."""
    storage = open_manager_directory(directory, storage_options, grace_period)
    saver = Saver(
        storage, coordinator, state_version=state_version, background=background,
        retain=lambda step: apply_retention(storage, policy, step),
    )  # fmt: skip
    if coordinator.rank == 0:
        collect_leftovers(storage)
    return saver


def collect_leftovers(storage: Storage) -> None:
    """Remove what crashed saves left behind, quietly: a manager that opens must not fail because of them."""
    try:
        report = collect(storage, settled_pass=True)
    except SafepointError as err:
        logger.warning("could not collect leftovers of crashed saves in %s: %s", storage.describe(""), err)
        return
    if report.removed:
        logger.info("removed %d leftover(s) of crashed saves in %s", len(report.removed), storage.describe(""))


# -- retention ----------------------------------------------------------------------------------------------------
def apply_retention(storage: Storage, policy: RetentionPolicy, just_saved: int) -> None:
    """Remove the committed steps ``policy`` does not keep, never ``just_saved``. Runs only after it is durable;
    failures are logged (retention runs again after the next save), never raised."""
    try:
        _apply_retention(storage, policy, just_saved)
    except SafepointError as err:
        logger.warning(
            "step %s is saved, but retention failed (it runs again after the next save): %s", just_saved, err
        )


def _apply_retention(storage: Storage, policy: RetentionPolicy, just_saved: int) -> None:
    if policy.keeps_everything:
        return
    metrics: dict[int, Mapping[str, float]] = {}
    for found in step_dirs(storage):
        step, path = found.step, found.path
        try:
            metrics[step] = read_manifest(storage, path).metrics
        except CheckpointNotFoundError:
            continue
        except SafepointError as err:  # unreadable: neither counted nor deleted; verify reports it
            logger.warning("retention leaves %s alone: %s", storage.describe(path), err)
    keep = steps_to_keep(policy, metrics, protect=(just_saved,))
    for step in sorted(set(metrics) - keep):
        # unpublish first (the checkpoint disappears atomically and durably), then collect its data;
        # reaches the fault points retention.unpublish.after and retention.delete.after
        remove_checkpoint(storage, step_dir(step), fault_prefix="retention")
