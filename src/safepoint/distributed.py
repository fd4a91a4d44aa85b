"""Coordinating the ranks of a torch.distributed job: who decides, what every rank learns, and how long it waits.

A :class:`Coordinator` offers one operation, :meth:`~Coordinator.exchange`: every rank posts a small JSON value
(or the error its own work raised); rank 0 gathers the posts, runs a decision on them and broadcasts the
outcome; every rank returns the same value or raises the same error type with the same message. Saves and
restores are a few exchanges with per-rank work between them (:mod:`safepoint.collective`).

Two implementations:

- :class:`LocalCoordinator`, with no process group: the decision runs on the one post, nothing waits. Code and
  tests that never touch torch.distributed behave exactly as before.
- :class:`TorchCoordinator`, with a default process group: posts and outcomes travel through the process
  group's key-value store (the TCPStore of ``torchrun`` and ``env://``), not through collectives. That choice is
  deliberate: a store wait has its own timeout and, when it expires, every waiting rank can still ask the store
  which ranks never posted, and name them; the store survives the failure, so the group is still usable for the
  next save; a dead rank cannot leave a half-finished collective behind; and it works the same whatever the
  default backend is (nccl included), without creating a group. Nothing but small JSON records passes through
  the store, and every record of an exchange is removed once the next exchange has begun.

Errors cross ranks as (type name, message, a few attributes): a SafepointError subclass is rebuilt as the same
type; anything else becomes a :class:`~safepoint.errors.CoordinationError` naming the rank and the original type.
Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch.distributed as dist

from . import errors
from .errors import CoordinationError, SafepointError
from .validate import positive_seconds

__all__ = [
    "DEFAULT_TIMEOUT",
    "Coordinator",
    "LocalCoordinator",
    "PerRank",
    "Post",
    "TorchCoordinator",
    "check_timeout",
    "default_coordinator",
    "first_failure",
    "require_all",
]

#: Seconds a rank waits for the others at each exchange of a save or restore, unless the manager is told otherwise.
DEFAULT_TIMEOUT = 600.0

Json = Any  # a value json.dumps accepts


class PerRank:
    """Marks a top-level state entry as this rank's own: every rank saves and restores its own value (RNG state,
    data-loader position, rank-local shards). Unmarked entries are replicated: identical on every rank, written
    once. Restoring per-rank entries needs the world size they were saved with.

    >>> state = {"model": model, "rng": safepoint.PerRank(safepoint.RNGState())}   # doctest: +SKIP
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


@dataclass(frozen=True)
class Post:
    """What one rank contributes to an exchange: a JSON value, or the error its own work raised."""

    value: Json = None
    error: BaseException | None = None


Decide = Callable[[list[Post | None]], Json]  # runs on rank 0; None stands for a rank that never posted


class Coordinator(Protocol):
    rank: int
    world_size: int
    timeout: float

    def exchange(self, op: str, post: Post, decide: Decide) -> Json:
        """Post, let rank 0 decide on every rank's post, and return (or raise) the decision on every rank."""


def check_timeout(value: object) -> float:
    return positive_seconds("timeout", value)


def default_coordinator(timeout: float) -> Coordinator:
    """The coordinator for this process: torch.distributed's default group if one is initialised."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # _get_default_store is the store the group was built on (torchrun's TCPStore); there is no public getter
        store = dist.distributed_c10d._get_default_store()
        # every rank creates its managers in the same order, so the n-th manager of each rank shares a namespace
        namespace = f"safepoint/{next(_instances)}/"
        return TorchCoordinator(store, dist.get_rank(), dist.get_world_size(), namespace=namespace, timeout=timeout)
    return LocalCoordinator(timeout)


def require_all(op: str, posts: Sequence[Post | None], timeout: float) -> list[Post]:
    """The posts, or a CoordinationError naming every rank that did not post in time."""
    missing = [rank for rank, post in enumerate(posts) if post is None]
    if missing:
        raise CoordinationError(
            f"{_ranks(missing)} did not join {op} within {timeout:g} s (crashed, stopped, or not calling it)"
            + _consequence(op),
            ranks=tuple(missing),
        )
    return [post for post in posts if post is not None]


def first_failure(posts: Sequence[Post]) -> None:
    """Raise the error of the lowest failing rank, as every rank will see it; None if no rank failed."""
    failed = [(rank, post.error) for rank, post in enumerate(posts) if post.error is not None]
    if not failed:
        return
    rank, error = failed[0]
    if len(posts) == 1:
        raise error
    others = f" (ranks {', '.join(str(r) for r, _ in failed)} failed; the first is shown)" if len(failed) > 1 else ""
    raise rebuild(describe(error, prefix=f"rank {rank}: ", suffix=others), rank=rank) from error


# -- errors across ranks -----------------------------------------------------------------------------------------
_ATTRIBUTES = ("errno", "path", "step", "verified", "key", "missing", "unexpected", "mismatched", "ranks")


def describe(error: BaseException, *, prefix: str = "", suffix: str = "") -> dict[str, Json]:
    """An error as JSON: its type name, message and the attributes our error types carry."""
    message = str(error.args[0]) if isinstance(error, SafepointError) and error.args else str(error)
    if not isinstance(error, SafepointError):
        message = f"{type(error).__name__}: {error}"
    attrs = {name: _jsonable(getattr(error, name)) for name in _ATTRIBUTES if hasattr(error, name)}
    name = type(error).__name__ if isinstance(error, SafepointError) else ""
    return {"type": name, "message": f"{prefix}{message}{suffix}", "attrs": attrs}


def _jsonable(value: Any) -> Json:
    return list(value) if isinstance(value, tuple) else value


def rebuild(described: dict[str, Json], *, rank: int) -> SafepointError:
    """The error ``describe`` described, as the same SafepointError subclass; anything else as CoordinationError."""
    cls = getattr(errors, str(described.get("type")), None)
    message = str(described.get("message", "unknown error"))
    attrs = described.get("attrs") or {}
    if not (isinstance(cls, type) and issubclass(cls, SafepointError)):
        return CoordinationError(message, ranks=(rank,))
    accepted = {
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items() if k in accepted}
    try:
        return cls(message, **kwargs)
    except TypeError:  # pragma: no cover - every error type in errors.py takes its own attributes
        return CoordinationError(message, ranks=(rank,))


def _consequence(op: str) -> str:
    return "; nothing was committed" if op.startswith("save.") else ""


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


# -- the single-process coordinator ------------------------------------------------------------------------------
class LocalCoordinator:
    """One process, no process group: the decision runs on the one post, and nothing ever waits."""

    rank = 0
    world_size = 1

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout

    def exchange(self, op: str, post: Post, decide: Decide) -> Json:
        return decide([post])


# -- the torch.distributed coordinator ---------------------------------------------------------------------------
_instances = itertools.count()


class TorchCoordinator:
    """Exchanges through the default process group's store; see the module docstring for why not collectives.

    Every rank must create its coordinators (its managers) in the same order, and call the same operations in
    the same order, as with any collective: exchanges are numbered, and the numbers must meet.
    """

    def __init__(
        self,
        store: dist.distributed_c10d.Store,
        rank: int,
        world_size: int,
        *,
        namespace: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self.rank = rank
        self.world_size = world_size
        self._store = dist.distributed_c10d.PrefixStore(namespace, store)
        self._serial = 0

    def exchange(self, op: str, post: Post, decide: Decide) -> Json:
        self._serial += 1
        serial = self._serial
        record: dict[str, Json] = {"op": op}
        if self.rank != 0:  # rank 0 decides on its own post in memory; its record only says it has arrived
            record.update(value=post.value, error=None if post.error is None else describe(post.error))
        with self._store_errors(op):
            self._store.set(f"{serial}/{self.rank}", json.dumps(record))
        if self.rank == 0:
            return self._lead(serial, op, post, decide)
        return self._follow(serial, op, post)

    def _lead(self, serial: int, op: str, own: Post, decide: Decide) -> Json:
        posts: list[Post | None] = [own]
        with self._store_errors(op):
            present = self._wait_for([f"{serial}/{r}" for r in range(1, self.world_size)], self.timeout)
            for rank in range(1, self.world_size):
                posts.append(self._read_post(serial, rank, op) if present[rank - 1] else None)
        try:
            value = decide(posts)
        except BaseException as error:
            self._publish(serial, op, {"error": describe(error)})
            raise
        self._publish(serial, op, {"value": value})
        return value

    def _publish(self, serial: int, op: str, outcome: dict[str, Json]) -> None:
        with self._store_errors(op):
            self._store.set(f"{serial}/outcome", json.dumps(outcome))
            if serial > 1:  # every rank posted to this exchange, so every rank has read the previous outcome
                for rank in range(self.world_size):
                    self._store.delete_key(f"{serial - 1}/{rank}")
                self._store.delete_key(f"{serial - 1}/outcome")

    def _read_post(self, serial: int, rank: int, op: str) -> Post:
        record = json.loads(self._store.get(f"{serial}/{rank}"))
        if record["op"] != op:
            error = CoordinationError(
                f"rank {rank} is in {record['op']} while rank 0 is in {op}: every rank must make the same "
                "safepoint calls in the same order",
                ranks=(rank,),
            )
            return Post(error=error)
        described = record["error"]
        return Post(record["value"], None if described is None else rebuild(described, rank=rank))

    def _follow(self, serial: int, op: str, own: Post) -> Json:
        with self._store_errors(op):
            if not self._wait_for([f"{serial}/0"], self.timeout)[0]:
                raise CoordinationError(
                    f"rank 0 (the coordinator) did not join {op} within {self.timeout:g} s" + _consequence(op),
                    ranks=(0,),
                )
            # rank 0 waits up to the timeout for the others, then decides (writing a manifest at most)
            if not self._wait_for([f"{serial}/outcome"], 2 * self.timeout)[0]:
                keys = [f"{serial}/{r}" for r in range(self.world_size)]
                missing = [r for r, key in enumerate(keys) if not self._store.check([key])]
                raise CoordinationError(
                    f"rank 0 did not announce the outcome of {op} within {2 * self.timeout:g} s"
                    + (f"; {_ranks(missing)} never joined" if missing else "")
                    + "; this rank cannot know how the operation ended: a new run's restore() finds what was committed",
                    ranks=tuple(missing) or (0,),
                )
            outcome = json.loads(self._store.get(f"{serial}/outcome"))
        if "error" in outcome:
            error = rebuild(outcome["error"], rank=0)
            if own.error is not None:
                raise error from own.error
            raise error
        return outcome["value"]

    def _wait_for(self, keys: list[str], timeout: float) -> list[bool]:
        """Which of ``keys`` were set within ``timeout`` seconds."""
        if not keys:
            return []
        with contextlib.suppress(dist.DistStoreError):  # a timeout: the check below says which keys are missing
            self._store.wait(keys, timedelta(seconds=timeout))
        return [self._store.check([key]) for key in keys]

    @contextlib.contextmanager
    def _store_errors(self, op: str) -> Iterator[None]:
        try:
            yield
        except SafepointError:
            raise
        except (RuntimeError, OSError, ValueError) as err:  # DistError, DistNetworkError, a torn record
            raise CoordinationError(
                f"lost contact with the other ranks during {op} ({type(err).__name__}: {err}); the store of the "
                "process group (hosted by rank 0, or by torchrun's agent) is gone or unreadable, so this rank "
                "cannot know how the operation ended: a new run's restore() finds what was committed",
                ranks=(0,),
            ) from err
