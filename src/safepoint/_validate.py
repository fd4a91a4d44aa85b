"""Checking the arguments users pass: one wording for every option, a ConfigError naming the argument and the
value given, and the value back, typed, for the caller to keep.

``bool`` is refused wherever a number is asked for (``True`` is an ``int`` to Python, never a count to a user).
"""

from __future__ import annotations

import math
from typing import Literal, overload

from ._errors import ConfigError

__all__ = ["non_negative_int", "non_negative_seconds", "positive_int", "positive_seconds"]


@overload
def non_negative_int(name: str, value: object, *, allow_none: Literal[False] = False) -> int: ...
@overload
def non_negative_int(name: str, value: object, *, allow_none: Literal[True]) -> int | None: ...
def non_negative_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an int >= 0 (or None, when allowed); else ConfigError."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        wanted = "None or a non-negative integer" if allow_none else "a non-negative integer"
        raise ConfigError(f"{name} must be {wanted}, not {value!r}")
    return value


@overload
def positive_int(name: str, value: object, *, allow_none: Literal[False] = False) -> int: ...
@overload
def positive_int(name: str, value: object, *, allow_none: Literal[True]) -> int | None: ...
def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an int >= 1 (or None, when allowed); else ConfigError."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        wanted = "a positive integer or None" if allow_none else "a positive integer"
        raise ConfigError(f"{name} must be {wanted}, not {value!r}")
    return value


def positive_seconds(name: str, value: object) -> float:
    """``value`` as float if it is a finite number > 0; else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def non_negative_seconds(name: str, value: object) -> float:
    """``value`` as float if it is a number >= 0 (infinity allowed: never); else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{name} must be a non-negative number of seconds, not {value!r}")
    return float(value)
