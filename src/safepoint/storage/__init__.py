"""Where checkpoints live: a small Storage protocol and its backends."""

from __future__ import annotations

import os

from .base import AttemptLock, FileSink, Storage
from .local import LocalStorage

__all__ = ["AttemptLock", "FileSink", "LocalStorage", "Storage", "open_storage"]


def open_storage(location: str | os.PathLike[str] | Storage) -> Storage:
    """The storage for a path or ``file://`` URL; a :class:`Storage` object is used as it is (custom backends,
    and the fault-injection wrappers of the reliability suite). Object-store URLs come with the fsspec backend."""
    if isinstance(location, Storage):
        return location
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        from ..errors import ConfigError

        raise ConfigError(f"unsupported storage URL {text!r}: only local paths and file:// are supported")
    return LocalStorage(text)
