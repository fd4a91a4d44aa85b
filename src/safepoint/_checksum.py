"""Checksums of checkpoint files: one algorithm table, streaming hashers, and the persisted string form.

A checksum is persisted as ``"<algorithm>:<hex digest>"``. Only algorithms in :data:`ALGORITHMS` are accepted
when reading, so every string ever written is recognised for ever, and an unknown one is an error, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import xxhash

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "Hasher", "new_hasher", "parse_checksum"]


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


#: xxh3_64 hashes at memory speed (tens of GB/s), so a checksum costs a few percent of a durable write.
ALGORITHMS: dict[str, Callable[[], Hasher]] = {"xxh3_64": xxhash.xxh3_64}
DEFAULT_ALGORITHM = "xxh3_64"


class ChecksumFormatError(ValueError):
    pass


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    return ALGORITHMS[algorithm]()


def format_checksum(hasher: Hasher, algorithm: str = DEFAULT_ALGORITHM) -> str:
    return f"{algorithm}:{hasher.hexdigest()}"


def parse_checksum(text: str) -> tuple[str, str]:
    """Split a persisted checksum into (algorithm, hex digest); raise ChecksumFormatError if unknown."""
    algorithm, sep, digest = text.partition(":")
    if not sep or algorithm not in ALGORITHMS or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise ChecksumFormatError(f"unknown or malformed checksum {text[:80]!r}")
    return algorithm, digest
