"""Argument checks: one wording for every option, and each entry point uses it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import safepoint
from safepoint._validate import non_negative_int, non_negative_seconds, positive_int, positive_seconds


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
def test_non_negative_int(bad: object) -> None:
    assert non_negative_int("step", 0) == 0
    with pytest.raises(safepoint.ConfigError) as caught:
        non_negative_int("step", bad)
    assert str(caught.value) == f"step must be a non-negative integer, not {bad!r}"


def test_non_negative_int_or_none() -> None:
    assert non_negative_int("step", None, allow_none=True) is None
    with pytest.raises(safepoint.ConfigError) as caught:
        non_negative_int("step", -2, allow_none=True)
    assert str(caught.value) == "step must be None or a non-negative integer, not -2"


@pytest.mark.parametrize("bad", [0, -3, False, 2.5, "4"])
def test_positive_int(bad: object) -> None:
    assert positive_int("max_in_flight", 1) == 1
    with pytest.raises(safepoint.ConfigError) as caught:
        positive_int("max_in_flight", bad)
    assert str(caught.value) == f"max_in_flight must be a positive integer, not {bad!r}"
    with pytest.raises(safepoint.ConfigError) as caught:
        positive_int("keep_last", bad, allow_none=True)
    assert str(caught.value) == f"keep_last must be a positive integer or None, not {bad!r}"
    assert positive_int("keep_last", None, allow_none=True) is None


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "5"])
def test_positive_seconds(bad: object) -> None:
    assert positive_seconds("timeout", 2) == 2.0
    assert isinstance(positive_seconds("timeout", 2), float)
    with pytest.raises(safepoint.ConfigError) as caught:
        positive_seconds("timeout", bad)
    assert str(caught.value) == f"timeout must be a positive number of seconds, not {bad!r}"


@pytest.mark.parametrize("bad", [-0.5, float("nan"), True, "0"])
def test_non_negative_seconds(bad: object) -> None:
    assert non_negative_seconds("grace_period", 0) == 0.0
    assert non_negative_seconds("grace_period", float("inf")) == float("inf")
    with pytest.raises(safepoint.ConfigError) as caught:
        non_negative_seconds("grace_period", bad)
    assert str(caught.value) == f"grace_period must be a non-negative number of seconds, not {bad!r}"


def _manager(tmp_path: Path, **options: Any) -> Callable[[], object]:
    return lambda: safepoint.CheckpointManager(tmp_path / "run", **options)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _manager(p, keep_last=0), "keep_last must be a positive integer or None, not 0"),
        (lambda p: _manager(p, keep_every=-1), "keep_every must be a positive integer or None, not -1"),
        (lambda p: _manager(p, keep_best=True, best_metric="loss"), "keep_best must be a positive integer or None"),
        (lambda p: _manager(p, max_in_flight=0), "max_in_flight must be a positive integer, not 0"),
        (lambda p: _manager(p, max_staging_bytes=0), "max_staging_bytes must be a positive integer or None, not 0"),
        (lambda p: _manager(p, timeout=0), "timeout must be a positive number of seconds, not 0"),
        (lambda p: _manager(p, state_version=-1), "state_version must be a non-negative integer, not -1"),
        (lambda p: lambda: safepoint.save(p / "c", {}, state_version=True), "state_version must be a non-negative"),
        (lambda p: lambda: safepoint.Migrations().register(from_version=-1), "from_version must be a non-negative"),
        (lambda p: lambda: safepoint.Migrations().upgrade({}, from_version=1, to_version=-1), "to_version must be"),
        (
            lambda p: lambda: safepoint.CheckpointManager("memory://bucket/run", grace_period=-1),
            "grace_period must be a non-negative number of seconds, not -1",
        ),
    ],
)
def test_entry_points_check_their_arguments(
    tmp_path: Path, make: Callable[[Path], Callable[[], object]], message: str
) -> None:
    with pytest.raises(safepoint.ConfigError, match=re.escape(message)):
        make(tmp_path)()
