"""The read path: files read in parallel straight into the tensors' memory, and memory-mapped lazy loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safepoint
from safepoint.codec import encode_state
from safepoint.commit import plan_save
from safepoint.manager import commit_plan
from safepoint.reader import read_checkpoint
from safepoint.storage import LocalStorage
from tests.helpers import payload_paths
from tests.reliability.storage import FaultyStorage

ROOT = Path(__file__).resolve().parents[2]


def many_files(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint of four payload files (files cut at 1 MiB instead of SHARD_BYTES)."""
    state = {f"part{i}": torch.full((1 << 20,), float(i)) for i in range(4)}
    encoded = encode_state(state)
    plan = plan_save(encoded, checkpoint="", step=0, shard_bytes=1 << 20)
    commit_plan(LocalStorage(path), plan, [leaf.tensor for leaf in encoded.leaves])
    assert len(payload_paths(path)) == 4
    return state


def test_parallel_reads_return_every_file(tmp_path: Path) -> None:
    state = many_files(tmp_path / "ckpt")
    loaded = safepoint.load(tmp_path / "ckpt")
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_the_first_bad_file_in_manifest_order_is_named(tmp_path: Path) -> None:
    many_files(tmp_path / "ckpt")
    files = payload_paths(tmp_path / "ckpt")
    for bad in (files[1], files[3]):
        data = bytearray(bad.read_bytes())
        data[-1] ^= 0xFF
        bad.write_bytes(data)
    with pytest.raises(safepoint.CorruptCheckpointError) as caught:
        safepoint.load(tmp_path / "ckpt")
    assert caught.value.path == str(files[1])


@pytest.mark.parametrize("mmap", [False, True])
def test_loaded_tensors_are_views_of_the_file_buffer_not_copies(tmp_path: Path, mmap: bool) -> None:
    safepoint.save(tmp_path / "ckpt", {"a": torch.arange(1000.0), "b": torch.ones(10, dtype=torch.int64)})
    loaded = safepoint.load(tmp_path / "ckpt", mmap=mmap)
    # both tensors live in the one buffer the file was read into (or mapped from)
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    assert torch.equal(loaded["a"], torch.arange(1000.0))


def test_mmap_load_is_copy_on_write_and_leaves_the_file_intact(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"a": torch.arange(1000.0), "nested": {"n": torch.zeros(3)}})
    loaded = safepoint.load(tmp_path / "ckpt", mmap=True)
    assert torch.equal(loaded["a"], torch.arange(1000.0))
    loaded["a"].fill_(-1)  # a private mapping: the process's copy changes, the file does not
    assert safepoint.verify(tmp_path / "ckpt").ok
    assert torch.equal(safepoint.load(tmp_path / "ckpt", mmap=True)["a"], torch.arange(1000.0))


def test_mmap_load_verifies_every_byte_before_returning(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"a": torch.arange(1000.0)})
    (payload,) = payload_paths(tmp_path / "ckpt")
    data = bytearray(payload.read_bytes())
    data[-3] ^= 0x10
    payload.write_bytes(data)
    with pytest.raises(safepoint.CorruptCheckpointError, match="checksum"):
        safepoint.load(tmp_path / "ckpt", mmap=True)


def test_mmap_needs_local_storage(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"a": torch.arange(10.0)})
    storage = FaultyStorage(LocalStorage(tmp_path / "ckpt"))
    with pytest.raises(safepoint.ConfigError, match="local file system"):
        read_checkpoint(storage, "", mmap=True)  # type: ignore[arg-type]


PROBE = """
import json, sys, torch, safepoint
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon")
before = anon()
loaded = safepoint.load(sys.argv[1], mmap=sys.argv[2] == "1")
total = float(sum(t.double().sum() for t in loaded["w"]))   # touch every page
print(json.dumps({"extra": anon() - before, "total": total}))
"""


def test_mmap_load_keeps_the_data_out_of_the_process_memory(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"w": [torch.full((1 << 20,), 1.0) for _ in range(32)]})  # 128 MiB
    extra = {}
    for mmap in ("0", "1"):
        result = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path / "ckpt"), mmap],
            cwd=ROOT, capture_output=True, text=True, timeout=240, check=True,
        )  # fmt: skip
        numbers = json.loads(result.stdout)
        assert numbers["total"] == 32 * (1 << 20)
        extra[mmap] = numbers["extra"]
    assert extra["0"] > 120 << 20  # an eager load holds the bytes in anonymous memory
    assert extra["1"] < 48 << 20  # a mapped one holds them in the page cache
