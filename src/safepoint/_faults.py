"""Named fault points at every persistence step, for crash and fault-injection tests.

The code calls ``faults.point("commit.publish.before")`` at each step that changes what is on disk. Unless a test
has armed that name, the call is one dictionary truthiness check. Nothing here is patched into private names:
tests arm points through :func:`armed`, and subprocess tests through the ``SAFEPOINT_FAULTS`` environment
variable, read once at import::

    SAFEPOINT_FAULTS="commit.publish.before=kill"          # SIGKILL this process at that point
    SAFEPOINT_FAULTS="data.write.after@3=eio"              # raise EIO the 3rd time the point is reached

Actions: ``kill`` (SIGKILL self, like a crash), ``exit`` (``os._exit(137)``), ``eio``, ``enospc`` (raise the
matching ``OSError`` as the operating system would).

This module must never be needed in production: every point is a no-op unless armed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping

__all__ = ["POINTS", "FaultSpec", "armed", "point"]

#: Every fault point the package reaches, in the order a save reaches them. Tests sweep this list.
POINTS: tuple[str, ...] = (
    "save.begin",
    "staging.mkdir.after",
    "data.write.before",
    "data.write.after",
    "data.fsync.before",
    "data.fsync.after",
    "staging.fsync.after",
    "manifest.write.before",
    "manifest.fsync.after",
    "commit.publish.before",
    "commit.publish.after",
    "commit.dirsync.after",
    "commit.cleanup.after",
    "retention.unpublish.after",
    "retention.delete.after",
    "gc.delete.before",
    "gc.delete.after",
)

Action = Callable[[str], None]


class FaultSpec:
    """What to do at one point: ``action`` on the ``nth`` time it is reached (1-based; 0 means every time)."""

    def __init__(self, action: str | Action, nth: int = 1) -> None:
        self.action: Action = _ACTIONS[action] if isinstance(action, str) else action
        self.nth = nth
        self.hits = 0


def _kill(name: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _exit(name: str) -> None:
    os._exit(137)


def _raiser(code: int) -> Action:
    def raise_error(name: str) -> None:
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")

    return raise_error


_ACTIONS: dict[str, Action] = {
    "kill": _kill,
    "exit": _exit,
    "eio": _raiser(errno.EIO),
    "enospc": _raiser(errno.ENOSPC),
}

_armed: dict[str, FaultSpec] = {}
_lock = threading.Lock()


def point(name: str) -> None:
    """Mark a persistence step. A no-op unless a test armed ``name``."""
    if not _armed:
        return
    spec = _armed.get(name)
    if spec is None:
        return
    with _lock:
        spec.hits += 1
        fire = spec.nth in (0, spec.hits)
    if fire:
        spec.action(name)


@contextlib.contextmanager
def armed(specs: Mapping[str, FaultSpec | str]) -> Iterator[dict[str, FaultSpec]]:
    """Arm fault points for the duration of a ``with`` block; yields the specs so tests can read ``hits``."""
    unknown = sorted(set(specs) - set(POINTS))
    if unknown:
        raise ValueError(f"unknown fault points: {unknown}")
    resolved = {name: spec if isinstance(spec, FaultSpec) else FaultSpec(spec) for name, spec in specs.items()}
    previous = dict(_armed)
    _armed.update(resolved)
    try:
        yield resolved
    finally:
        _armed.clear()
        _armed.update(previous)


def _parse_environment(text: str) -> dict[str, FaultSpec]:
    specs: dict[str, FaultSpec] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, _, action = item.partition("=")
        name, _, nth = target.partition("@")
        if name not in POINTS or action not in _ACTIONS:
            raise ValueError(f"SAFEPOINT_FAULTS: cannot parse {item!r}")
        specs[name] = FaultSpec(action, int(nth) if nth else 1)
    return specs


_armed.update(_parse_environment(os.environ.get("SAFEPOINT_FAULTS", "")))
