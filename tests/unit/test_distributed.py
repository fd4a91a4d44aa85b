"""The coordinator's exchange and the PerRank format in one process: ranks as threads on one in-memory store,
and a world of one. Real process groups are in tests/distributed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import Store

import safepoint
from safepoint import _distributed
from safepoint._distributed import Operation, Post, TorchCoordinator, first_failure, require_all
from safepoint._messages import Json

TIMEOUT = 0.5


class NoCloneStore(Store):
    """A store written in Python, as a user may pass to init_process_group: it has no ``clone``, so every thread
    of a rank shares one client of it, which takes one call at a time (the ranks of these tests are threads of one
    process, sharing it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = dist.HashStore()
        self._calling = threading.Lock()

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        """Its one client takes one call at a time: a second call meanwhile is a failure of the store."""
        if not self._calling.acquire(blocking=False):
            raise RuntimeError("NoCloneStore: two calls at once on its one client")
        try:
            yield
        finally:
            self._calling.release()

    def set(self, key: str, value: Any) -> None:
        with self._alone():
            self.inner.set(key, value)

    def get(self, key: str) -> bytes:
        with self._alone():
            return self.inner.get(key)

    def add(self, key: str, amount: int) -> int:
        with self._alone():
            return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        with self._alone():
            return self.inner.check(keys)

    def delete_key(self, key: str) -> bool:
        with self._alone():
            return self.inner.delete_key(key)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        with self._alone():
            self.inner.wait(keys, timeout)


_STORE_FILES = tempfile.TemporaryDirectory(prefix="safepoint-stores-")  # removed when the interpreter exits


def file_store() -> Store:
    """The store of ``init_method="file://..."``: its waits end on whole seconds, whatever timeout they are given."""
    return dist.FileStore(tempfile.mktemp(dir=_STORE_FILES.name), -1)


STORES = pytest.mark.parametrize(
    "store_type", [dist.HashStore, file_store, NoCloneStore], ids=["own-clients", "file-store", "shared-client"]
)


def run_ranks(
    world: int,
    body: Callable[[TorchCoordinator], Any],
    *,
    absent: tuple[int, ...] = (),
    store: Store | None = None,
) -> list[Any]:
    """Run ``body`` as every rank not in ``absent``, each in a thread on one store (a process group's store, in
    real life); the value or the exception of each."""
    store = store or dist.HashStore()
    store.set_timeout(timedelta(seconds=10))
    results: list[Any] = [None] * world

    def rank_main(rank: int) -> None:
        coordinator = TorchCoordinator(store, rank, world, namespace="test/", timeout=TIMEOUT)
        try:
            results[rank] = body(coordinator)
        except Exception as error:
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world) if r not in absent]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a rank hung"
    return results


@dataclass(frozen=True)
class Number:
    """A message of these tests: one integer."""

    value: int

    def to_json(self) -> Json:
        return {"n": self.value}

    @classmethod
    def from_json(cls, value: Json) -> Number:
        return cls(int(value["n"]))


READS = (Number.from_json, Number.from_json)


def exchange(operation: Operation, phase: str, post: Post[Number], decide: Any) -> Any:
    return operation.exchange(phase, post, decide, reads=READS).value


def gather_sum(coordinator: TorchCoordinator, operation: Operation | None = None) -> Any:
    def decide(posts: list[Post[Number] | None]) -> Number:
        return Number(sum(post.message().value for post in require_all("sum", posts, coordinator.timeout)))

    return exchange(operation or coordinator.operation("sum"), "sum", Post(Number(10 + coordinator.rank)), decide)


@STORES
def test_every_rank_gets_the_decision_rank_0_made_on_all_posts(store_type: Callable[[], Store]) -> None:
    assert run_ranks(3, gather_sum, store=store_type()) == [33, 33, 33]


@STORES
def test_exchanges_repeat_in_order_and_old_records_are_removed(store_type: Callable[[], Store]) -> None:
    store = store_type()
    posted: list[bool] = []  # rank 0, deciding each exchange: rank 1's post is in the store under its name
    seen: list[bool] = []

    def body(coordinator: TorchCoordinator) -> Any:
        operation = coordinator.operation("sum")
        values = []
        for n in (1, 2, 3):

            def decide(posts: list[Post[Number] | None], n: int = n) -> Number:
                posted.append(store.check([f"test/1.{n}/1"]))
                return Number(sum(post.message().value for post in require_all("sum", posts, 5.0)))

            values.append(exchange(operation, "sum", Post(Number(10 + coordinator.rank)), decide))
        if coordinator.rank == 0:
            seen.extend(store.check([f"test/1.{n}/{r}"]) for n in (1, 2) for r in (0, 1))
            seen.extend(store.check([f"test/1.{n}/outcome"]) for n in (1, 2))
        return values

    results = run_ranks(2, body, store=store)
    assert results == [[21, 21, 21], [21, 21, 21]]
    assert posted == [True] * 3
    assert seen == [False] * 6  # rank 0 returned from 1 and 2 once rank 1 had read them, and removed the records
    leftover = [f"test/1.{n}/{name}" for n in (1, 2, 3) for name in ("0", "1", "outcome", "read/1")]
    assert not any(store.check([name]) for name in leftover)


@STORES
def test_operations_on_two_threads_do_not_meet(store_type: Callable[[], Store]) -> None:
    """A background save's exchanges, on its own thread, interleave with the caller's next operation: each
    exchange is keyed by its operation, so neither sees the other's posts (a global count would cross them)."""

    def body(coordinator: TorchCoordinator) -> Any:
        first, second = coordinator.operation("save"), coordinator.operation("restore")
        found: dict[str, Any] = {}

        def background() -> None:
            if coordinator.rank == 1:
                time.sleep(0.2)  # rank 1 reaches the second operation first on its caller's thread
            found["first"] = [exchange(first, "a", Post(Number(coordinator.rank)), plus(100)) for _ in range(3)]

        thread = threading.Thread(target=background)
        thread.start()
        if coordinator.rank == 0:
            time.sleep(0.2)
        found["second"] = [exchange(second, "b", Post(Number(coordinator.rank)), plus(1000)) for _ in range(2)]
        thread.join()
        return found

    def plus(base: int) -> Any:
        def decide(posts: list[Post[Number] | None]) -> Number:
            return Number(base + sum(post.message().value for post in require_all("x", posts, 5.0)))

        return decide

    results = run_ranks(2, body, store=store_type())
    for found in results:
        assert found["first"] == [101, 101, 101]
        assert found["second"] == [1001, 1001]


def background_and_foreground(store: Store) -> list[Any]:
    """Rank 0's background thread (named ``background``) waits for rank 1's background post, which rank 1 makes
    only once the caller's threads have finished an exchange of their own: if that wait held rank 0's store
    client, the callers' exchange could not run, and both would time out."""

    def body(coordinator: TorchCoordinator) -> Any:
        background, foreground = coordinator.operation("save"), coordinator.operation("restore")
        done = threading.Event()
        found: dict[str, Any] = {}

        def save() -> None:
            if coordinator.rank == 1:
                done.wait()
            found["background"] = exchange(background, "a", Post(Number(coordinator.rank)), plus(100))

        thread = threading.Thread(target=save, name="background")
        thread.start()
        time.sleep(0.1)  # rank 0's background thread is waiting for rank 1 by now
        started = time.monotonic()
        try:
            found["foreground"] = exchange(foreground, "b", Post(Number(coordinator.rank)), plus(1000))
            found["took"] = time.monotonic() - started
        finally:
            done.set()
            thread.join()
        return found

    def plus(base: int) -> Any:
        def decide(posts: list[Post[Number] | None]) -> Number:
            return Number(base + sum(post.message().value for post in require_all("x", posts, TIMEOUT)))

        return decide

    return run_ranks(2, body, store=store)


@STORES
def test_a_waiting_thread_holds_up_no_other_thread_of_its_rank(store_type: Callable[[], Store]) -> None:
    for found in background_and_foreground(store_type()):
        assert found["background"] == 101
        assert found["foreground"] == 1001
        assert found["took"] < TIMEOUT / 2


def test_a_thread_that_cannot_clone_the_store_shares_a_client_and_holds_up_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store's host may refuse one more connection: the background threads, whose clones fail, share one
    client and wait on it in slices, while the callers' threads keep clients of their own."""
    clone = _distributed._clone
    failed: list[str] = []

    def refusing(store: Store) -> Store:
        if threading.current_thread().name == "background":
            failed.append("background")
            raise RuntimeError("Connection refused")
        return clone(store)

    monkeypatch.setattr(_distributed, "_clone", refusing)
    for found in background_and_foreground(dist.HashStore()):
        assert found["background"] == 101
        assert found["foreground"] == 1001
        assert found["took"] < TIMEOUT / 2
    assert failed == ["background", "background"]  # one try per thread, not one per call


def test_a_thread_has_one_client_of_the_store_for_every_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each manager has a coordinator of its own (its own keys); a thread's clone of the store serves them all,
    and the main thread shares its clone with the waiter that blocks for it: two connections to the store's host
    for two threads with three managers each, where one per manager and thread would be nine."""
    assert threading.current_thread() is threading.main_thread()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    clone = _distributed._clone
    made: list[str] = []

    def counting(of: Store) -> Store:
        if of is store:
            made.append(threading.current_thread().name)
        return clone(of)

    monkeypatch.setattr(_distributed, "_clone", counting)
    found: dict[str, Any] = {}

    def partner() -> None:
        coordinators = [TorchCoordinator(store, 1, 2, namespace=f"m{i}/", timeout=5.0) for i in range(3)]
        found["partner"] = [gather_sum(coordinator) for coordinator in coordinators for _ in range(2)]

    thread = threading.Thread(target=partner, name="partner")
    thread.start()
    coordinators = [TorchCoordinator(store, 0, 2, namespace=f"m{i}/", timeout=5.0) for i in range(3)]
    found["main"] = [gather_sum(coordinator) for coordinator in coordinators for _ in range(2)]
    thread.join(timeout=30)
    assert found == {"main": [21] * 6, "partner": [21] * 6}
    assert sorted(made) == ["MainThread", "partner"]


@STORES
def test_a_rank_that_never_posts_is_named_on_every_waiting_rank(store_type: Callable[[], Store]) -> None:
    start = time.monotonic()
    results = run_ranks(3, gather_sum, absent=(2,), store=store_type())
    elapsed = time.monotonic() - start
    for rank in (0, 1):
        error = results[rank]
        assert isinstance(error, safepoint.CoordinationError)
        assert "rank 2 did not join sum within 0.5 s" in str(error)
        assert error.ranks == (2,)
    assert str(results[0]) == str(results[1])
    assert TIMEOUT <= elapsed < TIMEOUT * 4 + 5


class Interrupted(Exception):
    """What this module's SIGINT handler raises: a KeyboardInterrupt would stop pytest itself."""


@pytest.mark.parametrize("store_type", [dist.HashStore, file_store], ids=["own-clients", "file-store"])
def test_ctrl_c_stops_the_main_thread_while_it_waits_for_the_others(store_type: Callable[[], Store]) -> None:
    """Python runs a signal's handler only between bytecodes: a main thread blocked in the store's own wait would
    not see Ctrl-C until the store answered (the whole timeout). The main thread waits in Python instead."""
    assert threading.current_thread() is threading.main_thread()
    store = store_type()
    coordinator = TorchCoordinator(store, 0, 2, namespace="test/", timeout=60.0)  # rank 1 never comes

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    try:
        timer.start()
        with pytest.raises(Interrupted):
            gather_sum(coordinator)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 5
    waiters = [t for t in threading.enumerate() if t.name == "safepoint-store-wait"]
    assert len(waiters) == 1  # still waiting for rank 1, for the main thread that gave up
    store.set("test/1.1/1", "{}")  # the store answers: the abandoned wait, and its thread, end
    waiters[0].join(timeout=5)
    assert not waiters[0].is_alive()
    # the main thread's next exchange gets a new waiter
    assert sum_with_a_partner(store, "again/") == {"main": 21, "partner": 21}


def sum_with_a_partner(store: Store, namespace: str) -> dict[str, Any]:
    """``gather_sum`` with the main thread as rank 0 and another thread as rank 1: what each got."""
    found: dict[str, Any] = {}
    partner = TorchCoordinator(store, 1, 2, namespace=namespace, timeout=5.0)
    thread = threading.Thread(target=lambda: found.update(partner=gather_sum(partner)))
    thread.start()
    found["main"] = gather_sum(TorchCoordinator(store, 0, 2, namespace=namespace, timeout=5.0))
    thread.join(timeout=30)
    return found


def test_a_main_thread_that_looks_at_a_shared_client_starts_no_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written in Python has no client per thread: the main thread looks at it itself (briefly, between
    short sleeps), so the waiter thread that blocks in a store for it is never started."""
    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setattr(_distributed, "_waiter", None)  # as in a process that has not waited yet
    before = {t.ident for t in threading.enumerate() if t.name == "safepoint-store-wait"}
    assert sum_with_a_partner(NoCloneStore(), "python/") == {"main": 21, "partner": 21}
    started = [t for t in threading.enumerate() if t.name == "safepoint-store-wait" and t.ident not in before]
    assert started == []


@STORES
def test_a_missing_coordinator_is_named_by_the_other_ranks(store_type: Callable[[], Store]) -> None:
    results = run_ranks(2, gather_sum, absent=(0,), store=store_type())
    error = results[1]
    assert isinstance(error, safepoint.CoordinationError)
    assert "rank 0 (the coordinator) did not join sum" in str(error)
    assert error.ranks == (0,)


def test_a_safepoint_error_on_one_rank_is_the_same_type_and_message_everywhere() -> None:
    def body(coordinator: TorchCoordinator) -> Any:
        own: Post[Number] = (
            Post(error=safepoint.CheckpointExistsError("step 5 is taken", step=5, path="/x"))
            if coordinator.rank == 1
            else Post(Number(1))
        )

        def decide(posts: list[Post[Number] | None]) -> Number:
            first_failure(require_all("save", posts, coordinator.timeout))
            return Number(0)

        return exchange(coordinator.operation("save"), "save", own, decide)

    results = run_ranks(3, body)
    for error in results:
        assert type(error) is safepoint.CheckpointExistsError
        assert str(error) == "rank 1: step 5 is taken"
        assert error.step == 5
        assert error.path == "/x"


def test_other_errors_become_a_coordination_error_naming_rank_and_type() -> None:
    def body(coordinator: TorchCoordinator) -> Any:
        own: Post[Number] = Post(error=ValueError("bad shard")) if coordinator.rank == 2 else Post(Number(1))

        def decide(posts: list[Post[Number] | None]) -> Number:
            first_failure(require_all("save", posts, TIMEOUT))
            return Number(0)

        return exchange(coordinator.operation("save"), "save", own, decide)

    results = run_ranks(3, body)
    for error in results:
        assert type(error) is safepoint.CoordinationError
        assert str(error) == "rank 2: ValueError: bad shard"
        assert error.ranks == (2,)


def test_ranks_in_different_operations_are_told_so() -> None:
    def body(coordinator: TorchCoordinator) -> Any:
        op = "restore.begin" if coordinator.rank == 1 else "save.begin"

        def decide(posts: list[Post[Number] | None]) -> Number:
            first_failure(require_all(op, posts, TIMEOUT))
            return Number(0)

        return exchange(coordinator.operation(op), op, Post(Number(1)), decide)

    results = run_ranks(2, body)
    for error in results:
        assert isinstance(error, safepoint.CoordinationError)
        assert "rank 1 is in restore.begin while rank 0 is in save.begin" in str(error)


# -- the manager in one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "10", None])
def test_an_invalid_timeout_is_a_config_error(tmp_path: Path, timeout: Any) -> None:
    with pytest.raises(safepoint.ConfigError, match="timeout must be a positive number of seconds"):
        safepoint.CheckpointManager(tmp_path, timeout=timeout)
    assert list(tmp_path.iterdir()) == []


def test_without_a_process_group_files_keep_their_single_process_names(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, timeout=1.5) as manager:
        info = manager.save(1, {"x": torch.ones(3)})
    body = json.loads((tmp_path / "step-000000000001" / "manifest.json").read_text())
    assert [f["path"] for f in body["files"]] == [f"{info.save_id}/00000.safetensors"]
    assert body["world_size"] == 1


def per_rank_state(value: int) -> dict[str, Any]:
    return {
        "weights": torch.full((2,), float(value)),
        "loader": safepoint.PerRank({"position": value}),
        "seed": safepoint.PerRank(value),
        "shard": safepoint.PerRank(torch.arange(3) + value),
    }


def test_per_rank_entries_round_trip_in_one_process(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(4, per_rank_state(7))
        live = per_rank_state(0)
        report = manager.restore(live)
    assert report is not None
    assert report.step == 4
    assert torch.equal(live["weights"], torch.full((2,), 7.0))
    assert live["loader"].value == {"position": 7}
    assert live["seed"].value == 7
    assert torch.equal(live["shard"].value, torch.arange(3) + 7)
    body = json.loads((tmp_path / "step-000000000004" / "manifest.json").read_text())
    assert [f["path"].split("/")[1] for f in body["files"]] == [
        "r00000-rep-00000.safetensors",
        "r00000-own-00000.safetensors",
    ]
    assert body["format_version"] == safepoint.FORMAT_VERSION


def test_per_rank_marking_must_match_the_checkpoint(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, per_rank_state(7))
        unmarked = {**per_rank_state(0), "loader": {"position": 0}}
        with pytest.raises(safepoint.RestoreError, match=r"\['loader'\] were saved per rank"):
            manager.restore(unmarked)
        assert unmarked["loader"] == {"position": 0}
        wrongly = {**per_rank_state(0), "weights": safepoint.PerRank(torch.zeros(2))}
        with pytest.raises(safepoint.RestoreError, match=r"\['weights'\] were saved replicated"):
            manager.restore(wrongly)
        assert torch.equal(wrongly["weights"].value, torch.zeros(2))


def test_a_per_rank_save_of_a_committed_step_reports_it(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager:
        manager.save(1, per_rank_state(1))
        with pytest.raises(safepoint.CheckpointExistsError, match="step 1 is already committed") as caught:
            manager.save(1, per_rank_state(2))
    assert caught.value.verified is True
    assert safepoint.load(tmp_path / "step-000000000001")["seed"] == {0: 1}


def test_a_nested_per_rank_is_refused_naming_its_key(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as manager, pytest.raises(safepoint.InvalidStateError) as caught:
        manager.save(1, {"data": {"loader": safepoint.PerRank({"position": 3})}})
    assert caught.value.key == "data/loader"
    assert "PerRank marks top-level entries" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# -- the messages between ranks -----------------------------------------------------------------------------------
def test_a_rank_part_survives_its_json_form() -> None:
    from safepoint._manifest import EntryRecord, FileRecord
    from safepoint._messages import OwnPart, RankPart, ReplicatedPart, ReplicatedPlan

    entry = EntryRecord("model/w", "tensor", "F32", (2, 3), 0, "model/w", False)
    plan = ReplicatedPlan(("s/r00000-rep-00000.safetensors",), (entry,), {"k": "dict", "v": []}, {"loss": 0.5})
    part = RankPart(
        ReplicatedPart(((0, FileRecord("s/r00000-rep-00000.safetensors", 120, "crc:1")),), "abc", plan),
        OwnPart((FileRecord("s/r00000-own-00000.safetensors", 64, "crc:2"),), (entry,), {"k": "dict", "v": []}),
    )
    again = RankPart.from_json(json.loads(json.dumps(part.to_json())))
    assert again == part
    assert again.rep is not None
    assert again.rep.plan is not None
    assert again.rep.plan.entries[0].shape == (2, 3)  # a tuple again, as the manifest needs


def test_a_malformed_message_is_a_coordination_error() -> None:
    from safepoint._messages import Check, SaveBegin

    with pytest.raises(safepoint.CoordinationError, match="lacks 'keys'"):
        SaveBegin.from_json({"step": 3})
    with pytest.raises(safepoint.CoordinationError, match="unknown restore status 'fine'"):
        Check.from_json({"status": "fine", "reason": ""})
