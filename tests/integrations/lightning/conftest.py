"""Fixtures for the Lightning integration tests: the moto S3 server of the storage tests, and quiet Lightning."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

pytest.importorskip("lightning")

from tests.storage.conftest import s3_server  # noqa: F401  (the session's S3 server on loopback)


@pytest.fixture(autouse=True)
def _quiet_lightning() -> Iterator[None]:
    """Lightning's tips and deprecation notes are not what these tests look at; warnings from safepoint are."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*(LeafSpec|litlogger|num_workers|does not have many workers).*")
        yield
