"""The state the reliability suite saves, and the checks it runs on whatever is left on disk.

The state of a step is a pure function of the step (its tensors' number, sizes and values come from a generator
seeded with it), so a checker can rebuild what any visible checkpoint must hold without trusting the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import safepoint
from safepoint._errors import SafepointError
from safepoint._gc import attempt_ids
from safepoint._layout import MANIFEST_NAME
from safepoint._reader import read_manifest
from safepoint._resolve import step_dirs
from safepoint._storage import LocalStorage
from safepoint._verify import verify_storage

__all__ = ["check_directory", "leftovers", "state_for"]


def state_for(step: int, max_elements: int = 1 << 14) -> dict[str, Any]:
    """1 to 6 float32 tensors of 1 to ``max_elements`` elements, plus plain progress values."""
    generator = torch.Generator().manual_seed(step)
    count = int(torch.randint(1, 7, (1,), generator=generator))
    tensors = {}
    for index in range(count):
        size = int(torch.randint(1, max_elements + 1, (1,), generator=generator))
        tensors[f"w{index}"] = torch.randn(size, generator=generator)
    return {"model": tensors, "progress": {"step": step, "tag": f"step {step}", "scale": step / 7}}


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, torch.Tensor):
        return (
            isinstance(actual, torch.Tensor)
            and actual.dtype == expected.dtype
            and actual.shape == expected.shape
            and torch.equal(actual.view(torch.int32), expected.view(torch.int32))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(_same(actual[k], expected[k]) for k in expected)
        )
    return type(actual) is type(expected) and bool(actual == expected)


def check_directory(root: Path, acked: list[int], max_elements: int = 1 << 14) -> list[str]:
    """What is wrong with a manager directory after a crash: each visible checkpoint must verify and hold exactly
    the state of its step; the newest acknowledged step must be visible. Returns the problems found."""
    problems: list[str] = []
    if not root.exists():
        return [f"{root} vanished"] if acked else []
    report = verify_storage(LocalStorage(root))
    good = set()
    for status in report.checkpoints:
        if not status.ok:
            problems.append(f"visible step {status.step} does not verify: {status.error}")
            continue
        try:
            values = safepoint.load(Path(status.path))
        except SafepointError as err:
            problems.append(f"visible step {status.step} verifies but does not load: {err}")
            continue
        if not _same(values, state_for(status.step, max_elements)):
            problems.append(f"visible step {status.step} holds values other than the ones saved for it")
            continue
        good.add(status.step)
    if acked and max(acked) not in good:
        problems.append(f"acknowledged step {max(acked)} is not restorable (valid: {sorted(good)})")
    return problems


def leftovers(root: Path) -> list[str]:
    """Staging that a manager opened on ``root`` should have collected: attempts other than the committed one,
    lock files, and step directories without a manifest."""
    storage = LocalStorage(root)
    found = []
    for step_dir in step_dirs(storage):
        path = step_dir.path
        names = set(storage.listdir(path))
        committed = MANIFEST_NAME in names
        keep = set()
        if committed:
            manifest = read_manifest(storage, path)
            keep = {MANIFEST_NAME, manifest.save_id}
        extra = sorted(names - keep)
        if extra:  # an empty uncommitted step directory may stay for gc.EMPTY_DIR_GRACE_S: it holds no bytes
            found.append(f"{path}: {extra} (attempts {sorted(attempt_ids(storage, path))})")
    return found


def tree_size(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_size
    return total
