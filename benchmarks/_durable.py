"""What the benchmarks add to a framework's own save to make it durable, as safepoint's saves are: an fsync of
every file and directory under a checkpoint folder, and of the folder's parent (its name)."""

from __future__ import annotations

import os


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
