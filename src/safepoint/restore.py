"""Applying a verified checkpoint to live objects, totally or not at all, and the RestoreReport.

Order: the checkpoint is read and every byte verified (:mod:`safepoint.reader`); when the caller gives the code's
``state_version``, the plain loaded values are upgraded by the migration chain (:mod:`safepoint.migrations`),
so a failing migration has touched nothing live; the loaded values are then matched against the live state
(keys, types, shapes, dtypes) into a plan; only if the whole match is valid is anything applied, in two phases:

1. Objects' ``load_state_dict``, then a check that every tensor they were given is what their ``state_dict()``
   now returns, so an object that silently ignores data is caught instead of training on from its initial
   weights. Objects other than modules are backed up just before they are applied (cheap when resuming: a fresh
   optimizer has no state) and rolled back if a later object or the check fails. Modules are matched exactly
   (every key, shape and dtype) beforehand and not copied: a backup would double the memory of the model.
2. Plain tensor copies and assignments into the live dicts, lists and tuples: nothing can fail any more.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codec import REPLACED_WHOLE, Pickled, PickledPayload, decode_tree, is_stateful, key_path, pickle_allowed
from .errors import CorruptCheckpointError, RestoreError, UnsafeCheckpointError, attach_note
from .migrations import Migrations, upgrade_state
from .reader import LoadedCheckpoint

__all__ = [
    "PreparedRestore",
    "RestoreReport",
    "SkippedCheckpoint",
    "apply_checkpoint",
    "none_verifies",
    "plain_values",
    "prepare_checkpoint",
]

logger = logging.getLogger("safepoint")


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A committed checkpoint that restore passed over, and why."""

    step: int
    path: str
    reason: str


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did. Every field is filled from the checkpoint actually applied."""

    step: int
    path: str  # the checkpoint's own directory
    save_id: str
    restored: tuple[str, ...]  # top-level entries applied
    missing: tuple[str, ...] = ()  # in the live state, not in the checkpoint (left as they were)
    unexpected: tuple[str, ...] = ()  # in the checkpoint, not in the live state (not applied)
    skipped: tuple[SkippedCheckpoint, ...] = ()  # newer checkpoints passed over as invalid
    metrics: Mapping[str, float] = field(default_factory=dict)
    checksums_verified: bool = True
    state_version: int = 1  # the checkpoint's, as saved
    format_version: int = 1
    nbytes: int = 0
    created: float = 0.0
    migrations: tuple[str, ...] = ()  # applied before matching, in order: "name (1 -> 2)"


def plain_values(loaded: LoadedCheckpoint, allow_pickle: Iterable[str] | bool = False) -> dict[str, Any]:
    """The checkpoint as nested plain values; pickled entries are unpickled only where ``allow_pickle`` says."""
    leaves: list[Any] = []
    allow = allow_pickle if isinstance(allow_pickle, bool) else frozenset(allow_pickle)
    for value in loaded.leaves:
        if not isinstance(value, PickledPayload):
            leaves.append(value)
            continue
        if not pickle_allowed(value.key, allow):
            raise UnsafeCheckpointError(
                f"entry {value.key!r} is pickled and loading it could run arbitrary code; pass "
                f"allow_pickle=[{value.key!r}] only if you trust where this checkpoint came from"
            )
        leaves.append(value.unpickle())
    result = decode_tree(loaded.manifest.tree, leaves)
    assert isinstance(result, dict)
    return result


# -- matching ---------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    strict: bool
    actions: list[Callable[[], None]] = field(default_factory=list)  # cannot fail once matched
    objects: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, live object, state_dict)
    checks: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, live object, its saved state_dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _is_tensor(value: object) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes, np.generic, *REPLACED_WHOLE))


def _match(plan: _Plan, live: Any, saved: Any, path: list[str | int], assign: Callable[[Any], None] | None) -> None:
    key = key_path(path)
    if isinstance(live, Pickled):
        _match_pickled(plan, live, saved, key)
    elif isinstance(live, torch.Tensor):
        _match_tensor(plan, live, saved, key)
    elif isinstance(live, np.ndarray):
        _match_array(plan, live, saved, key)
    elif is_stateful(live):
        _match_object(plan, live, saved, path)
    elif isinstance(live, MutableMapping):
        _match_dict(plan, live, saved, path)
    elif isinstance(live, (list, tuple)):
        _match_sequence(plan, live, saved, path, assign)
    elif _is_scalar(live) and assign is not None:
        if isinstance(saved, PickledPayload):
            plan.mismatched.append(f"{key}: the checkpoint holds a pickled value; restore into a safepoint.Pickled")
        elif live is None or _is_scalar(saved):
            plan.actions.append(lambda: assign(saved))
        else:
            plan.mismatched.append(f"{key}: live value is {type(live).__name__}, checkpoint has {type(saved).__name__}")
    else:
        plan.mismatched.append(f"{key}: cannot restore into a live {type(live).__name__}")


def _match_pickled(plan: _Plan, live: Pickled, saved: Any, key: str) -> None:
    if isinstance(saved, PickledPayload):
        payload = saved  # the live Pickled wrapper is this entry's explicit opt-in

        def unpickle() -> None:
            live.value = payload.unpickle()

        plan.objects.append((key, _PickledTarget(live, unpickle), None))
    elif _is_tensor(saved) or isinstance(saved, (dict, list, tuple)) or _is_scalar(saved):
        plan.actions.append(lambda: setattr(live, "value", saved))
    else:  # pragma: no cover - decode_tree yields nothing else
        plan.mismatched.append(f"{key}: unexpected value")


class _PickledTarget:
    """Lets unpickling run in the fallible phase, where a failure rolls back what was applied before."""

    def __init__(self, wrapper: Pickled, run: Callable[[], None]) -> None:
        self.wrapper, self.run = wrapper, run


def _match_tensor(plan: _Plan, live: torch.Tensor, saved: Any, key: str) -> None:
    if not isinstance(saved, torch.Tensor):
        plan.mismatched.append(f"{key}: live value is a tensor, checkpoint has {type(saved).__name__}")
        return
    if live.shape != saved.shape or live.dtype != saved.dtype:
        plan.mismatched.append(
            f"{key}: live tensor is {live.dtype} {list(live.shape)}, checkpoint has {saved.dtype} {list(saved.shape)}"
        )
        return

    def copy_tensor() -> None:
        with torch.no_grad():
            live.copy_(saved)

    plan.actions.append(copy_tensor)


def _match_array(plan: _Plan, live: np.ndarray[Any, Any], saved: Any, key: str) -> None:
    # byte order is not part of the value: np.copyto swaps it
    same_dtype = isinstance(saved, np.ndarray) and saved.dtype.newbyteorder("=") == live.dtype.newbyteorder("=")
    if not isinstance(saved, np.ndarray) or saved.shape != live.shape or not same_dtype:
        what = f"{saved.dtype} {list(saved.shape)}" if isinstance(saved, np.ndarray) else type(saved).__name__
        plan.mismatched.append(f"{key}: live array is {live.dtype} {list(live.shape)}, checkpoint has {what}")
        return
    if not live.flags.writeable:
        plan.mismatched.append(f"{key}: the live array is read-only")
        return
    plan.actions.append(lambda: np.copyto(live, saved))


def _match_object(plan: _Plan, live: Any, saved: Any, path: list[str | int]) -> None:
    key = key_path(path)
    if not isinstance(saved, Mapping):
        plan.mismatched.append(f"{key}: live {type(live).__name__} needs a state_dict, checkpoint has "
                               f"{type(saved).__name__}")  # fmt: skip
        return
    current = live.state_dict()
    if isinstance(live, torch.nn.Module):
        _match_module_state(plan, current, saved, path)
    elif isinstance(current, Mapping):
        _compare_keys(plan, current, saved, path)
        if isinstance(live, torch.optim.Optimizer):
            _match_param_groups(plan, current, saved, key)
    state = dict(saved)
    if not plan.strict and isinstance(live, torch.nn.Module):
        state = {k: v for k, v in state.items() if k in current}
    plan.objects.append((key, live, state))
    plan.checks.append((key, live, state))


def _match_module_state(
    plan: _Plan, current: Mapping[str, Any], saved: Mapping[Any, Any], path: list[str | int]
) -> None:
    _compare_keys(plan, current, saved, path)
    for name, live_value in current.items():
        value = saved.get(name)
        if (
            isinstance(live_value, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and (live_value.shape != value.shape or live_value.dtype != value.dtype)
        ):
            plan.mismatched.append(
                f"{key_path([*path, name])}: live tensor is {live_value.dtype} {list(live_value.shape)}, "
                f"checkpoint has {value.dtype} {list(value.shape)}"
            )


def _compare_keys(plan: _Plan, current: Mapping[Any, Any], saved: Mapping[Any, Any], path: list[str | int]) -> None:
    plan.missing.extend(key_path([*path, k]) for k in current if k not in saved)
    plan.unexpected.extend(key_path([*path, k]) for k in saved if k not in current)


def _match_param_groups(plan: _Plan, current: Mapping[str, Any], saved: Mapping[Any, Any], key: str) -> None:
    live_groups, saved_groups = current.get("param_groups"), saved.get("param_groups")
    if not isinstance(live_groups, list) or not isinstance(saved_groups, (list, tuple)):
        plan.mismatched.append(f"{key}: the checkpoint has no param_groups list")
        return
    live_sizes = [len(g.get("params", ())) for g in live_groups]
    saved_sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in saved_groups]
    if live_sizes != saved_sizes:
        plan.mismatched.append(
            f"{key}: the optimizer has parameter groups of sizes {live_sizes}, the checkpoint {saved_sizes}"
        )


def _match_dict(plan: _Plan, live: MutableMapping[Any, Any], saved: Any, path: list[str | int]) -> None:
    key = key_path(path)
    if not isinstance(saved, Mapping):
        plan.mismatched.append(f"{key or 'state'}: live value is a dict, checkpoint has {type(saved).__name__}")
        return
    _compare_keys(plan, live, saved, path)
    for name in list(live):
        if name in saved:
            _match(plan, live[name], saved[name], [*path, name], _setter(live, name))


def _setter(container: Any, name: Any) -> Callable[[Any], None]:
    def assign(value: Any) -> None:
        container[name] = value

    return assign


def _holds_live_objects(value: Any) -> bool:
    if _is_tensor(value) or is_stateful(value) or isinstance(value, (Pickled, Mapping)):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_live_objects(v) for v in value)


def _match_sequence(
    plan: _Plan,
    live: list[Any] | tuple[Any, ...],
    saved: Any,
    path: list[str | int],
    assign: Callable[[Any], None] | None,
) -> None:
    key = key_path(path)
    if not isinstance(saved, (list, tuple)):
        plan.mismatched.append(f"{key}: live value is a {type(live).__name__}, checkpoint has {type(saved).__name__}")
        return
    if len(live) != len(saved):
        if _holds_live_objects(live) or _holds_live_objects(saved) or assign is None:
            plan.mismatched.append(f"{key}: live sequence has {len(live)} items, checkpoint has {len(saved)}")
        elif isinstance(live, list):
            plan.actions.append(lambda: live.__setitem__(slice(None), list(saved)))
        else:
            plan.actions.append(lambda: assign(_same_tuple_type(live, saved)))
        return
    if isinstance(live, list):
        for i, item in enumerate(live):
            _match(plan, item, saved[i], [*path, i], _setter(live, i))
        return
    # tuples are rebuilt: items restored in place stay the same objects, the others are replaced
    slots = list(live)
    for i, item in enumerate(live):
        _match(plan, item, saved[i], [*path, i], _setter(slots, i))
    if assign is not None:
        plan.actions.append(lambda: assign(_same_tuple_type(live, slots)))


def _same_tuple_type(template: tuple[Any, ...], items: Iterable[Any]) -> tuple[Any, ...]:
    if hasattr(template, "_fields"):  # a namedtuple
        return type(template)(*items)
    return tuple(items)


def _tensors_in(value: Any, path: list[Any]) -> Iterable[tuple[list[Any], torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors_in(v, [*path, k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, [*path, i])


def none_verifies(where: str, skipped: list[SkippedCheckpoint]) -> CorruptCheckpointError:
    """The error of a resume that found committed checkpoints and none that verifies."""
    reasons = "\n".join(f"  step {s.step}: {s.reason}" for s in skipped)
    return CorruptCheckpointError(
        f"{where} has {len(skipped)} committed checkpoint(s) and none verifies; refusing to "
        f"start from scratch over them:\n{reasons}"
    )


# -- applying ---------------------------------------------------------------------------------------------------
def apply_checkpoint(
    loaded: LoadedCheckpoint,
    live_state: MutableMapping[str, Any],
    *,
    strict: bool,
    path: str,
    skipped: tuple[SkippedCheckpoint, ...] = (),
    state_version: int | None = None,
    migrations: Migrations | None = None,
) -> RestoreReport:
    """Apply a verified checkpoint to ``live_state`` in place. Raises RestoreError with live objects unchanged.

    With ``state_version`` (the code's), a checkpoint of another version is first upgraded by ``migrations``;
    a newer one, or one no chain reaches, raises StateVersionError, and a failing migration MigrationError.
    """
    prepared = prepare_checkpoint(
        loaded, live_state, strict=strict, path=path, skipped=skipped, state_version=state_version,
        migrations=migrations,
    )  # fmt: skip
    return prepared.apply()


@dataclass(frozen=True)
class PreparedRestore:
    """A checkpoint matched against the live state, nothing applied yet: every rank of a distributed restore
    prepares first, and applies only once all ranks have prepared."""

    plan: _Plan
    report: RestoreReport

    def apply(self) -> RestoreReport:
        _apply(self.plan, self.report.step)
        return self.report


def prepare_checkpoint(
    loaded: LoadedCheckpoint,
    live_state: MutableMapping[str, Any],
    *,
    strict: bool,
    path: str,
    skipped: tuple[SkippedCheckpoint, ...] = (),
    state_version: int | None = None,
    migrations: Migrations | None = None,
) -> PreparedRestore:
    """Match a verified (and, with ``state_version``, migrated) checkpoint against ``live_state``; RestoreError
    if it does not fit. Changes nothing."""
    if not isinstance(live_state, MutableMapping):
        raise RestoreError(f"the live state must be a dict, not {type(live_state).__name__}")
    saved = decode_tree(loaded.manifest.tree, loaded.leaves)
    applied: tuple[str, ...] = ()
    if state_version is not None:
        saved_version = loaded.manifest.state_version
        saved, applied = upgrade_state(
            saved, migrations, saved_version=saved_version, state_version=state_version, where=path
        )
    plan = _Plan(strict)
    _match(plan, live_state, saved, [], None)
    step = loaded.manifest.step
    if plan.mismatched or (strict and (plan.missing or plan.unexpected)):
        raise _restore_error(plan, step, path, strict)
    report = RestoreReport(
        step=step,
        path=path,
        save_id=loaded.manifest.save_id,
        restored=tuple(k for k in live_state if k in saved),
        missing=tuple(plan.missing),
        unexpected=tuple(plan.unexpected),
        skipped=skipped,
        metrics=dict(loaded.manifest.metrics),
        state_version=loaded.manifest.state_version,
        format_version=loaded.manifest.format_version,
        nbytes=loaded.manifest.nbytes,
        created=loaded.manifest.created,
        migrations=applied,
    )
    return PreparedRestore(plan, report)


def _restore_error(plan: _Plan, step: int, path: str, strict: bool) -> RestoreError:
    lines = [f"checkpoint step {step} at {path} does not fit the live state; nothing was changed"]
    lines += [f"  mismatched: {m}" for m in plan.mismatched[:20]]
    if strict:
        lines += [f"  missing from the checkpoint: {m}" for m in plan.missing[:20]]
        lines += [f"  unexpected in the checkpoint: {u}" for u in plan.unexpected[:20]]
        if plan.missing or plan.unexpected:
            lines.append("  (strict=False restores what matches and reports the rest)")
    return RestoreError(
        "\n".join(lines),
        missing=tuple(plan.missing),
        unexpected=tuple(plan.unexpected),
        mismatched=tuple(plan.mismatched),
    )


def _apply(plan: _Plan, step: int) -> None:
    # Phase 1, which may fail: objects' load_state_dict (others first, each backed up; modules, matched exactly,
    # last), then the check that every tensor they were given took effect. A failure rolls phase 1 back.
    # Phase 2 cannot fail once matched: plain tensor copies and assignments into dicts, lists and tuples.
    order = sorted(plan.objects, key=lambda item: isinstance(item[1], torch.nn.Module))
    undo: list[Callable[[], None]] = []
    try:
        for key, target, state in order:
            try:
                undo.append(_load_object(target, state, plan.strict))
            except Exception as err:
                raise RestoreError(
                    f"restoring {key!r} from step {step} failed in its load_state_dict: {err!r}; "
                    "objects restored before it were rolled back and nothing else was changed"
                ) from err
        _check_applied(plan, step)
    except BaseException as err:
        _roll_back(undo, err)
        raise
    for action in plan.actions:
        action()


def _roll_back(undo: list[Callable[[], None]], err: BaseException) -> None:
    for rollback in reversed(undo):
        try:
            rollback()
        except Exception as rollback_error:
            note = f"safepoint: rolling back after the failed restore also failed: {rollback_error!r}"
            attach_note(err, note)


def _load_object(target: Any, state: Any, strict: bool) -> Callable[[], None]:
    if isinstance(target, _PickledTarget):
        previous = target.wrapper.value
        target.run()
        return lambda: setattr(target.wrapper, "value", previous)
    if isinstance(target, torch.nn.Module):
        target.load_state_dict(state, strict=strict)
        return lambda: None  # matched exactly beforehand; a backup would double the memory of the model
    backup = copy.deepcopy(target.state_dict())
    target.load_state_dict(state)
    return lambda: target.load_state_dict(backup)


def _check_applied(plan: _Plan, step: int) -> None:
    wrong: list[str] = []
    for key, live, saved in plan.checks:
        current = live.state_dict()  # once per object: the checks walk it
        for sub_path, tensor in _tensors_in(saved, []):
            where = f"{key}/{key_path(sub_path)}"
            node = current
            try:
                for part in sub_path:
                    node = node[part]
            except (KeyError, IndexError, TypeError):
                wrong.append(f"{where}: missing after load_state_dict")
                continue
            if not _bitwise_equal(node, tensor):
                wrong.append(f"{where}: differs from the checkpoint after load_state_dict")
    if wrong:
        raise RestoreError(
            f"restoring step {step} did not take effect: "
            + "; ".join(wrong[:10])
            + " (a load_state_dict that ignores data?); "
            "the restored objects were rolled back and nothing else was changed",
            mismatched=tuple(wrong),
        )


def _bitwise_equal(live: Any, saved: Any) -> bool:
    if not isinstance(live, torch.Tensor) or not isinstance(saved, torch.Tensor):
        return False
    if live.shape != saved.shape:
        return False
    if live.dtype != saved.dtype:  # an optimizer casts state to its parameter's dtype
        return bool(torch.equal(live.detach().cpu().to(saved.dtype), saved))
    live_cpu = live.detach().cpu().contiguous()
    if live_cpu.numel() == 0:
        return True
    return bool(torch.equal(_as_bits(live_cpu), _as_bits(saved.contiguous())))


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)
