"""Where checkpoints live: a small Storage protocol and its backends."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError
from .._validate import non_negative_seconds
from .base import AttemptLock, FileSink, Storage
from .fsspec import DEFAULT_GRACE_PERIOD, FsspecStorage
from .local import LocalStorage

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "AttemptLock",
    "FileSink",
    "FsspecStorage",
    "LocalStorage",
    "Storage",
    "open_storage",
]

#: What to install for the usual object stores, for the error that names a missing backend.
_EXTRAS = {"s3": "safepoint[s3]", "s3a": "safepoint[s3]", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def open_storage(
    location: str | os.PathLike[str] | Storage,
    storage_options: Mapping[str, Any] | None = None,
    *,
    grace_period: float | None = None,
) -> Storage:
    """The storage for a location: local paths and ``file://`` URLs get the local fast path (fsync, ``link()``
    publication, ``flock`` liveness); any other URL (``s3://``, ``gs://``, ``memory://``, ...) the fsspec backend,
    with ``storage_options`` passed to its file system and ``grace_period`` (seconds) for its attempt locks.
    Locally ``grace_period`` has nothing to do: a dead writer's ``flock`` is free at once. A :class:`Storage`
    object is used as it is (custom backends, and the fault-injection wrappers of the reliability suite)."""
    if isinstance(location, Storage):
        if storage_options:
            raise ConfigError("storage_options apply to a path or URL, not to a Storage object")
        return location
    text = os.fspath(location)
    if not isinstance(text, str):
        raise ConfigError(f"a storage location must be a path or URL string, not {text!r}")
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        return _open_fsspec(text, storage_options, grace_period)
    if storage_options:
        raise ConfigError(f"storage_options apply to object-store URLs, not to the local path {text!r}")
    return LocalStorage(text)


def _open_fsspec(url: str, storage_options: Mapping[str, Any] | None, grace_period: float | None) -> FsspecStorage:
    protocol = url.split("://", 1)[0]
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ConfigError(f"storage_options for {url!r} must be a mapping, not {type(storage_options).__name__}")
    grace = DEFAULT_GRACE_PERIOD if grace_period is None else non_negative_seconds("grace_period", grace_period)
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        install = _EXTRAS.get(protocol, "the fsspec implementation it names")
        raise ConfigError(f"cannot open {url!r}: {err} (pip install '{install}')") from err
    except ValueError as err:
        raise ConfigError(f"cannot open {url!r}: unknown storage protocol {protocol!r}") from err
    try:
        return FsspecStorage(url, storage_options, grace_period=grace)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot open {url!r} with storage_options {dict(storage_options or {})!r}: {err}") from err
