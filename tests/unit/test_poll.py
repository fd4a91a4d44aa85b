"""How often a rank looks at the store while it waits for the others: every millisecond at most for the first
0.1 s of a wait, backing off to every 5 ms after."""

from __future__ import annotations

import pytest

from safepoint._distributed import _next_pause


def _pauses(waited: float, count: int) -> list[float]:
    pauses, pause = [], 0.0002
    for _ in range(count):
        pause = _next_pause(pause, waited)
        pauses.append(pause)
    return pauses


def test_early_in_a_wait_pauses_stop_growing_at_a_millisecond() -> None:
    assert _pauses(0.0, 6) == pytest.approx([0.0004, 0.0008, 0.001, 0.001, 0.001, 0.001])
    assert _pauses(0.099, 4)[-1] == pytest.approx(0.001)


def test_later_they_back_off_to_five_milliseconds() -> None:
    assert _pauses(0.1, 6) == pytest.approx([0.0004, 0.0008, 0.0016, 0.0032, 0.005, 0.005])
    assert _next_pause(0.001, 0.5) == pytest.approx(0.002)
