"""The one restore orchestration: pick the newest step that verifies everywhere, read what this rank needs,
apply everywhere or nowhere. One process is the one-rank case (a LocalCoordinator), as for saves.

    restore.begin   every rank posts the step it asks for and its entry names; rank 0 lists the candidates
                    (newest first, or the one step asked for) and every rank learns the same list
    per candidate   every rank reads and verifies the files it needs (the replicated ones and its own) and
                    matches them against its live state, changing nothing; then ``restore.check``: rank 0
                    decides for every rank: apply, skip a corrupt one (falling back to the next), or pass over
                    one that retention removed meanwhile
    restore.apply   every rank applies what it prepared; any rank's failure is every rank's error

``load`` runs the same loop on one process (each rank reads on its own: no collective), with ``use`` returning
the values instead of applying them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

from ._backup import TensorBackups
from ._distributed import Coordinator, LocalCoordinator, Operation, PerRank, Post, first_failure, require_all
from ._errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    RestoreError,
    SafepointError,
    StorageError,
    UnsafeCheckpointError,
    attach_note,
)
from ._layout import step_dir
from ._manifest import Manifest
from ._messages import Candidates, Check, Done, RestoreBegin, Verdict
from ._migrations import Migrations
from ._pipeline import PER_RANK_TYPE, CheckpointInfo, agree, entry_keys, gc_paused, has_per_rank
from ._reader import LoadedCheckpoint, lazy_sharded, read_checkpoint, read_leaves, read_manifest
from ._resolve import committed_steps, is_committed, step_dirs
from ._restore import (
    PreparedRestore,
    RestoreReport,
    SkippedCheckpoint,
    copied_into,
    load_values,
    none_verifies,
    prepare_checkpoint,
)
from ._storage import Storage
from ._storage.base import HeldRangeReads, RangeFiles
from ._validate import non_negative_int

__all__ = ["Restorer", "committed_checkpoints", "load_newest", "restore_newest"]

logger = logging.getLogger("safepoint")
_T = TypeVar("_T")

#: What a rank does with a candidate once it read it: returns something to apply everywhere, or the result.
Prepare = Callable[[LoadedCheckpoint, str, tuple[SkippedCheckpoint, ...]], _T]


@dataclasses.dataclass(frozen=True)
class Restorer:
    """The restores and loads of one manager directory, by step: ``restore`` walks from the newest committed step
    to the first one that verifies and fits, reporting every step passed over; nothing to restore returns
    ``None``; committed checkpoints none of which verifies raise (starting from scratch over them is the silent
    failure this library exists to prevent). Checkpoints of an older ``state_version`` go through ``migrations``."""

    storage: Storage
    coordinator: Coordinator
    state_version: int
    migrations: Migrations | None

    def steps(self) -> list[int]:
        return committed_steps(self.storage)

    def checkpoints(self) -> list[CheckpointInfo]:
        return committed_checkpoints(self.storage)

    def restore(
        self, state: MutableMapping[str, Any], *, step: int | None, strict: bool, cast_dtypes: bool
    ) -> RestoreReport | None:
        return restore_newest(
            self.storage, self.coordinator, state, step=step, committed=self.steps, step_path=step_dir,
            strict=strict, state_version=self.state_version, migrations=self.migrations, cast_dtypes=cast_dtypes,
        )  # fmt: skip

    def load(self, step: int | None, *, mmap: bool, allow_pickle: Any) -> tuple[dict[str, Any], RestoreReport]:
        return load_newest(
            self.storage, step=step, committed=self.steps, step_path=step_dir, mmap=mmap,
            state_version=self.state_version, migrations=self.migrations, allow_pickle=allow_pickle,
        )  # fmt: skip


def committed_checkpoints(storage: Storage) -> list[CheckpointInfo]:
    """Every committed checkpoint whose manifest reads, ascending by step; the others are logged, not hidden
    from :func:`~safepoint.verify`."""
    infos = []
    for found in step_dirs(storage):
        path = found.path
        try:
            infos.append(CheckpointInfo.of(read_manifest(storage, path), storage.describe(path)))
        except CheckpointNotFoundError:
            continue
        except SafepointError as err:  # one bad manifest must not hide the others; verify() reports it
            logger.warning("leaving out %s: %s", storage.describe(path), err)
    return infos


def restore_newest(
    storage: Storage,
    coordinator: Coordinator,
    state: MutableMapping[str, Any],
    *,
    step: int | None,
    committed: Callable[[], list[int]],
    step_path: Callable[[int], str],
    strict: bool,
    state_version: int | None,
    migrations: Migrations | None,
    cast_dtypes: bool,
) -> RestoreReport | None:
    """Apply the newest step that verifies (or exactly ``step``) to ``state`` on every rank; None if nothing is
    committed."""
    _check_step(step)
    ranked = coordinator.world_size > 1 or has_per_rank(state)
    live: dict[str, Any] = {}

    def prepare(loaded: LoadedCheckpoint, where: str, skipped: tuple[SkippedCheckpoint, ...]) -> PreparedRestore:
        nonlocal live
        if ranked:
            live = {key: value.value if isinstance(value, PerRank) else value for key, value in state.items()}
        return prepare_checkpoint(
            loaded, live if ranked else state, strict=strict, path=where, skipped=skipped,
            state_version=state_version, migrations=migrations, cast_dtypes=cast_dtypes,
        )  # fmt: skip

    backups = TensorBackups()  # of live tensors a candidate's read writes in place; put back if it is not applied
    files = storage.range_files() if isinstance(storage, HeldRangeReads) else None  # closed when the restore ends

    def read(path: str, candidate: int) -> LoadedCheckpoint:
        if not ranked:
            copied = copied_into(state, state_version)
            return read_checkpoint(storage, path, step=candidate, copied=copied, backups=backups)
        return _read_own_view(storage, path, candidate, state, coordinator.rank, coordinator.world_size, files)

    operation = coordinator.operation("restore")
    held = contextlib.closing(files) if files is not None else contextlib.nullcontext()
    with gc_paused(), held, backups.until_complete():  # gc_paused: a restore allocates a few objects per entry
        found = _newest(storage, operation, state, step, committed, step_path, read, prepare)
        if found is None:
            return None
        return _apply_everywhere(operation, found, live if ranked else None, state)


def load_newest(
    storage: Storage,
    *,
    step: int | None,
    committed: Callable[[], list[int]],
    step_path: Callable[[int], str],
    mmap: bool,
    state_version: int,
    migrations: Migrations | None,
    allow_pickle: Any,
) -> tuple[dict[str, Any], RestoreReport]:
    """The newest checkpoint that verifies (or exactly ``step``) as plain values; CheckpointNotFoundError if
    nothing is committed (there are no values to return, and a None would only fail at the unpacking)."""
    _check_step(step)
    if not isinstance(mmap, bool):
        raise ConfigError(f"mmap must be True or False, not {mmap!r}")

    def values(
        loaded: LoadedCheckpoint, where: str, skipped: tuple[SkippedCheckpoint, ...]
    ) -> tuple[dict[str, Any], RestoreReport]:
        return load_values(
            loaded, path=where, skipped=skipped, state_version=state_version, migrations=migrations,
            allow_pickle=allow_pickle,
        )  # fmt: skip

    def read(path: str, candidate: int) -> LoadedCheckpoint:
        return read_checkpoint(storage, path, step=candidate, mmap=mmap)

    operation = LocalCoordinator().operation("load")
    with gc_paused():
        found = _newest(storage, operation, None, step, committed, step_path, read, values)
    if found is None:
        raise CheckpointNotFoundError(f"nothing is committed in {storage.describe('')}: there is no checkpoint to load")
    return found


def _newest(  # noqa: PLR0917 - the loop's own parts
    storage: Storage,
    operation: Operation,
    state: Mapping[str, Any] | None,
    step: int | None,
    committed: Callable[[], list[int]],
    step_path: Callable[[int], str],
    read: Callable[[str, int], LoadedCheckpoint],
    use: Prepare[_T],
) -> _T | None:
    """``use`` the first candidate that reads and fits on every rank, newest first; None if there is none."""
    where_all = storage.describe("")

    def candidates(posts: list[Post[RestoreBegin] | None]) -> Candidates:
        checked = require_all("restore.begin", posts, operation.timeout)
        first_failure(checked)
        opened = [post.message() for post in checked]
        agreed = agree([o.step for o in opened], "the step to restore")
        agree([o.keys for o in opened], "the state's entries and which are PerRank")
        steps = committed()
        if agreed is None:
            return Candidates(tuple(steps[::-1]))
        if agreed not in steps:
            raise CheckpointNotFoundError(
                f"step {agreed} is not committed in {where_all} (committed: {_summary(steps)})"
            )
        return Candidates((agreed,))

    try:
        keys = (
            () if state is None or (operation.world_size == 1 and not isinstance(state, Mapping)) else entry_keys(state)
        )
        opening: Post[RestoreBegin] = Post(RestoreBegin(step, keys))
    except Exception as error:
        opening = Post(error=error)
    listed = operation.exchange(
        "restore.begin", opening, candidates, reads=(RestoreBegin.from_json, Candidates.from_json)
    )
    skipped: list[SkippedCheckpoint] = []
    for candidate in listed.steps:
        path = step_path(candidate)
        where = storage.describe(path)
        local, prepared = _try(
            functools.partial(read, path, candidate),
            functools.partial(_use, use, where=where, skipped=tuple(skipped)),
            storage=storage,
            path=path,
            explicit=step is not None,
        )
        try:
            verdict = operation.exchange(
                "restore.check", local, _judge(operation, candidate, explicit=step is not None),
                reads=(Check.from_json, Verdict.from_json),
            )  # fmt: skip
        except BaseException as err:
            _discard(prepared, err)
            raise
        if verdict.verdict != "apply":
            _discard(prepared, None)  # another rank found this step corrupt, or gone: what was read in goes back
        if verdict.verdict == "gone":
            continue
        if verdict.verdict == "skip":
            logger.warning("skipping step %s: %s", candidate, verdict.reason)
            skipped.append(SkippedCheckpoint(candidate, where, verdict.reason))
            continue
        assert prepared is not None
        return prepared
    if skipped:
        raise none_verifies(where_all, skipped)
    return None


def _discard(prepared: object, error: BaseException | None) -> None:
    """Put back what preparing a candidate read into the live state in place (see PreparedRestore.discard)."""
    if isinstance(prepared, PreparedRestore):
        prepared.discard(error)


def _use(use: Prepare[_T], loaded: LoadedCheckpoint, *, where: str, skipped: tuple[SkippedCheckpoint, ...]) -> _T:
    return use(loaded, where, skipped)


def _try(
    read: Callable[[], LoadedCheckpoint],
    use: Callable[[LoadedCheckpoint], _T],
    *,
    storage: Storage,
    path: str,
    explicit: bool,
) -> tuple[Post[Check], _T | None]:
    """Read a candidate and prepare it on this rank: how it went (or the error that ends the restore), and what
    was prepared. Preparing reads too (the parts of sharded tensors this rank needs): a corrupt or unreadable
    byte found there is judged as one found by ``read``; an unpickling opt-in that is missing is not damage."""
    try:
        loaded = read()
    except Exception as err:
        return _failure(err, storage=storage, path=path, explicit=explicit), None
    try:
        return Post(Check("ok")), use(loaded)
    except UnsafeCheckpointError as err:
        return Post(error=err), None
    except Exception as err:
        return _failure(err, storage=storage, path=path, explicit=explicit), None


def _failure(err: Exception, *, storage: Storage, path: str, explicit: bool) -> Post[Check]:
    if isinstance(err, FormatVersionError):
        return Post(error=err)  # a newer safepoint wrote it: falling back would silently lose progress
    if isinstance(err, (CorruptCheckpointError, StorageError)):
        if explicit:
            return Post(error=err)  # the step asked for, or an error: never a fallback
        if not is_committed(storage, path):
            return Post(Check("gone"))  # unpublished while it was read: retention elsewhere removed it
        return Post(Check("corrupt", str(err)))
    if isinstance(err, CheckpointNotFoundError):
        return Post(Check("gone"))
    return Post(error=err)  # a newer state_version, a failing migration, a mismatch: on every rank, no fallback


def _judge(operation: Operation, candidate: int, *, explicit: bool) -> Callable[[list[Post[Check] | None]], Verdict]:
    def judge(posts: list[Post[Check] | None]) -> Verdict:
        checked = require_all("restore.check", posts, operation.timeout)
        first_failure(checked)
        checks = [post.message() for post in checked]
        if any(check.status == "gone" for check in checks):
            if explicit:
                raise CheckpointNotFoundError(f"step {candidate} was removed while it was being restored")
            return Verdict("gone")
        corrupt = [(rank, check.reason) for rank, check in enumerate(checks) if check.status == "corrupt"]
        if corrupt:
            rank, reason = corrupt[0]
            return Verdict("skip", reason if operation.world_size == 1 else f"rank {rank}: {reason}")
        return Verdict("apply")

    return judge


def _apply_everywhere(
    operation: Operation,
    prepared: PreparedRestore,
    live: dict[str, Any] | None,
    state: MutableMapping[str, Any],
) -> RestoreReport:
    reports: list[RestoreReport] = []
    try:
        reports.append(prepared.apply())
        if live is not None:
            for key, value in state.items():  # values restored by assignment (numbers, tuples) go back into PerRank
                if isinstance(value, PerRank):
                    value.value = live[key]
        applied: Post[Done] = Post(Done())
    except Exception as error:
        applied = Post(error=error)

    def outcome(posts: list[Post[Done] | None]) -> Done:
        first_failure(require_all("restore.apply", posts, operation.timeout))
        return Done()

    try:
        operation.exchange("restore.apply", applied, outcome, reads=(Done.from_json, Done.from_json))
    except BaseException as err:
        if applied.error is None:
            attach_note(err, f"safepoint: this rank's state WAS restored from step {prepared.report.step}")
        raise
    return reports[0]


def _check_step(step: object) -> None:
    non_negative_int("step", step, allow_none=True)


def _summary(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-3:]))} ({len(steps)} in all)"


# -- what one rank reads ------------------------------------------------------------------------------------------
def _read_own_view(  # noqa: PLR0917 - one call site
    storage: Storage, path: str, candidate: int, state: Mapping[str, Any], rank: int, world: int,
    files: RangeFiles | None,
) -> LoadedCheckpoint:  # fmt: skip
    """Read and verify what this rank needs of the checkpoint: the replicated entries and its own."""
    manifest = read_manifest(storage, path, step=candidate)
    view = _rank_view(manifest, state, rank, world, storage.describe(path))
    leaves = read_leaves(storage, path, view, only=set(_entries_in(view.tree)))
    # sharded tensors are read later, by the parts this rank's live targets need (see _restore.fit)
    return LoadedCheckpoint(path, view, leaves, lazy_sharded(storage, path, manifest, files))


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


def _is_per_rank(node: Any) -> bool:
    return bool(node["k"] == "object" and node["type"] == PER_RANK_TYPE)


def _own_node(node: Any, rank: int, world: int, where: str) -> Any:
    by_rank = node["v"]
    if by_rank["k"] != "dict" or sorted(key for key, _ in by_rank["v"]) != list(range(world)):
        raise CorruptCheckpointError(f"{where}: a per-rank entry does not hold one value for each of {world} ranks")
    return next(child for key, child in by_rank["v"] if key == rank)


def _entries_in(node: Any) -> Iterator[int]:
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
