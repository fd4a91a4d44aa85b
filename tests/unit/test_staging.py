"""The staging pool: buffers reused by exact size, every byte it holds within the budget."""

from __future__ import annotations

import threading

import pytest

import safepoint
from safepoint._staging import StagingPool, check_staging_bytes


def test_a_released_buffer_is_handed_out_again() -> None:
    pool = StagingPool(None)
    first = pool.acquire(1000)
    pool.release(first)
    again = pool.acquire(1000)
    assert again.data_ptr() == first.data_ptr()
    assert pool.allocations == 1
    assert pool.held == 1000
    assert pool.lent == 1000


def test_a_request_that_does_not_fit_waits_for_a_release() -> None:
    pool = StagingPool(1500)
    first = pool.acquire(1000)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(1000).numel()))
    waiter.start()
    waiter.join(0.2)
    assert got == []  # 2000 bytes would exceed the budget
    pool.release(first)
    waiter.join(30)
    assert got == [1000]
    assert pool.peak <= 1500


def test_free_buffers_of_other_sizes_are_dropped_to_make_room() -> None:
    pool = StagingPool(1000)
    pool.release(pool.acquire(600))
    buffer = pool.acquire(800)
    assert buffer.numel() == 800
    assert pool.held == 800
    assert pool.peak <= 1000


def test_a_piece_larger_than_the_budget_is_admitted_alone_and_not_kept() -> None:
    pool = StagingPool(100)
    pool.release(pool.acquire(50))
    big = pool.acquire(500)  # the free 50 bytes are dropped first
    assert pool.held == 500
    pool.release(big)
    assert pool.held == 0


def test_a_cancelled_wait_returns_an_empty_buffer() -> None:
    pool = StagingPool(100)
    held = pool.acquire(100)
    cancelled = threading.Event()
    cancelled.set()
    assert pool.acquire(100, cancelled=cancelled).numel() == 0
    pool.release(held)
    assert pool.lent == 0


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "1GB"])
def test_bad_budgets_are_config_errors(value: object) -> None:
    with pytest.raises(safepoint.ConfigError, match="max_staging_bytes"):
        check_staging_bytes(value)
