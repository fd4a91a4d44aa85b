"""What the benchmarks add to a framework's own save to make it durable, as safepoint's saves are: an fsync of
every file and directory under a checkpoint folder, and of the folder's parent (its name); and how they make the
next read of a checkpoint cold."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    top = os.fspath(root)
    for directory, _, names in os.walk(top):
        for name in names:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)
    fsync_path(os.path.dirname(os.path.abspath(top)))


def evict_tree(root: Path) -> None:
    """Drop the page-cache pages of every file under ``root`` (after a sync, so that none is dirty): the next read
    of them comes from the disk. ``posix_fadvise(DONTNEED)`` touches only these files, not the rest of the machine."""
    os.sync()
    for path in (p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
