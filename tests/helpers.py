"""Tools for tests that damage or forge checkpoints on disk.

They re-implement the documented on-disk format (canonical JSON, ``xxh3_64:<hex>`` checksums, safetensors
headers) instead of calling safepoint's own code, so a forged checkpoint passes every check except the one a test
is aimed at, and a bug in safepoint's checksum code cannot hide itself. The package never imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import struct
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import xxhash

MANIFEST = "manifest.json"


def xxh3(data: bytes) -> str:
    return "xxh3_64:" + xxhash.xxh3_64(data).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def seal(body: dict[str, Any]) -> bytes:
    """The bytes of a manifest whose embedded checksum matches ``body`` (any old checksum is replaced)."""
    content = {k: v for k, v in body.items() if k != "checksum"}
    content["checksum"] = xxh3(canonical(content).encode())
    return (canonical(content) + "\n").encode()


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((checkpoint / MANIFEST).read_bytes())
    return result


def write_manifest(checkpoint: Path, body: dict[str, Any]) -> None:
    (checkpoint / MANIFEST).write_bytes(seal(body))


def edit_manifest(checkpoint: Path, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``edit`` to the manifest body and write it back with a matching checksum."""
    body = read_manifest(checkpoint)
    edit(body)
    write_manifest(checkpoint, body)
    return body


def payload_paths(checkpoint: Path) -> list[Path]:
    return [checkpoint / record["path"] for record in read_manifest(checkpoint)["files"]]


def reseal_files(checkpoint: Path) -> None:
    """Make the manifest's sizes and checksums agree with the payload files as they now are on disk."""

    def refresh(body: dict[str, Any]) -> None:
        for record in body["files"]:
            data = (checkpoint / record["path"]).read_bytes()
            record["size"] = len(data)
            record["checksum"] = xxh3(data)

    edit_manifest(checkpoint, refresh)


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, data section) of a safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + length])
    return header, data[8 + length :]


def join_safetensors(header: dict[str, Any], section: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + section


# -- comparing values bit for bit ------------------------------------------------------------------------------
def tensor_bits(tensor: torch.Tensor) -> bytes:
    source = tensor.detach().cpu().resolve_conj().resolve_neg()
    # a fresh tensor has textbook strides (a one-element view can be "contiguous" with stride 2)
    flat = torch.empty(source.shape, dtype=source.dtype).copy_(source).reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """``actual`` equals ``expected`` exactly: container types, key types and order, dtypes, shapes and bits."""
    if isinstance(expected, torch.Tensor):
        assert type(actual) is torch.Tensor, f"{where}: {type(actual).__name__} is not a tensor"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device.type == "cpu", where
        assert tensor_bits(actual) == tensor_bits(expected), f"{where}: tensor bytes differ"
    elif isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray, f"{where}: {type(actual).__name__} is not an ndarray"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{where}: array bytes differ"
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{where}: {type(actual)} is not {type(expected)}"
        assert actual.dtype == expected.dtype, where
        assert actual.tobytes() == expected.tobytes(), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, float):
        assert type(actual) is float, f"{where}: {type(actual).__name__} is not a float"
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} is not nan"
        else:
            assert struct.pack("<d", actual) == struct.pack("<d", expected), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} is not {type(expected).__name__}"
        factory = getattr(expected, "default_factory", None)
        assert getattr(actual, "default_factory", None) is factory, f"{where}: default_factory is not {factory}"
        keys = [(type(k), k) for k in actual]
        assert keys == [(type(k), k) for k in expected], f"{where}: keys {list(actual)!r} != {list(expected)!r}"
        for key, value in expected.items():
            assert_same(actual[key], value, f"{where}/{key!r}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} is not {type(expected).__name__}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}/{index}")
    elif isinstance(expected, (set, frozenset)):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} is not {type(expected).__name__}"

        def split(items: Any) -> tuple[int, set[Any]]:  # a NaN never equals another: count them apart
            nans = [v for v in items if isinstance(v, float) and math.isnan(v)]
            return len(nans), {v for v in items if not (isinstance(v, float) and math.isnan(v))}

        assert split(actual) == split(expected), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, complex):
        assert type(actual) is complex, f"{where}: {type(actual).__name__} is not a complex"
        assert_same(actual.real, expected.real, f"{where}.real")
        assert_same(actual.imag, expected.imag, f"{where}.imag")
    elif isinstance(expected, (argparse.Namespace, types.SimpleNamespace)):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} is not {type(expected).__name__}"
        assert_same(vars(actual), vars(expected), where)
    else:
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} is not {type(expected).__name__}"
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# -- watching what the process does -----------------------------------------------------------------------------
_events: list[tuple[str, tuple[Any, ...]]] | None = None
_hooked = False
_WATCHED = ("open", "pickle.", "os.system", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _events is not None and event.startswith(_WATCHED):
        _events.append((event, args))


@contextlib.contextmanager
def audit_events() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record the audit events (``sys.addaudithook``) for opens, unpickling and process or code execution."""
    global _events, _hooked
    if not _hooked:
        sys.addaudithook(_hook)  # audit hooks cannot be removed: one for the session, inert outside this block
        _hooked = True
    events: list[tuple[str, tuple[Any, ...]]] = []
    _events = events
    try:
        yield events
    finally:
        _events = None


def end_rank() -> NoReturn:
    """End a rank's process once its results are written, without finalizing the interpreter, as the workers of
    tests/distributed do. Left to the exit, a gloo worker thread that still holds a collective's work (Accelerate
    and the Trainer gather through gloo) may release its tensors while CPython ends threads with
    ``pthread_exit``, which aborts the process in torch's noexcept destructor ("terminate called without an active
    exception", SIGABRT; see benchmarks/_ranks.py's ``end_rank``): a torchrun rank of
    tests/integrations/transformers/tiny.py did so in 1 of 10-16 runs. ``destroy_process_group()`` first is no
    way out: it joins that thread while holding the GIL the thread waits for (a hang, seen in gdb:
    ``~ProcessGroupGloo`` -> ``std::thread::join`` against ``~AsyncAllgatherWork`` -> ``gil_scoped_acquire``).
    torch's own report: pytorch/pytorch#190489 (open; the fix tried in #179291 was abandoned)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
