"""Names on disk: which entries of a directory safepoint owns, and how they are spelled.

A manager directory holds one directory per step; a checkpoint directory holds its manifest (the commit record),
the data directory of the attempt that committed, and, transiently, other attempts and their lock files::

    runs/exp1/
      step-000000000120/
        manifest.json                      the commit record: present means committed
        3f0c...e1/                         the committed attempt's data (named by its save id)
          00000.safetensors
        9a4d...07.lock                     a live attempt holds an flock on this
        9a4d...07/                         that attempt's data, invisible until its manifest is published

Anything else is not ours and is never touched.
"""

from __future__ import annotations

import re
import uuid

from ._manifest import MANIFEST_NAME

__all__ = [
    "MANIFEST_NAME",
    "join",
    "lock_name",
    "new_save_id",
    "parse_attempt",
    "parse_step_dir",
    "step_dir",
]

_STEP_DIR = re.compile(r"^step-(\d{12,20})$")
_ATTEMPT = re.compile(r"^([0-9a-f]{32})(\.lock)?$")


def step_dir(step: int) -> str:
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a canonical step directory name; None for anything else (including non-canonical spellings)."""
    match = _STEP_DIR.match(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step_dir(step) == name else None


def new_save_id() -> str:
    return uuid.uuid4().hex


def lock_name(save_id: str) -> str:
    return f"{save_id}.lock"


def parse_attempt(name: str) -> tuple[str, bool] | None:
    """(save id, is lock file) for an attempt directory or lock file name; None for anything else."""
    match = _ATTEMPT.match(name)
    return (match.group(1), match.group(2) is not None) if match else None


def join(base: str, *names: str) -> str:
    return "/".join(part for part in (base, *names) if part)
