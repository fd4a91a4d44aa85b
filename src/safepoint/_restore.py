"""Applying a verified checkpoint to live objects, totally or not at all, and the RestoreReport.

Order: the checkpoint is read and every byte verified (:mod:`safepoint._reader`); when the caller gives the code's
``state_version``, the plain loaded values are upgraded by the migration chain (:mod:`safepoint._migrations`),
so a failing migration has touched nothing live; the loaded values are then matched against the live state
(keys, types, shapes, dtypes) into a plan; only if the whole match is valid is anything applied, in two phases:

1. Objects' ``load_state_dict``, then a check that every tensor they were given is what their ``state_dict()``
   now returns, so an object that silently ignores data is caught instead of training on from its initial
   weights. Objects other than modules are backed up just before they are applied (cheap when resuming: a fresh
   optimizer has no state) and rolled back if a later object or the check fails: a torch optimizer (its own
   load_state_dict and state_dict, no hooks) keeps the tensors it held as its backup, since its load_state_dict
   replaces them and never writes into them; any other object is deep-copied. Modules are matched exactly (every
   key, shape and dtype) beforehand and not copied again: a backup would double the memory of the model (what was
   read into them in place is put back from the backups their read took instead).
2. Plain tensor copies and assignments into the live dicts, lists and tuples: nothing can fail any more.

The exception to "nothing live is touched before the apply": some live tensors are read into in place, each
behind a backup (:mod:`safepoint._backup`), so their copy is already done when the apply comes:

- plain tensors that restore only copies into, and a module's own parameters and buffers, which its
  load_state_dict copies into (:func:`copied_entries`, :func:`~safepoint._payload.direct_target`), while the files
  are read; the module then gets those same tensors, and its check compares a digest of the bytes read with what
  it holds after;
- the local shards of live DTensors (in plain containers, in a module's ``state_dict()``, which shares its
  parameters' memory, and in the state a torch optimizer holds already), while preparing, once the whole state
  matched; a module's load_state_dict then gets those same tensors, and its check compares a digest of the bytes
  read with what it holds after; an optimizer's takes those same tensors as they are, and its check is that it
  holds them.

One set of backups per restore holds them all; every failure until the apply completes (a file, the match,
another rank's verdict, phase 1) puts every one of them back before it propagates.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash
from torch.autograd.graph import increment_version

from ._backup import InPlace
from ._codec import REPLACED_WHOLE, Pickled, PickledPayload, decode_tree, is_stateful, key_path, pickle_allowed
from ._errors import ConfigError, CorruptCheckpointError, RestoreError, UnsafeCheckpointError, attach_note
from ._manifest import Manifest
from ._migrations import Migrations, upgrade_state
from ._payload import CopyTargets
from ._reader import LoadedCheckpoint
from ._sharded import ShardedSaved, is_dtensor, slice_like

__all__ = [
    "PreparedRestore",
    "Replace",
    "RestoreReport",
    "SkippedCheckpoint",
    "copied_entries",
    "copied_into",
    "load_values",
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
    """What a restore did. Every field is filled from the checkpoint actually applied.

    ``restored`` lists only what was applied, as the fewest key paths that cover it: a top-level entry when all
    of it was applied; otherwise the sub-paths that were (``model/0.weight``), and nothing of an entry of which
    nothing was applied. An entry whose checkpoint and live state are both empty counts as applied. An object
    other than a module (an optimizer, a scheduler) is applied whole by its own ``load_state_dict``, which gets
    the saved state_dict: it is listed once that ran, and the keys in which the saved state_dict differed from
    its ``state_dict()`` are still listed under ``missing``/``unexpected``.

    What was not applied is under ``missing`` (in the live state, not in the checkpoint: left as it was) or
    ``unexpected`` (in the checkpoint, not in the live state: not applied), each with a line in ``reasons``
    (which also names a recognised cause, such as torch.compile's ``_orig_mod.`` prefix). ``cast`` lists the
    tensors converted to the live dtype, only ever with ``cast_dtypes=True``. A :class:`Replace` entry is
    listed as restored: its contents were replaced whole.

    From :meth:`~safepoint.CheckpointManager.load`, which applies nothing, ``restored`` is every top-level
    entry of the values returned.
    """

    step: int
    path: str  # the checkpoint's own directory
    save_id: str
    restored: tuple[str, ...]  # key paths wholly applied (see above)
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
    reasons: Mapping[str, str] = field(default_factory=dict)  # missing or unexpected key path -> why
    cast: tuple[str, ...] = ()  # "model/0.weight: torch.float32 -> torch.bfloat16", with cast_dtypes=True


class Replace:
    """Restore a dict or list whose keys (or length) are data, such as a loss history, per-key counters or a
    data loader's state_dict, by replacing its contents wholesale.

    Saved as the wrapped value (``safepoint.load`` returns it plain). On restore the live container is kept
    (the same object) and its contents become exactly the saved ones, instead of being matched key by key, so
    keys the live one lacks are added and keys the checkpoint lacks are removed. Only the contents of this one
    container are replaced: the checkpoint's values are new objects, never applied into live tensors.

    >>> history: dict[str, list[float]] = {}
    >>> state = {"model": model, "history": safepoint.Replace(history)}   # doctest: +SKIP
    """

    def __init__(self, value: MutableMapping[Any, Any] | list[Any]) -> None:
        if not isinstance(value, (MutableMapping, list)):
            raise ConfigError(f"safepoint.Replace wraps a dict or a list, not {type(value).__name__}")
        self.value = value

    def __repr__(self) -> str:
        return f"Replace({self.value!r})"

    def state_dict(self) -> MutableMapping[Any, Any] | list[Any]:
        return self.value

    def load_state_dict(self, state: Any, /) -> None:
        """Make the wrapped container's contents exactly ``state`` (a mapping for a dict, a sequence for a list)."""
        if isinstance(self.value, MutableMapping):
            if not isinstance(state, Mapping):
                raise ConfigError(f"a Replace of a dict needs a mapping, not {type(state).__name__}")
            self.value.clear()
            self.value.update(state)
        else:
            if not isinstance(state, (list, tuple)):
                raise ConfigError(f"a Replace of a list needs a list, not {type(state).__name__}")
            self.value[:] = list(state)


Replace.__module__ = "safepoint"  # the class name a manifest records: the public one


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


# -- entries that are only copied ------------------------------------------------------------------------------
def copied_entries(tree: Mapping[str, Any], live_state: Any) -> CopyTargets:
    """The entries that restoring ``tree`` into ``live_state`` can only copy into a live tensor and drop, each with
    that tensor: each sits in the tree as a plain tensor node, below dicts, lists and tuples only, where the live
    state holds a plain ``torch.Tensor`` (or ``Parameter``) under plain containers of the same kinds. Matching
    either copies such an entry with ``copy_`` (see :func:`_match_tensor`) or refuses the whole restore; nothing
    else ever receives it, so its value need not own its memory (the reader may place many in one buffer, or read
    it straight into the tensor behind a backup). Anything else (objects, ``Replace``, ``Pickled``, tensor
    subclasses, views of shared storage, ``typed`` nodes) is left out: those values may be kept by what receives
    them, so they must be owned.

    Also a live module's parameters and buffers, each with the module's own tensor (``state_dict(keep_vars=True)``)
    as :attr:`~safepoint._payload.CopyTargets.given` entries: its load_state_dict copies into them, but it receives
    the values, so they are read straight into the tensor (where its copy finds them in place) or into memory of
    their own; its check compares a digest of the bytes read with what it holds afterwards."""
    found = CopyTargets()
    _collect_copied(tree, live_state, found)
    return found


def copied_into(live_state: Any, state_version: int | None) -> Callable[[Manifest], CopyTargets]:
    """:func:`copied_entries` of a manifest, none where a migration will run (it may keep any value)."""

    def copied(manifest: Manifest) -> CopyTargets:
        if state_version is not None and state_version != manifest.state_version:
            return CopyTargets()
        return copied_entries(manifest.tree, live_state)

    return copied


def _is_plain_container(live: Any) -> bool:
    return not isinstance(live, (Pickled, torch.Tensor, np.ndarray, Replace)) and not is_stateful(live)


def _collect_copied(node: Mapping[str, Any], live: Any, found: CopyTargets) -> None:
    kind = node["k"]
    if kind == "tensor":
        if type(live) in _PLAIN_TENSORS:  # a subclass's copy_ could keep its source
            found[node["e"]] = live
    elif kind == "object" and isinstance(live, torch.nn.Module):
        _collect_module(node["v"], live, found)
    elif kind == "dict":
        if isinstance(live, MutableMapping) and _is_plain_container(live):
            for key, child in node["v"]:
                if key in live:
                    _collect_copied(child, live[key], found)
    elif kind in ("list", "tuple") and isinstance(live, (list, tuple)) and _is_plain_container(live):
        if len(live) != len(node["v"]):
            return  # restore replaces the list's contents with the saved items, or refuses
        for item, child in zip(live, node["v"], strict=True):
            _collect_copied(child, item, found)


def _collect_module(node: Mapping[str, Any], module: torch.nn.Module, found: CopyTargets) -> None:
    """The module's own parameters and buffers (``keep_vars=True``: a plain ``state_dict()`` holds detached aliases,
    which share their storage, so none would be its storage's sole user) under the keys its saved state has."""
    if node["k"] == "typed":  # an OrderedDict
        node = node["v"]
    if node["k"] != "dict":
        return
    try:
        live = module.state_dict(keep_vars=True)
    except Exception:  # the match calls state_dict() again, and reports what it raises
        return
    for key, child in node["v"]:
        tensor = live.get(key)
        if child["k"] == "tensor" and isinstance(tensor, torch.Tensor) and type(tensor) in _PLAIN_TENSORS:
            found[child["e"]] = tensor
            found.given.add(child["e"])


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


# -- matching ---------------------------------------------------------------------------------------------------
Path = tuple[Any, ...]  # key path parts, as the tree has them (str or int)


@dataclass
class _Plan:
    strict: bool
    cast_dtypes: bool = False
    actions: list[Callable[[], None]] = field(default_factory=list)  # cannot fail once matched
    objects: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, live object, state_dict)
    checks: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, live object, its saved state_dict)
    applied: list[Path] = field(default_factory=list)  # what will be applied, or containers matched
    units: list[Path] = field(default_factory=list)  # objects applied whole by their own load_state_dict
    missing: list[Path] = field(default_factory=list)
    unexpected: list[Path] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    hints: dict[Path, str] = field(default_factory=dict)  # object path -> a recognised cause of its mismatch
    cast: list[str] = field(default_factory=list)
    castable: bool = False  # a mismatch that cast_dtypes=True would accept
    in_place: InPlace = field(default_factory=InPlace)  # live DTensors read into in place, behind backups
    # a module's state_dict() DTensors read into in place, and each one's local bytes' digest once read (its
    # post-apply check: the values given to load_state_dict are the live ones, so they cannot be compared)
    digested: list[Any] = field(default_factory=list)
    digests: dict[int, int] = field(default_factory=dict)  # id(DTensor) -> xxh3_64 of its local bytes
    # an optimizer's state tensors read into in place (see _replaces_state): its load_state_dict never writes into
    # what it is given, so its post-apply check needs only that it holds these very tensors (id -> tensor)
    held: dict[int, Any] = field(default_factory=dict)
    # ids of those optimizers, decided once when matched: their rollback is the tensors they held (_load_object)
    own_backup: set[int] = field(default_factory=set)


def _is_tensor(value: object) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes, np.generic, *REPLACED_WHOLE))


def _match(plan: _Plan, live: Any, saved: Any, path: list[str | int], assign: Callable[[Any], None] | None) -> None:
    saved = _fit(plan, live, saved, path, in_place=True)
    if isinstance(live, Pickled):
        _match_pickled(plan, live, saved, path)
    elif isinstance(live, torch.Tensor):
        _match_tensor(plan, live, saved, path)
    elif isinstance(live, np.ndarray):
        _match_array(plan, live, saved, path)
    elif isinstance(live, Replace):
        _match_replace(plan, live, saved, path)
    elif is_stateful(live):
        _match_object(plan, live, saved, path)
    elif isinstance(live, MutableMapping):
        _match_dict(plan, live, saved, path)
    elif isinstance(live, (list, tuple)):
        _match_sequence(plan, live, saved, path, assign)
    elif _is_scalar(live) and assign is not None:
        if isinstance(saved, PickledPayload):
            plan.mismatched.append(
                f"{key_path(path)}: the checkpoint holds a pickled value; restore into a safepoint.Pickled"
            )
        elif live is None or _is_scalar(saved):
            plan.actions.append(lambda: assign(saved))
            plan.applied.append(tuple(path))
        else:
            plan.mismatched.append(
                f"{key_path(path)}: live value is {type(live).__name__}, checkpoint has {type(saved).__name__}"
            )
    else:
        plan.mismatched.append(f"{key_path(path)}: cannot restore into a live {type(live).__name__}")


def _match_pickled(plan: _Plan, live: Pickled, saved: Any, path: list[str | int]) -> None:
    if isinstance(saved, PickledPayload):
        payload = saved  # the live Pickled wrapper is this entry's explicit opt-in

        def unpickle() -> None:
            live.value = payload.unpickle()

        plan.objects.append((key_path(path), _PickledTarget(live, unpickle), None))
    elif _is_tensor(saved) or isinstance(saved, (dict, list, tuple)) or _is_scalar(saved):
        plan.actions.append(lambda: setattr(live, "value", saved))
    else:  # pragma: no cover - decode_tree yields nothing else
        plan.mismatched.append(f"{key_path(path)}: unexpected value")
        return
    plan.applied.append(tuple(path))


class _PickledTarget:
    """Lets unpickling run in the fallible phase, where a failure rolls back what was applied before."""

    def __init__(self, wrapper: Pickled, run: Callable[[], None]) -> None:
        self.wrapper, self.run = wrapper, run


def _is_castable(live: torch.Tensor, saved: torch.Tensor) -> bool:
    return live.shape == saved.shape and live.dtype.is_floating_point and saved.dtype.is_floating_point


def _dtype_mismatch(plan: _Plan, live: torch.Tensor, saved: torch.Tensor, path: list[str | int]) -> bool:
    """Whether ``saved`` cannot go into ``live`` as it is: recorded as a mismatch, or, with cast_dtypes, as a
    cast to the live dtype (floating point to floating point only)."""
    if live.shape == saved.shape and live.dtype == saved.dtype:
        return False  # the usual case: no key path is built (it costs more than the rest of a match)
    if saved.device.type == "meta":  # a saved DTensor of another shape: _fit reported it, and read nothing
        return True
    key = key_path(path)
    if live.dtype != saved.dtype and _is_castable(live, saved):
        if plan.cast_dtypes:
            plan.cast.append(f"{key}: {saved.dtype} -> {live.dtype}")
            return False
        plan.castable = True
    plan.mismatched.append(
        f"{key}: live tensor is {live.dtype} {list(live.shape)}, checkpoint has {saved.dtype} {list(saved.shape)}"
    )
    return True


def _match_tensor(plan: _Plan, live: torch.Tensor, saved: Any, path: list[str | int]) -> None:
    if not isinstance(saved, torch.Tensor):
        plan.mismatched.append(f"{key_path(path)}: live value is a tensor, checkpoint has {type(saved).__name__}")
        return
    if _dtype_mismatch(plan, live, saved, path):
        return
    if saved is live:  # read straight into it behind a backup (read_leaves; a DTensor: _fit): the copy is done
        plan.actions.append(lambda: increment_version(live))  # as copy_ would: autograd sees the change
        plan.applied.append(tuple(path))
        return

    def copy_tensor() -> None:
        live.copy_(saved)  # casts, where cast_dtypes allowed it; under the no_grad of _apply's phase 2

    plan.actions.append(copy_tensor)
    plan.applied.append(tuple(path))


def _match_array(plan: _Plan, live: np.ndarray[Any, Any], saved: Any, path: list[str | int]) -> None:
    key = key_path(path)
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
    plan.applied.append(tuple(path))


def _holds_pickled(value: Any) -> bool:
    if isinstance(value, PickledPayload):
        return True
    if isinstance(value, Mapping):
        return any(_holds_pickled(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_pickled(v) for v in value)


def _match_replace(plan: _Plan, live: Replace, saved: Any, path: list[str | int]) -> None:
    key = key_path(path)
    wanted = "dict" if isinstance(live.value, MutableMapping) else "list"
    fits = isinstance(saved, Mapping) if wanted == "dict" else isinstance(saved, (list, tuple))
    if not fits:
        plan.mismatched.append(f"{key}: live value is a Replace of a {wanted}, checkpoint has {type(saved).__name__}")
        return
    if _holds_pickled(saved):
        plan.mismatched.append(f"{key}: the checkpoint holds pickled values here; read them with load(allow_pickle=)")
        return
    plan.actions.append(lambda: live.load_state_dict(saved))
    plan.applied.append(tuple(path))


def _match_object(plan: _Plan, live: Any, saved: Any, path: list[str | int]) -> None:
    key = key_path(path)
    if not isinstance(saved, Mapping):
        plan.mismatched.append(f"{key}: live {type(live).__name__} needs a state_dict, checkpoint has "
                               f"{type(saved).__name__}")  # fmt: skip
        return
    if _is_loader(live):
        state = dict(_fit_tree(plan, None, saved, path))
        # not observed before its load_state_dict: see _is_loader; its keys are its own load_state_dict's to judge
        plan.units.append(tuple(path))
        plan.objects.append((key, live, state))
        plan.checks.append((key, live, state))
        return
    current = live.state_dict()
    optimizer = isinstance(live, torch.optim.Optimizer)
    layouts = _with_parameters(live, current) if optimizer else current
    module = isinstance(live, torch.nn.Module)
    # an optimizer whose load_state_dict is torch's only replaces its state tensors, never writes into them: the
    # saved values of those it holds already can be read into them, behind the restore's backups (see _load_object)
    in_place = module or (optimizer and _replaces_state(live))
    state = dict(_fit_tree(plan, layouts, saved, path, in_place=in_place))
    if module:
        plan.digested += [v for k, v in state.items() if _read_in_place(v, current.get(k))]
        state = _match_module_state(plan, current, state, path)
    else:
        if in_place:
            plan.own_backup.add(id(live))
            plan.held.update((id(value), value) for value in _read_into_state(state, current))
        if isinstance(current, Mapping):
            _compare_keys(plan, current, saved, path)
            if optimizer:
                _match_param_groups(plan, current, saved, key)
        plan.units.append(tuple(path))
    plan.objects.append((key, live, state))
    plan.checks.append((key, live, state))


def _match_module_state(
    plan: _Plan, current: Mapping[str, Any], saved: dict[Any, Any], path: list[str | int]
) -> dict[Any, Any]:
    """Match a module's state_dict key by key; the state to give its load_state_dict (without strict, only the
    keys it has; with cast_dtypes, tensors cast to the live dtypes)."""
    _compare_keys(plan, current, saved, path)
    hint = _prefix_hint(current, saved, f"state[{path[0]!r}]" if len(path) == 1 else "the entry's dict")
    if hint:
        plan.hints[tuple(path)] = hint
    plan.applied.append(tuple(path))  # the module itself matched, whatever its keys
    state = {}
    for name, value in saved.items():
        if name not in current:
            continue  # unexpected: strict matching has refused it already, and without strict it is not given
        live_value = current[name]
        if isinstance(live_value, torch.Tensor) and isinstance(value, torch.Tensor):
            if _dtype_mismatch(plan, live_value, value, [*path, name]):
                continue
            if value.dtype != live_value.dtype:  # cast_dtypes: the post-apply check compares the cast values
                state[name] = value.to(live_value.dtype)
                plan.applied.append((*path, name))
                continue
        state[name] = value
        plan.applied.append((*path, name))
    return state


#: State-dict key prefixes that wrappers add, and what adds them.
_WRAPPER_PREFIXES = {
    "_orig_mod.": "torch.compile",
    "module.": "DistributedDataParallel / DataParallel",
}


def _prefix_hint(current: Mapping[Any, Any], saved: Mapping[Any, Any], entry: str) -> str:
    """Say how to fix a module whose keys differ only by a wrapper's prefix, on either side. ``entry`` names
    the module's saved dict in a migration."""
    live_only = [k for k in current if k not in saved and isinstance(k, str)]
    saved_only = [k for k in saved if k not in current and isinstance(k, str)]
    for prefix, wrapper in _WRAPPER_PREFIXES.items():
        if _differ_by(saved_only, live_only, prefix):
            return _checkpoint_has_prefix(prefix, wrapper, entry)
        if _differ_by(live_only, saved_only, prefix):
            return _live_has_prefix(prefix, wrapper)
    return ""


def _differ_by(extra: list[str], lacking: list[str], prefix: str) -> bool:
    """``extra`` keys all carry ``prefix`` somewhere in a leading run of wrapper prefixes, and without it they
    are keys of the other side."""
    if not extra or any(_strip_prefix(k, prefix) == k for k in extra):
        return False
    others = set(lacking)
    return any(_strip_prefix(k, prefix) in others for k in extra)


def _strip_prefix(name: str, prefix: str) -> str:
    """``name`` without ``prefix`` in its leading run of wrapper prefixes (``module._orig_mod.x`` -> ``module.x``)."""
    head = 0
    while True:
        if name.startswith(prefix, head):
            return name[:head] + name[head + len(prefix) :]
        for other in _WRAPPER_PREFIXES:
            if name.startswith(other, head):
                head += len(other)
                break
        else:
            return name


def _checkpoint_has_prefix(prefix: str, wrapper: str, entry: str) -> str:
    if prefix == "_orig_mod.":
        fix = (
            "restore into the compiled module (call torch.compile before restoring), or from now on save "
            "model._orig_mod, the module it wraps"
        )
    else:
        fix = "restore into the wrapped model (wrap it before restoring), or from now on save model.module"
    return (
        f"the checkpoint's keys start with {prefix!r} ({wrapper} added it when it was saved) and the live "
        f"module's do not: {fix}; to convert existing checkpoints, a safepoint.Migrations step can rename the "
        f"keys (e.g. {{k.removeprefix({prefix!r}): v for k, v in {entry}.items()}})"
    )


def _live_has_prefix(prefix: str, wrapper: str) -> str:
    inner = "model._orig_mod" if prefix == "_orig_mod." else "model.module"
    return (
        f"the live module's keys start with {prefix!r} (it is wrapped by {wrapper}) and the checkpoint's do not: "
        f"put the module it wraps, {inner}, in the state instead (it shares the wrapper's parameters)"
    )


def _compare_keys(plan: _Plan, current: Mapping[Any, Any], saved: Mapping[Any, Any], path: list[str | int]) -> None:
    plan.missing.extend((*path, k) for k in current if k not in saved)
    plan.unexpected.extend((*path, k) for k in saved if k not in current)


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
        return
    # torch's load_state_dict keeps a state key that names no saved parameter as it is, without a word: state keyed
    # by "0" (ids turned into strings, as some converters do) would be restored and never used
    ids = {i for g in saved_groups if isinstance(g, Mapping) for i in g.get("params", ())}
    saved_state = saved.get("state")
    strays = [k for k in saved_state if k not in ids] if isinstance(saved_state, Mapping) else []
    if strays:
        plan.mismatched.append(
            f"{key}/state: keys {strays[:5]!r} name no parameter of the checkpoint's param_groups "
            f"(ids {sorted(ids, key=repr)[:8]!r}); the optimizer would keep them unused (ids saved as strings? convert "
            "them back with int())"
        )


def _match_dict(plan: _Plan, live: MutableMapping[Any, Any], saved: Any, path: list[str | int]) -> None:
    key = key_path(path)
    if not isinstance(saved, Mapping):
        plan.mismatched.append(f"{key or 'state'}: live value is a dict, checkpoint has {type(saved).__name__}")
        return
    _compare_keys(plan, live, saved, path)
    plan.applied.append(tuple(path))
    for name in list(live):
        if name in saved:
            _match(plan, live[name], saved[name], [*path, name], _setter(live, name))


def _setter(container: Any, name: Any) -> Callable[[Any], None]:
    def assign(value: Any) -> None:
        container[name] = value

    return assign


def _holds_live_objects(value: Any) -> bool:
    if _is_tensor(value) or is_stateful(value) or isinstance(value, (Pickled, Replace, Mapping)):
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
            return
        if isinstance(live, list):
            plan.actions.append(lambda: live.__setitem__(slice(None), list(saved)))
        else:
            plan.actions.append(lambda: assign(_same_tuple_type(live, saved)))
        plan.applied.append(tuple(path))
        return
    plan.applied.append(tuple(path))
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
    if type(template) is torch.Size:
        return torch.Size(items)
    return tuple(items)


# -- the report ---------------------------------------------------------------------------------------------------
@dataclass
class _Node:
    children: dict[Any, _Node] = field(default_factory=dict)
    unit: bool = False  # applied whole by an object's load_state_dict
    has_applied: bool = False  # in this subtree
    has_bad: bool = False  # missing or unexpected in this subtree

    def walk(self, path: Path) -> Iterable[_Node]:
        node = self
        for part in path:
            node = node.children.setdefault(part, _Node())
            yield node


def _restored(plan: _Plan, top_level: Iterable[Any]) -> tuple[str, ...]:
    """The fewest key paths covering what is applied and nothing that is not (see RestoreReport)."""
    root = _Node()
    for name in top_level:  # the live state's order
        root.children[name] = _Node()
    for path in plan.applied:
        for node in root.walk(path):
            node.has_applied = True
    for path in plan.units:
        nodes = list(root.walk(path))
        for node in nodes:
            node.has_applied = True
        nodes[-1].unit = True
    for path in [*plan.missing, *plan.unexpected]:
        for node in root.walk(path):
            node.has_bad = True
    found: list[str] = []

    def cover(node: _Node, path: list[Any]) -> None:
        if not node.has_applied:
            return
        if node.unit or not node.has_bad:
            found.append(key_path(path))
            return
        for part, child in node.children.items():
            cover(child, [*path, part])

    for part, child in root.children.items():
        cover(child, [part])
    return tuple(found)


def _reasons(plan: _Plan) -> dict[str, str]:
    def hint(path: Path) -> str:
        for length in range(len(path) - 1, -1, -1):
            found = plan.hints.get(path[:length])
            if found:
                return f"; {found}"
        return ""

    reasons = {key_path(p): "in the live state, not in the checkpoint: left as it was" + hint(p) for p in plan.missing}
    for p in plan.unexpected:
        reasons[key_path(p)] = "in the checkpoint, not in the live state: not applied" + hint(p)
    return reasons


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


# -- sharded tensors ----------------------------------------------------------------------------------------------
def _fit(plan: _Plan, live: Any, saved: Any, path: list[str | int], *, in_place: bool) -> Any:
    """The saved value made to fit a live tensor's layout: a saved DTensor (:class:`ShardedSaved`) becomes a
    DTensor laid out as a live DTensor (only the parts this rank holds are read), or the full tensor for a live
    plain tensor; a plain saved tensor becomes a DTensor laid out as a live DTensor (this rank's parts of it).
    A shape that differs is a mismatch naming the key (nothing is read for it).

    ``in_place``: the live tensor is one the restore copies into (a plain container's), so a live DTensor's local
    shard may be read into directly (:meth:`ShardedSaved.like`); not for what an object's load_state_dict gets,
    whose "live" DTensor may only stand for a layout (:class:`_LaidOutAs`), and whose post-apply check needs the
    values it was given held apart from the live ones."""
    if isinstance(saved, ShardedSaved):
        if not isinstance(live, torch.Tensor) or tuple(live.shape) != saved.shape:
            if isinstance(live, torch.Tensor):
                plan.mismatched.append(
                    f"{key_path(path)}: live tensor is {live.dtype} {list(live.shape)}, checkpoint has "
                    f"{saved.dtype} {list(saved.shape)}"
                )
            return saved.placeholder()
        if not is_dtensor(live):
            return saved.full()
        return saved.like(live, plan.in_place if in_place else None)
    plain = isinstance(saved, torch.Tensor) and not is_dtensor(saved) and saved.device.type != "meta"
    if plain and is_dtensor(live) and tuple(saved.shape) == tuple(live.shape):
        return slice_like(live, saved)
    return saved


class _LaidOutAs(Mapping[Any, Any]):
    """The live state of a parameter an optimizer has no state for yet (a fresh optimizer, before its first step):
    each of its saved tensors is laid out as the parameter (Adam's moments have its shape and sharding)."""

    def __init__(self, parameter: torch.Tensor) -> None:
        self.parameter = parameter

    def __getitem__(self, name: Any) -> torch.Tensor:
        return self.parameter

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _with_parameters(optimizer: torch.optim.Optimizer, current: Any) -> Any:
    """An optimizer's state_dict where every parameter without state stands for its state's layout, so that a
    saved DTensor restores as a DTensor laid out as the parameter (not as a whole tensor) into a fresh optimizer."""
    if not isinstance(current, Mapping) or not isinstance(current.get("state"), Mapping):
        return current
    groups = current.get("param_groups")
    if not isinstance(groups, list):
        return current
    ids = [pid for group in groups for pid in group.get("params", ())]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if len(ids) != len(parameters):
        return current
    state = dict(current["state"])
    for pid, parameter in zip(ids, parameters, strict=True):
        state.setdefault(pid, _LaidOutAs(parameter))
    return {**current, "state": state}


def _fit_tree(plan: _Plan, current: Any, saved: Any, path: list[str | int], *, in_place: bool = False) -> Any:
    """:func:`_fit` over an object's saved state_dict, against its live ``state_dict()`` (None where there is no
    live counterpart: saved DTensors there become full tensors). Values without a DTensor are returned as they are."""
    if isinstance(saved, ShardedSaved) or (is_dtensor(current) and isinstance(saved, torch.Tensor)):
        if current is None:
            return saved.full() if isinstance(saved, ShardedSaved) else saved
        return _fit(plan, current, saved, path, in_place=in_place)
    if isinstance(saved, dict):
        live = current if isinstance(current, Mapping) else {}
        if isinstance(live, _LaidOutAs):  # only tensors of the parameter's shape take its layout
            shape = tuple(live.parameter.shape)
            live = {k: live.parameter for k, v in saved.items() if isinstance(v, torch.Tensor | ShardedSaved)
                    and tuple(v.shape) == shape}  # fmt: skip
            in_place = False  # the parameter only stands for a layout: its memory is never read into
        fitted = {k: _fit_tree(plan, live.get(k), v, [*path, k], in_place=in_place) for k, v in saved.items()}
        if all(fitted[k] is v for k, v in saved.items()):
            return saved  # nothing sharded below: the value as decoded (its exact dict type kept)
        if type(saved) is dict:
            return fitted
        rebuilt = copy.copy(saved)
        rebuilt.update(fitted)
        return rebuilt
    if isinstance(saved, (list, tuple)):
        live_items = current if isinstance(current, (list, tuple)) and len(current) == len(saved) else None
        items = [_fit_tree(plan, None if live_items is None else live_items[i], v, [*path, i], in_place=in_place)
                 for i, v in enumerate(saved)]  # fmt: skip
        return items if isinstance(saved, list) else _same_tuple_type(saved, items)
    return saved


# -- applying ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedRestore:
    """A checkpoint matched against the live state, nothing applied yet: every rank of a distributed restore
    prepares first, and applies only once all ranks have prepared."""

    plan: _Plan
    report: RestoreReport

    def apply(self) -> RestoreReport:
        """Apply the plan; the report, with the casts objects' own load_state_dict made (cast_dtypes=True). On a
        failure, the tensors read into in place are put back too (last); on success their backups are dropped."""
        with self.plan.in_place.backups.until_complete():
            _apply(self.plan, self.report.step)
        return dataclasses.replace(self.report, cast=tuple(self.plan.cast))

    def discard(self, error: BaseException | None = None) -> None:
        """Not applied after all (another rank found a corrupt file, or failed): put back the live tensors that
        were read into in place. A failure to do so is a note on ``error`` (the failure being handled), or a
        RestoreError without one."""
        self.plan.in_place.backups.roll_back(error)


def _saved_values(
    loaded: LoadedCheckpoint, path: str, state_version: int | None, migrations: Migrations | None
) -> tuple[Any, tuple[str, ...]]:
    saved = decode_tree(loaded.manifest.tree, loaded.leaves, loaded.sharded)
    if state_version is None:
        return saved, ()
    saved_version = loaded.manifest.state_version
    return upgrade_state(saved, migrations, saved_version=saved_version, state_version=state_version, where=path)


def _report(
    loaded: LoadedCheckpoint, path: str, skipped: tuple[SkippedCheckpoint, ...], migrations: tuple[str, ...]
) -> RestoreReport:
    manifest = loaded.manifest
    return RestoreReport(
        step=manifest.step,
        path=path,
        save_id=manifest.save_id,
        restored=(),
        skipped=skipped,
        metrics=dict(manifest.metrics),
        state_version=manifest.state_version,
        format_version=manifest.format_version,
        nbytes=manifest.nbytes,
        created=manifest.created,
        migrations=migrations,
    )


def prepare_checkpoint(
    loaded: LoadedCheckpoint,
    live_state: MutableMapping[str, Any],
    *,
    strict: bool,
    path: str,
    skipped: tuple[SkippedCheckpoint, ...] = (),
    state_version: int | None = None,
    migrations: Migrations | None = None,
    cast_dtypes: bool = False,
) -> PreparedRestore:
    """Match a verified (and, with ``state_version``, migrated) checkpoint against ``live_state``; RestoreError
    if it does not fit. ``.apply()`` applies it in place, totally or not at all; ``.discard()`` leaves the live
    state as it was. The local shards of live DTensors in plain containers are read into in place here, once the
    whole state matched, behind backups (:class:`~safepoint._backup.InPlace`): every byte verified, and on a
    failure here, in ``discard`` or in a failed ``apply`` every one of them is put back.

    With ``state_version`` (the code's), a checkpoint of another version is first upgraded by ``migrations``;
    a newer one, or one no chain reaches, raises StateVersionError, and a failing migration MigrationError.
    ``cast_dtypes`` lets a floating-point tensor of another floating-point dtype be cast to the live one.

    If the read wrote live tensors in place (``loaded.backups``), they are put back when this raises."""
    try:
        return _prepare(loaded, live_state, strict=strict, path=path, skipped=skipped, state_version=state_version,
                        migrations=migrations, cast_dtypes=cast_dtypes)  # fmt: skip
    except BaseException as err:
        if loaded.backups is not None:
            loaded.backups.roll_back(err)
        raise


def _prepare(
    loaded: LoadedCheckpoint,
    live_state: MutableMapping[str, Any],
    *,
    strict: bool,
    path: str,
    skipped: tuple[SkippedCheckpoint, ...],
    state_version: int | None,
    migrations: Migrations | None,
    cast_dtypes: bool,
) -> PreparedRestore:
    if not isinstance(live_state, MutableMapping):
        raise RestoreError(f"the live state must be a dict, not {type(live_state).__name__}")
    saved, applied = _saved_values(loaded, path, state_version, migrations)
    # one set of backups for everything this restore writes in place (the read's, and the DTensors' below)
    plan = _Plan(strict, cast_dtypes, in_place=InPlace(loaded.backups))
    # no autograd while matching, reading in place and digesting: DTensor.to_local() and views skip it (~6 us a
    # call, and a restore of a sharded state makes several per tensor)
    with torch.no_grad():
        _match(plan, live_state, saved, [], None)
        step = loaded.manifest.step
        if plan.mismatched or (strict and (plan.missing or plan.unexpected)):
            raise _restore_error(plan, step, path, strict)
        plan.in_place.run()  # on an error, the live tensors are put back before it propagates
        try:
            plan.digests.update((id(value), _local_digest(value)) for value in plan.digested)
            report = dataclasses.replace(
                _report(loaded, path, skipped, applied),
                restored=_restored(plan, live_state),
                missing=tuple(key_path(p) for p in plan.missing),
                unexpected=tuple(key_path(p) for p in plan.unexpected),
                reasons=_reasons(plan),
                cast=tuple(plan.cast),
            )
        except BaseException as err:
            plan.in_place.backups.roll_back(err)
            raise
    return PreparedRestore(plan, report)


def load_values(
    loaded: LoadedCheckpoint,
    *,
    path: str,
    skipped: tuple[SkippedCheckpoint, ...] = (),
    state_version: int | None = None,
    migrations: Migrations | None = None,
    allow_pickle: Iterable[str] | bool = False,
) -> tuple[dict[str, Any], RestoreReport]:
    """A verified checkpoint as plain values, migrated like a restore, and the report of what it holds.

    Pickled entries are migrated as unopened payloads, then unpickled only where ``allow_pickle`` says."""
    saved, applied = _saved_values(loaded, path, state_version, migrations)
    allow = allow_pickle if isinstance(allow_pickle, bool) else frozenset(allow_pickle)
    values = _unpickle(saved, allow)
    assert isinstance(values, dict)
    report = _report(loaded, path, skipped, applied)
    return values, dataclasses.replace(report, restored=tuple(key_path([k]) for k in values))


def _unpickle(value: Any, allow: frozenset[str] | bool) -> Any:
    if isinstance(value, PickledPayload):
        if not pickle_allowed(value.key, allow):
            raise UnsafeCheckpointError(
                f"entry {value.key!r} is pickled and loading it could run arbitrary code; pass "
                f"allow_pickle=[{value.key!r}] only if you trust where this checkpoint came from"
            )
        return value.unpickle()
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _unpickle(item, allow)
    elif isinstance(value, list):
        value[:] = [_unpickle(item, allow) for item in value]
    elif isinstance(value, tuple):
        return _same_tuple_type(value, [_unpickle(item, allow) for item in value])
    return value


def _restore_error(plan: _Plan, step: int, path: str, strict: bool) -> RestoreError:
    missing = [key_path(p) for p in plan.missing]
    unexpected = [key_path(p) for p in plan.unexpected]
    lines = [f"checkpoint step {step} at {path} does not fit the live state; nothing was changed"]
    lines += [f"  mismatched: {m}" for m in plan.mismatched[:20]]
    if strict:
        lines += [f"  missing from the checkpoint: {m}" for m in missing[:20]]
        lines += [f"  unexpected in the checkpoint: {u}" for u in unexpected[:20]]
        if missing or unexpected:
            lines.append("  (strict=False restores what matches and reports the rest)")
    lines += [f"  hint for {key_path(p)!r}: {hint}" for p, hint in plan.hints.items()]
    if plan.castable:
        lines.append(
            "  (floating-point tensors saved in another dtype: restore(..., cast_dtypes=True) casts them to the "
            "live dtypes and lists each cast in the report)"
        )
    return RestoreError(
        "\n".join(lines),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(plan.mismatched),
    )


def _apply(plan: _Plan, step: int) -> None:
    # Phase 1, which may fail: objects' load_state_dict (others first, each backed up; modules, matched exactly,
    # last), then the check that every tensor they were given took effect. A failure rolls phase 1 back.
    # Phase 2 cannot fail once matched: plain tensor copies and assignments into dicts, lists and tuples.
    # others (backed up) first, then data loaders (not observed beforehand, so not backed up), then modules
    order = sorted(plan.objects, key=lambda item: 2 if isinstance(item[1], torch.nn.Module) else _is_loader(item[1]))
    undo: list[Callable[[], None]] = []
    try:
        for key, target, state in order:
            try:
                undo.append(_load_object(target, state, plan.strict, own_backup=id(target) in plan.own_backup))
            except Exception as err:
                raise RestoreError(
                    f"restoring {key!r} from step {step} failed in its load_state_dict: {err!r}; "
                    "objects restored before it were rolled back and nothing else was changed"
                ) from err
        _check_applied(plan, step)
    except BaseException as err:
        _roll_back(undo, err)
        raise
    with torch.no_grad():  # once for all: entering it per tensor cost more than copying 10 000 small ones
        for action in plan.actions:
            action()


def _roll_back(undo: list[Callable[[], None]], err: BaseException) -> None:
    for rollback in reversed(undo):
        try:
            rollback()
        except Exception as rollback_error:
            note = f"safepoint: rolling back after the failed restore also failed: {rollback_error!r}"
            attach_note(err, note)


def _load_object(target: Any, state: Any, strict: bool, *, own_backup: bool) -> Callable[[], None]:
    """Apply ``state`` to ``target``; the undo. ``own_backup``: a torch optimizer (see :func:`_replaces_state`, decided
    when it was matched, and what it was read into in place relies on it), whose held tensors are its backup."""
    if isinstance(target, _PickledTarget):
        previous = target.wrapper.value
        target.run()
        return lambda: setattr(target.wrapper, "value", previous)
    if isinstance(target, torch.nn.Module):
        target.load_state_dict(state, strict=strict)
        return lambda: None  # matched exactly beforehand; a backup would double the memory of the model
    if _is_loader(target):
        target.load_state_dict(state)
        return _cannot_roll_back(target)
    if own_backup:
        # torch's load_state_dict puts new tensors in place of the old ones and never writes into them, so the old
        # ones themselves are the backup (those read into in place are put back by the restore's backups): no copy
        # of the optimizer's state, which on a GPU could be more memory than there is
        before = target.state_dict()
        target.load_state_dict(state)
        return lambda: target.load_state_dict(before)
    backup = copy.deepcopy(target.state_dict())
    target.load_state_dict(state)
    return lambda: target.load_state_dict(backup)


#: The hooks through which other code takes part in an optimizer's state_dict or load_state_dict.
_OPTIMIZER_HOOKS = (
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _replaces_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes and gives its state the way ``torch.optim.Optimizer`` does, with no hook
    changing that: ``load_state_dict`` then replaces its per-parameter state with the tensors given (cast to the
    parameter's dtype and device where they differ) and never writes into the tensors it held before, and
    ``state_dict()`` returns those tensors themselves."""
    kind = type(optimizer)
    return (
        kind.load_state_dict is torch.optim.Optimizer.load_state_dict
        and kind.state_dict is torch.optim.Optimizer.state_dict
        and not any(getattr(optimizer, hooks, None) for hooks in _OPTIMIZER_HOOKS)
    )


def _read_into_state(state: Mapping[str, Any], current: Any) -> list[Any]:
    """The values of an optimizer's fitted ``state`` that were read into its live state tensors in place (the values
    given to its load_state_dict are then the live ones)."""
    fitted, live = state.get("state"), current.get("state") if isinstance(current, Mapping) else None
    if not isinstance(fitted, Mapping) or not isinstance(live, Mapping):
        return []
    found = []
    for key, values in fitted.items():
        held = live.get(key)
        if isinstance(values, Mapping) and isinstance(held, Mapping):
            found += [value for name, value in values.items() if _read_in_place(value, held.get(name))]
    return found


def _is_loader(value: Any) -> bool:
    """A data loader's state_dict() is not an observation: on a loader with no iterator yet, torchdata's
    StatefulDataLoader starts one, which draws the workers' base seed from the loader's generator. Called before
    load_state_dict (to compare keys, or for a backup), it shifted that generator, and a resumed run's workers
    were seeded differently from the run that never stopped. So restore calls a loader's load_state_dict without
    looking at it first, after every object it can roll back and before the modules."""
    return isinstance(value, torch.utils.data.DataLoader)


def _cannot_roll_back(loader: Any) -> Callable[[], None]:
    def roll_back() -> None:
        raise RestoreError(
            f"the {type(loader).__name__} keeps the state it was given: its state_dict() is not read before a "
            "restore, so there is no backup to roll it back to; rebuild it before training on"
        )

    return roll_back


def _check_applied(plan: _Plan, step: int) -> None:
    wrong: list[str] = []
    for key, live, saved in plan.checks:
        try:
            current = live.state_dict()  # once per object: the checks walk it
        except Exception as err:
            raise RestoreError(
                f"restoring {key!r} from step {step}: its state_dict() failed after its load_state_dict, so what "
                f"it took cannot be checked: {err!r}; the restored objects were rolled back and nothing else "
                "was changed"
            ) from err
        for sub_path, tensor in _tensors_in(saved, []):
            where = f"{key}/{key_path(sub_path)}"
            node = current
            try:
                for part in sub_path:
                    node = node[part]
            except (KeyError, IndexError, TypeError):
                wrong.append(f"{where}: missing after load_state_dict")
                continue
            if node is tensor and plan.held.get(id(tensor)) is tensor:
                continue  # read in place, and held as it was given: its bytes are the bytes read and verified
            digest = plan.digests.get(id(tensor))
            if digest is not None and _same_layout(node, tensor) and _local_digest(node) == digest:
                continue  # read in place: what the module holds now still has the bytes read and verified
            if digest is None and _bitwise_equal(node, tensor):
                continue
            if _cast_on_load(node, tensor):
                if plan.cast_dtypes:
                    plan.cast.append(f"{where}: {tensor.dtype} -> {node.dtype} (by its load_state_dict)")
                    continue
                wrong.append(
                    f"{where}: its load_state_dict cast it from {tensor.dtype} to {node.dtype} "
                    "(cast_dtypes=True accepts that)"
                )
                continue
            wrong.append(f"{where}: differs from the checkpoint after load_state_dict")
    if wrong:
        raise RestoreError(
            f"restoring step {step} did not take effect: "
            + "; ".join(wrong[:10])
            + " (a load_state_dict that ignores data?); "
            "the restored objects were rolled back and nothing else was changed",
            mismatched=tuple(wrong),
        )


def _cast_on_load(live: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether an object's load_state_dict cast a floating-point tensor to another floating-point dtype (an
    optimizer casts its state to its parameters' dtype): the live value is exactly the saved one, cast."""
    if not _is_castable(live, saved) or live.dtype == saved.dtype:
        return False
    return _bitwise_equal(live, saved.to(live.dtype))


def _read_in_place(value: Any, live: Any) -> bool:
    """Whether a module's state value was read into the module's own memory: the live DTensor itself, or its plain
    parameter or buffer (which shares its memory with the ``state_dict()`` alias ``live``; a value the reader
    allocated never does)."""
    if is_dtensor(value) or is_dtensor(live):
        return live is value
    return (
        isinstance(value, torch.Tensor)
        and isinstance(live, torch.Tensor)
        and value.numel() > 0
        and value.device.type == live.device.type == "cpu"
        and value.data_ptr() == live.data_ptr()
        and _same_layout(live, value)
    )


def _same_layout(live: Any, saved: Any) -> bool:
    """Tensors of one shape and dtype, the live one contiguous: plain CPU tensors, or DTensors of one global shape
    and placements (their local tensors compared)."""
    if is_dtensor(live) and is_dtensor(saved):
        if live.placements != saved.placements or live.shape != saved.shape:
            return False
        live, saved = live.to_local(), saved.to_local()
    elif is_dtensor(live) or is_dtensor(saved) or not isinstance(live, torch.Tensor) or live.device.type != "cpu":
        return False
    return bool(live.shape == saved.shape and live.dtype == saved.dtype and live.is_contiguous())


def _local_digest(tensor: Any) -> int:
    """xxh3_64 of a (contiguous, CPU) tensor's bytes; of its local tensor's for a DTensor."""
    local = (tensor.to_local() if is_dtensor(tensor) else tensor).detach()
    if local.numel() == 0:
        return xxhash.xxh3_64_intdigest(b"")
    return xxhash.xxh3_64_intdigest(local.reshape(-1).view(torch.uint8).numpy().data)


def _same_shards(live: Any, saved: Any) -> bool:
    """DTensors: equal layouts, and this rank's parts bitwise equal (each rank compares its own: no collective)."""
    if not (is_dtensor(live) and is_dtensor(saved)) or live.placements != saved.placements:
        return False
    return bool(live.shape == saved.shape) and _bitwise_equal(live.to_local(), saved.to_local())


def _bitwise_equal(live: Any, saved: Any) -> bool:
    if is_dtensor(live) or is_dtensor(saved):
        return _same_shards(live, saved)
    if not isinstance(live, torch.Tensor) or not isinstance(saved, torch.Tensor):
        return False
    if live.shape != saved.shape:
        return False
    if live.dtype != saved.dtype:  # an optimizer casts state to its parameter's dtype
        return bool(torch.equal(live.detach().cpu().to(saved.dtype), saved))
    live_cpu = live.detach().cpu().contiguous()
    if live_cpu.numel() == 0:
        return True
    live_bits, saved_bits = _as_bits(live_cpu), _as_bits(saved.contiguous())
    for size, dtype in _WORDS:  # the same word size on both sides, the widest both views allow
        if all(bits.numel() % size == 0 and bits.storage_offset() % size == 0 for bits in (live_bits, saved_bits)):
            return bool(torch.equal(live_bits.view(dtype), saved_bits.view(dtype)))
    return bool(torch.equal(live_bits, saved_bits))


#: Integer dtypes the bits are compared as, widest first: torch.equal on int64 words ran 2.5x faster here than
#: on bytes (64 MiB: 0.027 s against 0.062 s), and integer equality is exact (no NaN or -0.0 rule).
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)
