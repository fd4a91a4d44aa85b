"""Saving and restoring with many ranks: the commit protocol and verified restore, spread over a Coordinator.

A save is two exchanges (see :mod:`safepoint.distributed`) with the writing between them::

    save.begin   every rank posts its step and its entry names
                 rank 0: steps and names agree? step not committed? take the attempt lock, make <save_id>/
                 every rank learns the one save id
    (writing)    every rank writes its files into <save_id>/ and fsyncs them
    save.commit  every rank posts its file records (sizes, checksums), or its error
                 rank 0: any error or missing rank -> remove the whole attempt (every rank's files);
                 else fsync <save_id>/, write the manifest, publish it, fsync the checkpoint directory
                 every rank learns the outcome: the same success, or the same error

Replicated entries (identical on every rank) are written once, by rank 0 (see :data:`SPLIT_REPLICATED`).
Entries wrapped in :class:`~safepoint.distributed.PerRank` are written by every rank for itself. Every payload
file name starts with the rank that wrote it (``r00001-rep-00000.safetensors``, ``r00001-own-00000...``), and a
per-rank entry is a state-tree node ``{"k": "object", "type": "safepoint.PerRank", "v": {rank: value, ...}}``:
no new manifest field, so the format version stays 1 and any reader of it reads these checkpoints (``load()``
shows a per-rank entry as a dict keyed by rank).

A restore is one exchange to agree on the candidates (rank 0 lists them, newest first), then per candidate:
every rank reads and verifies the files it needs (the replicated ones and its own), matches them against its
live state, and posts the result; rank 0 decides (apply, or skip a corrupt one for every rank); every rank
applies; a last exchange makes any rank's failure every rank's error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from . import faults
from .codec import Encoded, encode_state
from .commit import (
    SHARD_BYTES,
    SavePlan,
    abort_attempt,
    begin_attempt,
    finish_save,
    plan_save,
    write_files,
    write_manifest,
    writer_version,
)
from .distributed import Coordinator, Json, PerRank, Post, first_failure, require_all
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CoordinationError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidStateError,
    RestoreError,
    StorageError,
    attach_note,
)
from .layout import join, new_save_id
from .manifest import EntryRecord, FileRecord, Manifest
from .migrations import Migrations
from .reader import LoadedCheckpoint, read_leaves, read_manifest
from .restore import PreparedRestore, RestoreReport, SkippedCheckpoint, none_verifies, prepare_checkpoint
from .storage import AttemptLock, Storage
from .validate import non_negative_int

__all__ = ["PER_RANK_TYPE", "SPLIT_REPLICATED", "has_per_rank", "restore_ranks", "save_ranks"]

logger = logging.getLogger("safepoint")

#: The type name of the state-tree node that holds a per-rank entry, keyed by rank.
PER_RANK_TYPE = "safepoint.PerRank"
#: Whether replicated entries are split across the ranks (file ``i`` written by rank ``i % world_size``, as
#: torchsnapshot does) instead of written by rank 0 alone. Measured by benchmarks/bench_distributed.py (512 MiB,
#: one machine, one disk, two runs): split took 0.89x and 1.33x the time of rank 0 alone with 2 ranks, 1.08x and
#: 0.78x with 4: no consistent gain where the disk is the limit, so rank 0 writes them. Where every rank has its
#: own path to storage (many nodes, an object store) splitting should pay; measure it there before turning it on.
SPLIT_REPLICATED = False


def has_per_rank(state: object) -> bool:
    return isinstance(state, Mapping) and any(isinstance(value, PerRank) for value in state.values())


def _attempt(work: Callable[[], Json]) -> Post:
    """This rank's contribution: the value of its work, or the error it raised (every rank must post)."""
    try:
        return Post(work())
    except Exception as error:
        return Post(error=error)


def _keys(state: Mapping[str, Any]) -> list[list[Any]]:
    if not isinstance(state, Mapping):
        raise InvalidStateError(f"the state must be a dict of named entries, not {type(state).__name__}")
    return [[key, isinstance(value, PerRank)] for key, value in state.items()]


def _agree(posts: list[Post], what: str, field: str) -> Json:
    """The value every rank posted under ``field``, or a CoordinationError naming the ranks that differ."""
    values = [post.value[field] for post in posts]
    differing = [rank for rank, value in enumerate(values) if value != values[0]]
    if differing:
        shown = "; ".join(f"rank {rank}: {values[rank]!r:.200}" for rank in [0, *differing[:7]])
        raise CoordinationError(
            f"the ranks disagree on {what} ({shown}); nothing was committed", ranks=tuple(differing)
        )
    return values[0]


# -- saving -------------------------------------------------------------------------------------------------------
def save_ranks(
    storage: Storage,
    coordinator: Coordinator,
    checkpoint: str,
    step: int,
    state: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None,
    state_version: int,
    existing: Callable[[CheckpointExistsError], CheckpointExistsError],
    after_commit: Callable[[int], None],
) -> Json:
    """Save ``state`` as ``step`` from every rank; returns the committed manifest's summary on every rank.
    ``after_commit`` (retention) runs on rank 0 once the commit is durable, before the others learn the outcome,
    so every rank sees the same steps afterwards; it must not raise."""
    world = coordinator.world_size
    attempt: SavePlan | None = None
    lock: AttemptLock | None = None

    def begin(posts: list[Post | None]) -> Json:
        nonlocal attempt, lock
        checked = require_all("save.begin", posts, coordinator.timeout)
        first_failure(checked)
        agreed = _agree(checked, "the step to save", "step")
        _agree(checked, "the state's entries and which are PerRank", "keys")
        attempt = SavePlan(checkpoint, agreed, new_save_id(), (), (), {}, {}, state_version)
        faults.point("save.begin")
        try:
            lock = begin_attempt(storage, attempt)
        except CheckpointExistsError as err:
            raise existing(err) from err
        try:
            storage.ensure_dir(attempt.staging)
            faults.point("staging.mkdir.after")
        except BaseException as err:
            abort_attempt(storage, attempt, lock, err)
            raise
        return {"save_id": attempt.save_id}

    def validated() -> Json:
        non_negative_int("step", step)
        return {"step": step, "keys": _keys(state)}

    save_id = coordinator.exchange("save.begin", _attempt(validated), begin)["save_id"]
    written = _attempt(lambda: _write_own_part(storage, checkpoint, step, save_id, state, coordinator, metrics))

    def commit(posts: list[Post | None]) -> Json:
        assert attempt is not None
        assert lock is not None
        plan = attempt

        def seal() -> Manifest:
            checked = require_all("save.commit", posts, coordinator.timeout)
            first_failure(checked)
            storage.sync_dir(plan.staging)
            faults.point("staging.fsync.after")
            manifest = _merge(plan, [post.value for post in checked], world)
            write_manifest(storage, plan, manifest)
            return manifest

        try:
            manifest = finish_save(storage, plan, lock, seal)
        except CheckpointExistsError as err:
            raise existing(err) from err
        after_commit(manifest.step)
        return {
            "save_id": manifest.save_id,
            "nbytes": manifest.nbytes,
            "created": manifest.created,
            "metrics": manifest.metrics,
        }

    return coordinator.exchange("save.commit", written, commit)


def _write_own_part(  # noqa: PLR0917 - one call site, the save's own values
    storage: Storage,
    checkpoint: str,
    step: int,
    save_id: str,
    state: Mapping[str, Any],
    coordinator: Coordinator,
    metrics: Mapping[str, float] | None,
) -> Json:
    """Write this rank's files: its share of the replicated entries and all of its per-rank entries."""
    rank, world = coordinator.rank, coordinator.world_size
    replicated = {key: value for key, value in state.items() if not isinstance(value, PerRank)}
    own = {key: {rank: value.value} for key, value in state.items() if isinstance(value, PerRank)}
    result: dict[str, Json] = {"rep": None, "own": None}
    if rank == 0 or SPLIT_REPLICATED:
        encoded = encode_state(replicated)
        plan = plan_save(
            encoded, checkpoint=checkpoint, step=step, metrics=metrics, save_id=save_id, file_prefix="rep-",
            shard_bytes=storage.shard_bytes or SHARD_BYTES,
        )  # fmt: skip
        writers = [index % world if SPLIT_REPLICATED else 0 for index in range(len(plan.files))]
        plan = _named_by_writer(plan, writers)
        mine = [index for index, writer in enumerate(writers) if writer == rank]
        records = write_files(
            storage, dataclasses.replace(plan, files=tuple(plan.files[i] for i in mine)), _leaves(encoded)
        )
        result["rep"] = {
            "files": {str(index): _file_json(record) for index, record in zip(mine, records, strict=True)},
            "layout": _layout_digest(plan),
        }
        if rank == 0:
            result["rep"]["plan"] = {
                "paths": [planned.path for planned in plan.files],
                "entries": [list(entry) for entry in plan.entries],
                "tree": plan.tree,
                "metrics": plan.metrics,
            }
    if own:
        encoded = encode_state(own)
        plan = plan_save(
            encoded, checkpoint=checkpoint, step=step, save_id=save_id, file_prefix="own-",
            shard_bytes=storage.shard_bytes or SHARD_BYTES,
        )  # fmt: skip
        plan = _named_by_writer(plan, [rank] * len(plan.files))
        records = write_files(storage, plan, _leaves(encoded))
        result["own"] = {
            "files": [_file_json(record) for record in records],
            "entries": [list(entry) for entry in plan.entries],
            "tree": plan.tree,
        }
    return result


def _leaves(encoded: Encoded) -> list[Any]:
    return [leaf.tensor for leaf in encoded.leaves]


def _named_by_writer(plan: SavePlan, writers: list[int]) -> SavePlan:
    """Every file's name starts with the rank that writes it: ``<save_id>/r00003-rep-00007.safetensors``."""
    files = tuple(
        dataclasses.replace(planned, path=join(plan.save_id, f"r{writer:05d}-" + planned.path.split("/", 1)[1]))
        for planned, writer in zip(plan.files, writers, strict=True)
    )
    return dataclasses.replace(plan, files=files)


def _layout_digest(plan: SavePlan) -> str:
    """Equal on ranks whose replicated entries have the same names, dtypes and shapes (the file headers)."""
    digest = hashlib.sha256()
    for planned in plan.files:
        digest.update(planned.header)
    return digest.hexdigest()


def _file_json(record: FileRecord) -> Json:
    return {"path": record.path, "size": record.size, "checksum": record.checksum}


def _merge(attempt: SavePlan, parts: list[Json], world: int) -> Manifest:
    """One manifest from every rank's part: replicated files and entries first, then each rank's own."""
    lead = parts[0]["rep"]["plan"]
    rep_files: dict[int, Json] = {}
    for rank, part in enumerate(parts):
        if part["rep"] is None:
            continue
        if part["rep"]["layout"] != parts[0]["rep"]["layout"]:
            raise CoordinationError(
                f"rank {rank}'s replicated entries differ from rank 0's in names, dtypes or shapes; replicated "
                "entries must be identical on every rank (wrap rank-local state in safepoint.PerRank)",
                ranks=(rank,),
            )
        rep_files.update((int(index), record) for index, record in part["rep"]["files"].items())
    files = [_file_record(rep_files[index]) for index in range(len(lead["paths"]))]
    entries = [_entry_record(item) for item in lead["entries"]]
    tree_items: list[list[Any]] = list(lead["tree"]["v"])
    per_rank: dict[str, list[list[Any]]] = {}
    for part in parts:
        own = part["own"]
        if own is None:
            continue
        file_offset, entry_offset = len(files), len(entries)
        files += [_file_record(record) for record in own["files"]]
        entries += [_entry_record(item, file_offset) for item in own["entries"]]
        for key, node in own["tree"]["v"]:
            per_rank.setdefault(key, []).extend([r, _shift(sub, entry_offset)] for r, sub in node["v"])
    for key, items in per_rank.items():
        tree_items.append([key, {"k": "object", "type": PER_RANK_TYPE, "v": {"k": "dict", "v": items}}])
    return Manifest(
        step=attempt.step,
        save_id=attempt.save_id,
        created=time.time(),
        files=tuple(files),
        entries=tuple(entries),
        tree={"k": "dict", "v": tree_items},
        metrics=dict(lead["metrics"]),
        state_version=attempt.state_version,
        world_size=world,
        writer=writer_version(),
    )


def _file_record(value: Json) -> FileRecord:
    return FileRecord(str(value["path"]), int(value["size"]), str(value["checksum"]))


def _entry_record(item: list[Any], file_offset: int = 0) -> EntryRecord:
    key, kind, dtype, shape, file, name, scalar = item
    return EntryRecord(key, kind, dtype, tuple(shape), file + file_offset, name, scalar)


def _shift(node: Json, offset: int) -> Json:
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


# -- restoring ----------------------------------------------------------------------------------------------------
def restore_ranks(
    storage: Storage,
    coordinator: Coordinator,
    state: MutableMapping[str, Any],
    *,
    step: int | None,
    strict: bool,
    committed: Callable[[], list[int]],
    step_path: Callable[[int], str],
    state_version: int | None = None,
    migrations: Migrations | None = None,
    cast_dtypes: bool = False,
) -> RestoreReport | None:
    """Restore on every rank from the one step rank 0 picks; see the module docstring."""

    def candidates(posts: list[Post | None]) -> Json:
        checked = require_all("restore.begin", posts, coordinator.timeout)
        first_failure(checked)
        agreed = _agree(checked, "the step to restore", "step")
        _agree(checked, "the state's entries and which are PerRank", "keys")
        steps = committed()
        if agreed is None:
            return {"steps": steps[::-1]}
        if agreed not in steps:
            raise CheckpointNotFoundError(
                f"step {agreed} is not committed in {storage.describe('')} (committed: {steps[-8:] or 'none'})"
            )
        return {"steps": [agreed]}

    def begin() -> Json:
        return {"step": step, "keys": _keys(state)}

    skipped: list[SkippedCheckpoint] = []
    for candidate in coordinator.exchange("restore.begin", _attempt(begin), candidates)["steps"]:
        path = step_path(candidate)
        prepared: tuple[PreparedRestore, dict[str, Any]] | None = None
        try:
            prepared = _prepare(
                storage, path, candidate, state, coordinator, strict=strict, skipped=tuple(skipped),
                state_version=state_version, migrations=migrations, cast_dtypes=cast_dtypes,
            )  # fmt: skip
            local = Post({"status": "ok"})
        except FormatVersionError as err:
            local = Post(error=err)  # a newer safepoint wrote it: falling back would silently lose progress
        except (CorruptCheckpointError, StorageError) as err:
            local = Post({"status": "corrupt", "reason": str(err)})
        except CheckpointNotFoundError:
            local = Post({"status": "gone"})
        except Exception as err:
            local = Post(error=err)
        verdict = coordinator.exchange(
            "restore.check", local, _judge(coordinator, candidate, explicit=step is not None)
        )
        if verdict["verdict"] == "gone":
            continue
        if verdict["verdict"] == "skip":
            logger.warning("skipping step %s: %s", candidate, verdict["reason"])
            skipped.append(SkippedCheckpoint(candidate, storage.describe(path), verdict["reason"]))
            continue
        assert prepared is not None
        return _apply_everywhere(coordinator, *prepared, state)
    if skipped:
        raise none_verifies(storage.describe(""), skipped)
    return None


def _judge(coordinator: Coordinator, candidate: int, *, explicit: bool) -> Callable[[list[Post | None]], Json]:
    def judge(posts: list[Post | None]) -> Json:
        checked = require_all("restore.check", posts, coordinator.timeout)
        first_failure(checked)
        statuses = [post.value["status"] for post in checked]
        if "gone" in statuses:
            if explicit:
                raise CheckpointNotFoundError(f"step {candidate} was removed while it was being restored")
            return {"verdict": "gone"}
        corrupt = [(r, post.value["reason"]) for r, post in enumerate(checked) if post.value["status"] == "corrupt"]
        if corrupt:
            reason = corrupt[0][1] if coordinator.world_size == 1 else f"rank {corrupt[0][0]}: {corrupt[0][1]}"
            if explicit:
                raise CorruptCheckpointError(reason)
            return {"verdict": "skip", "reason": reason}
        return {"verdict": "apply"}

    return judge


def _apply_everywhere(
    coordinator: Coordinator, prepared: PreparedRestore, live: dict[str, Any], state: MutableMapping[str, Any]
) -> RestoreReport:
    reports: list[RestoreReport] = []

    def apply() -> Json:
        reports.append(prepared.apply())
        for key, value in state.items():  # values restored by assignment (numbers, tuples) go back into the PerRank
            if isinstance(value, PerRank):
                value.value = live[key]
        return None

    applied = _attempt(apply)

    def outcome(posts: list[Post | None]) -> Json:
        first_failure(require_all("restore.apply", posts, coordinator.timeout))
        return None

    try:
        coordinator.exchange("restore.apply", applied, outcome)
    except BaseException as err:
        if applied.error is None:
            attach_note(err, f"safepoint: this rank's state WAS restored from step {prepared.report.step}")
        raise
    return reports[0]


def _prepare(
    storage: Storage,
    path: str,
    candidate: int,
    state: MutableMapping[str, Any],
    coordinator: Coordinator,
    *,
    strict: bool,
    skipped: tuple[SkippedCheckpoint, ...],
    state_version: int | None = None,
    migrations: Migrations | None = None,
    cast_dtypes: bool = False,
) -> tuple[PreparedRestore, dict[str, Any]]:
    """Read and verify what this rank needs of the checkpoint, and match it against the live state."""
    rank, world = coordinator.rank, coordinator.world_size
    manifest = read_manifest(storage, path, step=candidate)
    where = storage.describe(path)
    view = _rank_view(manifest, state, rank, world, where)
    leaves = read_leaves(storage, path, view, only=set(_entries_in(view.tree)))
    live = {key: value.value if isinstance(value, PerRank) else value for key, value in state.items()}
    prepared = prepare_checkpoint(
        LoadedCheckpoint(path, view, leaves), live, strict=strict, path=where, skipped=skipped,
        state_version=state_version, migrations=migrations, cast_dtypes=cast_dtypes,
    )  # fmt: skip
    return prepared, live


def _rank_view(manifest: Manifest, state: Mapping[str, Any], rank: int, world: int, where: str) -> Manifest:
    """The manifest as this rank sees it: each per-rank entry replaced by this rank's value."""
    items = manifest.tree["v"]
    saved_own = {key for key, node in items if _is_per_rank(node)}
    live_own = {key for key, value in state.items() if isinstance(value, PerRank)}
    wrongly_marked = sorted(live_own & ({key for key, _ in items} - saved_own))
    if wrongly_marked:
        raise RestoreError(
            f"{where}: entries {wrongly_marked} were saved replicated, but the live state marks them "
            "safepoint.PerRank; nothing was changed",
            mismatched=tuple(wrongly_marked),
        )
    unmarked = sorted((saved_own & set(state)) - live_own)
    if unmarked:
        raise RestoreError(
            f"{where}: entries {unmarked} were saved per rank (safepoint.PerRank); wrap them in safepoint.PerRank in "
            "the live state too; nothing was changed",
            mismatched=tuple(unmarked),
        )
    if saved_own and manifest.world_size != world:
        raise RestoreError(
            f"{where} was saved by {manifest.world_size} rank(s) and has per-rank entries {sorted(saved_own)}; "
            f"they cannot be restored by {world} rank(s) (only replicated entries restore at any world size); "
            "nothing was changed",
            mismatched=tuple(sorted(saved_own)),
        )
    view_items = [[key, _own_node(node, rank, world, where) if key in saved_own else node] for key, node in items]
    return dataclasses.replace(manifest, tree={"k": "dict", "v": view_items})


def _is_per_rank(node: Json) -> bool:
    return bool(node["k"] == "object" and node["type"] == PER_RANK_TYPE)


def _own_node(node: Json, rank: int, world: int, where: str) -> Json:
    by_rank = node["v"]
    if by_rank["k"] != "dict" or sorted(key for key, _ in by_rank["v"]) != list(range(world)):
        raise CorruptCheckpointError(f"{where}: a per-rank entry does not hold one value for each of {world} ranks")
    return next(child for key, child in by_rank["v"] if key == rank)


def _entries_in(node: Json) -> Iterator[int]:
    if "e" in node:
        yield node["e"]
    elif node["k"] in ("dict",):
        for _, child in node["v"]:
            yield from _entries_in(child)
    elif node["k"] in ("list", "tuple"):
        for child in node["v"]:
            yield from _entries_in(child)
    elif node["k"] in ("object", "typed"):
        yield from _entries_in(node["v"])
