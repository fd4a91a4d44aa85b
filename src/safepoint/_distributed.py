"""Coordinating the ranks of a torch.distributed job: who decides, what every rank learns, and how long it waits.

A save or a restore is an :class:`Operation` (``coordinator.operation(kind)``, taken on the caller's thread in
program order, so the n-th operation of every rank is the same one). Its only verb is
:meth:`~Operation.exchange`: every rank posts a typed message (:mod:`safepoint._messages`) or the error its own work
raised; rank 0 gathers the posts, runs a decision on them and broadcasts the outcome; every rank returns the same
message or raises the same error type with the same message. An exchange is keyed by its operation's number and
its place within the operation, never by a global count: the exchanges of a background save, made on its own
thread, cannot meet those of the next save or restore made meanwhile on the caller's thread.

Two implementations:

- :class:`LocalCoordinator`, with no process group: the decision runs on the one post, nothing waits. Code and
  tests that never touch torch.distributed behave exactly as before.
- :class:`TorchCoordinator`, with a default process group: posts and outcomes travel through the process
  group's key-value store (the TCPStore of ``torchrun`` and ``env://``), not through collectives. That choice is
  deliberate: a store wait has its own timeout and, when it expires, every waiting rank can still ask the store
  which ranks never posted, and name them; the store survives the failure, so the group is still usable for the
  next save; a dead rank cannot leave a half-finished collective behind; and it works the same whatever the
  default backend is (nccl included), without creating a group. Nothing but small JSON records passes through
  the store. Every thread waits in the store's own blocking ``wait``, on a client of its own
  (``Store.clone``), so a rank learns of a post or an outcome as soon as it is set, and a background save's
  wait holds up no call of the caller's thread (a thread that cannot have a clone shares one client, one call at
  a time, and looks again every few milliseconds). The main thread has a waiter thread block for it and waits in Python,
  where Ctrl-C reaches it at once; the two share one client, never using it at the same time. A thread's client
  serves every manager of the process (each prefixes its own keys), so a rank holds one connection to the store
  per thread that takes part, however many managers it has. Rank 0 returns from an exchange only once every rank
  that posted has said it read the outcome (then removes the records): rank 0 usually hosts the store, and a
  rank 0 that exits right after its last save would otherwise take the outcome away from ranks that have not
  looked yet.

Errors cross ranks as (type name, message, a few attributes): a SafepointError subclass is rebuilt as the same
type; anything else becomes a :class:`~safepoint._errors.CoordinationError` naming the rank and the original type.
Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch.distributed as dist
from torch.distributed.distributed_c10d import Store

from . import _errors as errors
from ._errors import ConfigError, CoordinationError, SafepointError
from ._validate import positive_seconds

if TYPE_CHECKING:  # messages imports the manifest, which imports the codec, which imports PerRank from here
    from ._messages import Message

Json = Any  # a value json.dumps accepts

__all__ = [
    "DEFAULT_TIMEOUT",
    "Coordinator",
    "LocalCoordinator",
    "Operation",
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

P = TypeVar("P", bound="Message")
R = TypeVar("R", bound="Message")


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
class Post(Generic[P]):
    """What one rank contributes to an exchange: a message, or the error its own work raised."""

    value: P | None = None
    error: BaseException | None = None

    def message(self) -> P:
        """The message of a post that carries no error."""
        assert self.value is not None, "a post without an error carries a message"
        return self.value


class _Exchanges(Protocol):
    rank: int
    world_size: int
    timeout: float

    def exchange_at(
        self,
        key: str,
        phase: str,
        post: Post[P],
        decide: Callable[[list[Post[P] | None]], R],
        reads: tuple[Callable[[Json], P], Callable[[Json], R]],
    ) -> R: ...


class Operation:
    """One save or restore across the ranks. Its exchanges are numbered within it: an operation's exchanges
    run one after the other on one thread, and every rank's n-th operation makes the same ones."""

    def __init__(self, coordinator: _Exchanges, key: str, kind: str) -> None:
        self.rank, self.world_size, self.timeout = coordinator.rank, coordinator.world_size, coordinator.timeout
        self.kind = kind
        self._coordinator = coordinator
        self._key = key
        self._count = 0

    def exchange(
        self,
        phase: str,
        post: Post[P],
        decide: Callable[[list[Post[P] | None]], R],
        *,
        reads: tuple[Callable[[Json], P], Callable[[Json], R]],
    ) -> R:
        """Post, let rank 0 decide on every rank's post (None: a rank that never posted), and return (or raise)
        the decision on every rank. ``reads`` parse a post and an outcome from their JSON."""
        self._count += 1
        return self._coordinator.exchange_at(f"{self._key}.{self._count}", phase, post, decide, reads)


class Coordinator(Protocol):
    rank: int
    world_size: int
    timeout: float

    def operation(self, kind: str) -> Operation:
        """A new save or restore; called on the caller's thread, in the same order on every rank."""


def check_timeout(value: object) -> float:
    return positive_seconds("timeout", value)


def default_coordinator(timeout: float, *, distributed: bool = True) -> Coordinator:
    """The coordinator for this process: torch.distributed's default group if one is initialised (and
    ``distributed``), else this process alone."""
    if distributed is not True and distributed is not False:
        raise ConfigError(f"distributed must be True or False, not {distributed!r}")
    if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # _get_default_store is the store the group was built on (torchrun's TCPStore); there is no public getter
        store = dist.distributed_c10d._get_default_store()
        # every rank creates its managers in the same order, so the n-th manager of each rank shares a namespace
        namespace = f"safepoint/{next(_instances)}/"
        return TorchCoordinator(store, dist.get_rank(), dist.get_world_size(), namespace=namespace, timeout=timeout)
    return LocalCoordinator(timeout)


def require_all(op: str, posts: Sequence[Post[P] | None], timeout: float) -> list[Post[P]]:
    """The posts, or a CoordinationError naming every rank that did not post in time."""
    missing = [rank for rank, post in enumerate(posts) if post is None]
    if missing:
        raise CoordinationError(
            f"{_ranks(missing)} did not join {op} within {timeout:g} s (crashed, stopped, or not calling it)"
            + _consequence(op),
            ranks=tuple(missing),
        )
    return [post for post in posts if post is not None]


def first_failure(posts: Sequence[Post[P]]) -> None:
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


def _clone(store: Store) -> Store:
    """A new client of the same store, for one thread (``Store.clone``, which torch's type stubs leave out)."""
    clone: Callable[[], Store] = store.clone  # type: ignore[attr-defined]
    return clone()


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

    def operation(self, kind: str) -> Operation:
        return Operation(self, "", kind)

    def exchange_at(
        self,
        key: str,
        phase: str,
        post: Post[P],
        decide: Callable[[list[Post[P] | None]], R],
        reads: tuple[Callable[[Json], P], Callable[[Json], R]],
    ) -> R:
        return decide([post])


# -- each thread's client of the store ----------------------------------------------------------------------
class _Clients:
    """The clients (clones) of one thread of this process, one per store, made on first use. Where a store has
    none, None: a store written in Python has no ``clone``, and a store's host may refuse more connections; such
    a thread shares the store's one client with the others, one call at a time (see :func:`_shared_lock`)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        # weak keys: a store's clients go with it (a process group destroyed and made again gets a new store)
        self._clones: weakref.WeakKeyDictionary[Store, Store] = weakref.WeakKeyDictionary()
        self._itself: weakref.WeakSet[Store] = weakref.WeakSet()  # its own clone (a HashStore, safe from any thread)
        self._none: weakref.WeakSet[Store] = weakref.WeakSet()

    def of(self, store: Store) -> Store | None:
        client = self._clones.get(store)  # the usual case (a TCPStore's clone) first: one lookup per call
        if client is not None:
            return client
        if store in self._itself:
            return store
        if store in self._none:
            return None
        try:
            client = _clone(store)
        except RuntimeError:  # "pure virtual function clone", or a connection refused
            self._none.add(store)
            return None
        if client is store:
            self._itself.add(store)
        else:
            self._clones[store] = client
        return client


_local = threading.local()  # .clients: this thread's _Clients (a waiter thread's are its main thread's)


def _thread_clients() -> _Clients:
    """This thread's clients: the main thread's are its waiter's (a new waiter after an abandoned wait, whose
    client may still be blocked in it), a forked child's are new (it must not talk over its parent's
    connections)."""
    if threading.current_thread() is threading.main_thread():
        return _main_waiter().clients
    clients: _Clients | None = getattr(_local, "clients", None)
    if clients is None or clients.pid != os.getpid():
        clients = _local.clients = _Clients()
    return clients


_shared_locks: weakref.WeakKeyDictionary[Store, threading.Lock] = weakref.WeakKeyDictionary()
_shared_locks_lock = threading.Lock()


def _shared_lock(store: Store) -> threading.Lock:
    """The lock of ``store``'s one client, which the threads without a clone of it share."""
    with _shared_locks_lock:
        lock = _shared_locks.get(store)
        if lock is None:
            lock = _shared_locks[store] = threading.Lock()
        return lock


# -- the main thread's waits ------------------------------------------------------------------------------------
class _Waiter:
    """A daemon thread that blocks in the store on behalf of the main thread, which waits for its answer in
    Python. Python runs a signal's handler (Ctrl-C's KeyboardInterrupt) only between bytecodes, so a main thread
    blocked in the store itself would not stop until the store answered: up to the timeout, ten minutes by
    default. A wait the main thread gave up on (an exception while it waited) is left to this thread to finish,
    and the next wait gets a new waiter. (Not a ThreadPoolExecutor: the interpreter joins its threads at exit,
    which would wait out an abandoned wait.) The thread starts at the first wait: a main thread whose stores
    have no client of their own (a store written in Python) looks at them itself, and needs none."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.abandoned = False
        self.clients = _Clients()  # the main thread's, used on its thread only while the main thread waits for it
        self._requests: queue.SimpleQueue[tuple[Callable[[], bool], Future[bool]] | None] = queue.SimpleQueue()
        self._started = False  # only the main thread starts it

    def _serve(self) -> None:
        _local.clients = self.clients
        while (request := self._requests.get()) is not None:
            call, answer = request
            try:
                answer.set_result(call())
            except BaseException as error:  # handed to the waiting thread, which raises it
                answer.set_exception(error)

    def run(self, call: Callable[[], bool]) -> bool:
        """``call()`` on this waiter's thread; its value, or its exception."""
        if not self._started:
            threading.Thread(target=self._serve, name="safepoint-store-wait", daemon=True).start()
            self._started = True
        answer: Future[bool] = Future()
        self._requests.put((call, answer))
        try:
            return answer.result()
        except BaseException:
            if not answer.done():
                self.abandoned = True
                self._requests.put(None)  # the thread ends once the store answers the wait in progress
            raise


_waiter: _Waiter | None = None  # only the main thread uses it


def _main_waiter() -> _Waiter:
    """The main thread's waiter: a new one after an abandoned wait, and in a forked child (which has no thread
    of its parent's)."""
    global _waiter
    if _waiter is None or _waiter.abandoned or _waiter.pid != os.getpid():
        _waiter = _Waiter()
    return _waiter


# -- the torch.distributed coordinator ---------------------------------------------------------------------------
_instances = itertools.count()


#: How long a thread without a client of its own sleeps between looks at the shared one.
_SHARED_SLICE = 0.005
#: How much longer than asked a store's wait may take to time out: a FileStore's ends on a whole second, up to
#: one second late (torch 2.13). The ranks waiting for rank 0's outcome allow rank 0 that much more.
_COARSE_WAIT = 1.0


class TorchCoordinator:
    """Exchanges through the default process group's store; see the module docstring for why not collectives.

    Every rank must create its coordinators (its managers) in the same order, and start the same operations in
    the same order, as with any collective: operations are numbered, and the numbers must meet.
    """

    def __init__(
        self,
        store: Store,
        rank: int,
        world_size: int,
        *,
        namespace: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self.rank = rank
        self.world_size = world_size
        self._store = store  # every key starts with the namespace: the operations' keys do (see operation)
        self._namespace = namespace
        self._operations = itertools.count(1)
        self._shared = _shared_lock(store)  # the one client of the threads that have none of their own
        self._own()

    def operation(self, kind: str) -> Operation:
        return Operation(self, f"{self._namespace}{next(self._operations)}", kind)

    def exchange_at(
        self,
        key: str,
        phase: str,
        post: Post[P],
        decide: Callable[[list[Post[P] | None]], R],
        reads: tuple[Callable[[Json], P], Callable[[Json], R]],
    ) -> R:
        record: dict[str, Json] = {"op": phase}
        if self.rank != 0:  # rank 0 decides on its own post in memory; its record only says it has arrived
            value = None if post.value is None else post.value.to_json()
            record.update(value=value, error=None if post.error is None else describe(post.error))
        with self._store_errors(phase), self._client() as store:
            store.set(f"{key}/{self.rank}", json.dumps(record))
        if self.rank == 0:
            return self._lead(key, phase, post, decide, reads[0])
        return self._follow(key, phase, post, reads[1])

    def _own(self) -> Store | None:
        """This thread's own client of the store (see :class:`_Clients`); None where it has none: it then shares
        one, and looks at it every few milliseconds."""
        return _thread_clients().of(self._store)

    @contextlib.contextmanager
    def _client(self) -> Iterator[Store]:
        """This thread's own client, or the shared one, held for the duration."""
        own = self._own()
        if own is not None:
            yield own
            return
        with self._shared:
            yield self._store

    def _lead(
        self,
        key: str,
        phase: str,
        own: Post[P],
        decide: Callable[[list[Post[P] | None]], R],
        read: Callable[[Json], P],
    ) -> R:
        posts: list[Post[P] | None] = [own]
        with self._store_errors(phase):
            present = self._wait_for([f"{key}/{r}" for r in range(1, self.world_size)], self.timeout)
            for rank in range(1, self.world_size):
                posts.append(self._read_post(key, rank, phase, read) if present[rank - 1] else None)
        readers = [rank for rank, post in enumerate(posts) if rank and post is not None]
        try:
            value = decide(posts)
        except BaseException as error:
            self._publish(key, phase, {"error": describe(error)}, readers)
            raise
        self._publish(key, phase, {"value": value.to_json()}, readers)
        return value

    def _publish(self, key: str, phase: str, outcome: dict[str, Json], readers: list[int]) -> None:
        with self._store_errors(phase), self._client() as store:
            store.set(f"{key}/outcome", json.dumps(outcome))
        self._await_readers(key, readers)

    def _await_readers(self, key: str, readers: list[int]) -> None:
        """Wait (at most the timeout) until the ranks ``readers`` have read the outcome, then remove the
        exchange's records. The outcome is decided, so nothing here raises; but the wait is needed, not only tidy:
        where rank 0's process hosts the store (a group started without torchrun's agent), returning at once let
        it finish and exit before a slower rank had read the outcome of the last exchange, which then got
        "Connection reset by peer" instead of the outcome (tried, and reverted: test_ranks.py's background-kill
        test on 4 ranks failed in 6 of 8 runs)."""
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            seen = [f"{key}/read/{rank}" for rank in readers]
            self._wait_for(seen, self.timeout)
            with self._client() as store:
                for name in [*(f"{key}/{r}" for r in range(self.world_size)), f"{key}/outcome", *seen]:
                    store.delete_key(name)

    def _read_post(self, key: str, rank: int, phase: str, read: Callable[[Json], P]) -> Post[P]:
        with self._client() as store:
            record = json.loads(store.get(f"{key}/{rank}"))
        if record["op"] != phase:
            error = CoordinationError(
                f"rank {rank} is in {record['op']} while rank 0 is in {phase}: every rank must make the same "
                "safepoint calls in the same order",
                ranks=(rank,),
            )
            return Post(error=error)
        described = record["error"]
        if described is not None:
            return Post(error=rebuild(described, rank=rank))
        try:
            return Post(read(record["value"]))
        except (KeyError, TypeError, ValueError) as err:
            return Post(
                error=CoordinationError(f"rank {rank} posted a malformed {phase} message: {err}", ranks=(rank,))
            )

    def _follow(self, key: str, phase: str, own: Post[P], read: Callable[[Json], R]) -> R:
        with self._store_errors(phase):
            if not self._wait_for([f"{key}/0"], self.timeout)[0]:
                raise CoordinationError(
                    f"rank 0 (the coordinator) did not join {phase} within {self.timeout:g} s" + _consequence(phase),
                    ranks=(0,),
                )
            # rank 0 waits up to the timeout for the others, then decides (writing a manifest at most)
            patience = 2 * self.timeout + _COARSE_WAIT
            if not self._wait_for([f"{key}/outcome"], patience)[0]:
                keys = [f"{key}/{r}" for r in range(self.world_size)]
                with self._client() as store:
                    missing = [r for r, name in enumerate(keys) if not store.check([name])]
                raise CoordinationError(
                    f"rank 0 did not announce the outcome of {phase} within {patience:g} s"
                    + (f"; {_ranks(missing)} never joined" if missing else "")
                    + "; this rank cannot know how the operation ended: a new run's restore() finds what was committed",
                    ranks=tuple(missing) or (0,),
                )
            with self._client() as store:
                outcome = json.loads(store.get(f"{key}/outcome"))
        self._say_read(key)
        if "error" in outcome:
            error = rebuild(outcome["error"], rank=0)
            if own.error is not None:
                raise error from own.error
            raise error
        return read(outcome["value"])

    def _say_read(self, key: str) -> None:
        """Tell rank 0 this rank has read the outcome. The outcome is known: a store gone now changes nothing."""
        with contextlib.suppress(RuntimeError, OSError, ValueError), self._client() as store:
            store.set(f"{key}/read/{self.rank}", "")

    def _wait_for(self, keys: list[str], timeout: float) -> list[bool]:
        """Which of ``keys`` were set within ``timeout`` seconds of the last one seen arriving (so every rank
        that arrived a little after this one has also waited ``timeout`` for the missing ones), and at most
        1.25 ``timeout`` in all: the ranks waiting for the outcome give up at twice the timeout (and a second).
        Arrivals are seen when a wait ends: at once when every key is set, else when the wait (or a shared
        client's slice) expires."""
        start = time.monotonic()
        deadline, cap = start + timeout, start + 1.25 * timeout
        waiting = list(keys)
        while waiting:
            if self._waited(waiting, max(0.0, deadline - time.monotonic())):
                return [True] * len(keys)
            with self._client() as store:
                still = [key for key in waiting if not store.check([key])]
            now = time.monotonic()
            if len(still) < len(waiting):
                deadline = min(max(deadline, now + timeout), cap)
            waiting = still
            if now >= deadline:
                break
        return [key not in waiting for key in keys]

    def _waited(self, keys: list[str], seconds: float) -> bool:
        """Whether every one of ``keys`` was set within ``seconds`` (a thread without a client of its own looks
        once, then sleeps one short slice); a store that fails raises. The main thread has a waiter thread block
        in the store for it (see :class:`_Waiter`)."""
        wait = functools.partial(self._wait_here, keys, seconds)
        if self._own() is not None and threading.current_thread() is threading.main_thread():
            return _main_waiter().run(wait)
        return wait()

    def _wait_here(self, keys: list[str], seconds: float) -> bool:
        own = self._own()
        if own is None:  # hold the shared client only to look: a thread that waited on it would hold it
            with self._shared:
                if self._store.check(keys):
                    return True
            time.sleep(min(seconds, _SHARED_SLICE))
            return False
        began = time.monotonic()
        try:
            own.wait(keys, timedelta(seconds=max(seconds, 0.001)))
        except RuntimeError:  # DistStoreError (RuntimeError for a FileStore): a timeout, or a store gone
            if time.monotonic() - began < 0.5 * seconds:
                raise  # it failed before its time was up: not a timeout
            return False
        return True

    @contextlib.contextmanager
    def _store_errors(self, phase: str) -> Iterator[None]:
        try:
            yield
        except SafepointError:
            raise
        except (RuntimeError, OSError, ValueError) as err:  # DistError, DistNetworkError, a torn record
            raise CoordinationError(
                f"lost contact with the other ranks during {phase} ({type(err).__name__}: {err}); the store of the "
                "process group (hosted by rank 0, or by torchrun's agent) is gone or unreadable, so this rank "
                "cannot know how the operation ended: a new run's restore() finds what was committed",
                ranks=(0,),
            ) from err
