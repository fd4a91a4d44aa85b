"""Versioned user-state migrations: an ordered chain of version-to-version steps on plain dicts.

A checkpoint records the ``state_version`` of the code that saved it. When newer code restores it, the chain of
:class:`Migrations` registered from that version up to the code's version runs on the *plain loaded data*
(tensors as tensors, objects' state_dicts as dicts, :class:`~safepoint.Pickled` entries as unopened payloads),
before anything is matched against or applied to live objects: a migration that fails leaves the live state as
it was. The same chain upgrades any versioned dict, such as a config file (:meth:`Migrations.upgrade`).

The chain is checked before any data is touched: two migrations from one version fail at registration; a gap,
or a migration beyond the code's ``state_version``, fails when the chain is first used (the manager's
constructor, :meth:`Migrations.upgrade`). A state newer than the code is refused, never applied.

The key-path helpers (:func:`rename_key`, :func:`move_key`, :func:`remove_key`, :func:`set_default`) each
declare what happens when the key is absent, so the OneTrainer bug (``config.pop(key)`` on a file that never had
the key) cannot be written with them. A missing *intermediate* path is a :class:`~safepoint.KeyPathError`
naming the full path, never a bare ``KeyError``.

This module never reads or writes checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

from ._codec import key_path
from ._errors import ConfigError, KeyPathError, MigrationError, StateVersionError
from ._validate import non_negative_int

__all__ = [
    "Migration",
    "Migrations",
    "check_migrations",
    "check_state_version",
    "copy_containers",
    "move_key",
    "remove_key",
    "rename_key",
    "resolve_key",
    "set_default",
    "upgrade_state",
]

#: A migration takes the state at version N and returns it at version N + 1 (it may modify its argument).
Migration = Callable[[dict[str, Any]], dict[str, Any]]
M = TypeVar("M", bound=Callable[..., Any])
KeyPath = str | Sequence[str | int]


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)


class Migrations:
    """An ordered chain of user-state migrations, one per version step.

    >>> migrations = Migrations()
    >>> @migrations.register(from_version=1)
    ... def add_gradient_checkpointing(state):
    ...     set_default(state, "config/gradient_checkpointing", False)
    ...     return state
    >>> migrations.upgrade({"config": {}}, from_version=1)
    {'config': {'gradient_checkpointing': False}}
    """

    def __init__(self) -> None:
        self._steps: dict[int, Migration] = {}

    def __repr__(self) -> str:
        steps = ", ".join(f"{v}->{v + 1} {_name(f)}" for v, f in sorted(self._steps.items()))
        return f"Migrations({steps})"

    def register(self, *, from_version: int) -> Callable[[M], M]:
        """Decorate a function that upgrades a state of ``from_version`` to ``from_version + 1``.

        Two migrations from the same version are a ConfigError here, at import time of the module defining them.
        """
        version = non_negative_int("from_version", from_version)

        def decorator(function: M) -> M:
            if not callable(function):
                raise ConfigError(f"a migration must be a function, not {type(function).__name__}")
            existing = self._steps.get(version)
            if existing is not None:
                raise ConfigError(
                    f"two migrations from version {version}: {_name(existing)} and {_name(function)}; "
                    "each version step has exactly one"
                )
            self._steps[version] = function
            return function

        return decorator

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions migrations are registered from, ascending."""
        return tuple(sorted(self._steps))

    @property
    def latest(self) -> int | None:
        """The version the whole chain upgrades to, or None when nothing is registered."""
        return max(self._steps) + 1 if self._steps else None

    def check(self, state_version: int | None = None) -> None:
        """Raise ConfigError if the chain has a gap, or (given the code's ``state_version``) reaches beyond it
        or stops short of it. Called by the manager's constructor, before any checkpoint is touched."""
        versions = self.versions
        if not versions:
            return
        gaps = sorted(set(range(versions[0], versions[-1] + 1)) - set(versions))
        if gaps:
            raise ConfigError(
                f"the migration chain has a gap: migrations are registered from versions "
                f"{', '.join(map(str, versions))}, none from {', '.join(map(str, gaps))}"
            )
        if state_version is None:
            return
        if versions[-1] >= state_version:
            newest = self._steps[versions[-1]]
            raise ConfigError(
                f"migration {_name(newest)} upgrades version {versions[-1]} to {versions[-1] + 1}, but the code's "
                f"state_version is {state_version}: raise state_version to {versions[-1] + 1}"
            )
        if versions[-1] != state_version - 1:
            raise ConfigError(
                f"the migration chain ends at version {versions[-1] + 1}, but the code's state_version is "
                f"{state_version}: register a migration from each version up to {state_version - 1}"
            )

    def upgrade(self, state: Mapping[str, Any], *, from_version: int, to_version: int | None = None) -> dict[str, Any]:
        """Run the chain on any versioned dict (a config, a loaded checkpoint) and return the upgraded copy.

        ``to_version`` defaults to the end of the chain. Dicts, lists and tuples are copied first, so ``state``
        is left as it was, even when a migration fails; tensors and arrays are shared, not copied.
        """
        start = non_negative_int("from_version", from_version)
        self.check()
        target = non_negative_int("to_version", to_version) if to_version is not None else (self.latest or start)
        if not isinstance(state, Mapping):
            raise ConfigError(f"upgrade() takes a dict, not {type(state).__name__}")
        upgraded, _ = self.run(copy_containers(state), start, target)
        return upgraded

    def run(
        self, state: dict[str, Any], from_version: int, to_version: int, where: str = ""
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Upgrade ``state`` in place from one version to another; returns it and the migrations applied.

        StateVersionError if ``state`` is newer than ``to_version`` or the chain does not reach from one to the
        other (checked before any migration runs); MigrationError, chained to the cause, if a migration fails.
        """
        origin = f" ({where})" if where else ""
        if from_version > to_version:
            raise StateVersionError(
                f"the state{origin} has state_version {from_version}, newer than this code's {to_version}; "
                "it was written by newer code: upgrade the code, never the other way round",
                saved_version=from_version,
                expected_version=to_version,
                path=where,
            )
        missing = [v for v in range(from_version, to_version) if v not in self._steps]
        if missing:
            raise StateVersionError(
                f"the state{origin} has state_version {from_version} and this code expects {to_version}, but no "
                f"migration is registered from version {', '.join(map(str, missing))}"
                + ("" if self._steps else " (no migrations were given: pass migrations=...)"),
                saved_version=from_version,
                expected_version=to_version,
                path=where,
            )
        applied: list[str] = []
        for version in range(from_version, to_version):
            function = self._steps[version]
            state = _run_one(function, state, version, origin)
            applied.append(f"{_name(function)} ({version} -> {version + 1})")
        return state, tuple(applied)


def _run_one(function: Migration, state: dict[str, Any], version: int, origin: str) -> dict[str, Any]:
    name = _name(function)
    try:
        result = function(state)
    except Exception as err:
        raise MigrationError(
            f"migration {name} (from version {version} to {version + 1}) failed on the state{origin}: {err!r}; "
            "nothing was applied to the live state",
            function=name,
            from_version=version,
        ) from err
    if not isinstance(result, dict):
        hint = " (did it forget `return state`?)" if result is None else ""
        raise MigrationError(
            f"migration {name} (from version {version} to {version + 1}) returned {type(result).__name__}, "
            f"not a dict{hint}",
            function=name,
            from_version=version,
        )
    return result


def upgrade_state(
    state: dict[str, Any], migrations: Migrations | None, *, saved_version: int, state_version: int, where: str
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What restore does with a checkpoint's plain data: nothing when the versions agree, else the chain."""
    if saved_version == state_version:
        return state, ()
    return (migrations or Migrations()).run(state, saved_version, state_version, where)


def copy_containers(value: Any) -> Any:
    """A copy of every dict, list and tuple in ``value``; tensors, arrays and other leaves are shared."""
    if isinstance(value, Mapping):
        return {k: copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_containers(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(copy_containers(v) for v in value)
    return value


# -- key-path helpers -----------------------------------------------------------------------------------------
def _parts(path: KeyPath) -> list[str | int]:
    if isinstance(path, str):
        parts: list[str | int] = list(path.split("/"))
    elif isinstance(path, Sequence) and all(isinstance(p, (str, int)) for p in path):
        parts = list(path)
    else:
        raise ConfigError(f"a key path is a '/'-separated str or a sequence of keys, not {path!r}")
    if not parts or any(p == "" for p in parts):
        raise ConfigError(f"key path {path!r} has an empty part")
    return parts


def _is_index(part: str | int) -> bool:
    return isinstance(part, str) and part.isascii() and part.isdigit()  # "²".isdigit(), but int("²") fails


def resolve_key(container: Any, part: str | int) -> tuple[bool, Any]:
    """(found, the actual key): "0" finds the int key 0 of an optimizer's state, as key paths print it."""
    if isinstance(container, Mapping):
        if part in container:
            return True, part
        if _is_index(part) and int(part) in container:
            return True, int(part)
        if isinstance(part, int) and str(part) in container:
            return True, str(part)
        return False, part
    if isinstance(container, (list, tuple)):
        index = int(part) if _is_index(part) else part
        if isinstance(index, int) and 0 <= index < len(container):
            return True, index
    return False, part


def _parent(state: Any, path: KeyPath) -> tuple[MutableMapping[Any, Any], str | int, str]:
    """The dict holding the last part of ``path``, the last part, and the full path for messages."""
    parts = _parts(path)
    full = key_path(parts)
    node = state
    for depth, part in enumerate(parts[:-1]):
        found, key = resolve_key(node, part)
        if not found:
            where = key_path(parts[: depth + 1])
            container = isinstance(node, (Mapping, list, tuple))
            what = "is missing" if container else f"cannot be looked up in a value of type {_kind(node)}"
            raise KeyPathError(f"key path {full!r}: {where!r} {what}", key=full)
        node = node[key]
    if not isinstance(node, MutableMapping):
        raise KeyPathError(
            f"key path {full!r}: {key_path(parts[:-1]) or 'the state'!r} is of type {_kind(node)}, not a dict", key=full
        )
    return node, parts[-1], full


def _kind(value: Any) -> str:
    return type(value).__name__


def set_default(state: dict[str, Any], path: KeyPath, default: Any) -> dict[str, Any]:
    """Set ``path`` to ``default`` unless it is there already. Returns ``state``."""
    parent, last, _ = _parent(state, path)
    found, _key = resolve_key(parent, last)
    if not found:
        parent[last] = default
    return state


def remove_key(state: dict[str, Any], path: KeyPath, default: Any = None) -> Any:
    """Remove ``path`` and return its value, or return ``default`` if it is not there (never a KeyError)."""
    parent, last, _ = _parent(state, path)
    found, key = resolve_key(parent, last)
    return parent.pop(key) if found else default


def move_key(state: dict[str, Any], source: KeyPath, target: KeyPath, *, default: Any) -> dict[str, Any]:
    """Move the value at ``source`` to ``target``; when ``source`` is absent, ``target`` gets ``default``.

    A ``target`` that already exists is a KeyPathError: a move never overwrites. Returns ``state``.
    """
    target_parent, target_last, target_full = _parent(state, target)
    source_parent, source_last, _ = _parent(state, source)
    if resolve_key(target_parent, target_last)[0]:
        raise KeyPathError(f"key path {target_full!r} exists already; a move never overwrites it", key=target_full)
    found, key = resolve_key(source_parent, source_last)
    target_parent[target_last] = source_parent.pop(key) if found else default
    return state


def rename_key(state: dict[str, Any], path: KeyPath, new_name: str | int, *, default: Any) -> dict[str, Any]:
    """Rename the last part of ``path`` to ``new_name`` in the same dict; absent, ``new_name`` gets ``default``."""
    parts = _parts(path)
    return move_key(state, parts, [*parts[:-1], new_name], default=default)


def check_state_version(value: object) -> int:
    return non_negative_int("state_version", value)


def check_migrations(migrations: object, state_version: int) -> Migrations | None:
    """The chain must be whole and end at ``state_version`` before any checkpoint is read."""
    if migrations is None:
        return None
    if not isinstance(migrations, Migrations):
        raise ConfigError(f"migrations must be a safepoint.Migrations, not {type(migrations).__name__}")
    migrations.check(state_version)
    return migrations
