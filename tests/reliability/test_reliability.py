"""The reliability suite at its quick scale: every trial must pass, and every deliberately broken writer must be
caught. ``scripts/reliability.py --full`` runs the same suites at full scale and prints the published figures.

Invariants defended: all seven (docs/reliability.md maps each suite to the invariants it checks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability import suites
from tests.reliability.suites import SCALES, Result, Scale

QUICK = SCALES["quick"]
Suite = Callable[[Scale, Path], Result]


def _passes(result: Result, minimum_trials: int) -> None:
    assert result.trials >= minimum_trials, f"{result.name}: only {result.trials} trials ran"
    assert result.failures == 0, f"{result.name}: {result.failures} failures:\n" + "\n".join(result.examples)


@pytest.mark.parametrize(
    ("suite", "minimum_trials"),
    [
        (suites.kill_random, QUICK.kill_random),
        (suites.kill_points, 17),
        (suites.kill_subprocess, QUICK.subprocess_points),
        (suites.power_loss, 60),
        (suites.disk_full_injected, 3),
        (suites.io_errors, 12),
        (suites.fault_point_errors, 13),
        (suites.concurrent_same_step, QUICK.concurrent),
        (suites.two_managers, QUICK.two_managers),
        (suites.corruption, 26),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_suite_passes(tmp_path: Path, suite: Suite, minimum_trials: int) -> None:
    _passes(suite(QUICK, tmp_path), minimum_trials)


def test_enospc_on_a_real_tmpfs(tmp_path: Path) -> None:
    result = suites.disk_full_tmpfs(QUICK, tmp_path)
    if result.skipped:
        pytest.skip(result.skipped)
    _passes(result, 1)


# -- the harness can fail -----------------------------------------------------------------------------------------
def test_the_kill_harness_catches_a_non_atomic_writer(tmp_path: Path) -> None:
    result = suites.non_atomic_is_caught(QUICK, tmp_path)
    _passes(result, QUICK.non_atomic)


def test_the_power_loss_model_catches_dropped_fsyncs(tmp_path: Path) -> None:
    result = suites.power_loss_is_caught(QUICK, tmp_path)
    _passes(result, 60)
