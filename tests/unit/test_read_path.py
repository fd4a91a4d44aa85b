"""The read path: files read in parallel straight into memory that each tensor owns, and memory-mapped loading.

Invariant defended: every byte is verified before a value reaches the caller, and what the caller receives is safe
to hand to any torch API: each tensor owns a fresh, aligned allocation of its own size (issue 10: views into one
file buffer crashed ``torch.set_rng_state`` and kept the whole file alive)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safepoint
from safepoint._pipeline import save_to
from safepoint._reader import read_checkpoint
from safepoint._storage import LocalStorage
from safepoint._storage.base import SequentialReads
from tests.helpers import assert_same, join_safetensors, payload_paths, reseal_files, split_safetensors
from tests.reliability.storage import FaultyStorage

ROOT = Path(__file__).resolve().parents[2]


def many_files(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint of four payload files (files cut at 1 MiB instead of SHARD_BYTES)."""
    state = {f"part{i}": torch.full((1 << 20,), float(i)) for i in range(4)}
    storage = LocalStorage(path)
    storage.shard_bytes = 1 << 20
    save_to(storage, "", 0, state, metrics=None, state_version=1)
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


def test_mapped_tensors_are_views_of_the_mapping(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"a": torch.arange(1000.0), "b": torch.ones(10, dtype=torch.int64)})
    loaded = safepoint.load(tmp_path / "ckpt", mmap=True)
    # mmap=True keeps the values in the page cache: both tensors are views of the one mapping, as documented
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


# -- owned tensors (issue 10) -------------------------------------------------------------------------------------
def _mixed() -> dict[str, Any]:
    """Sizes on both sides of the direct-read threshold, odd sizes and several dtypes, so most values would sit at
    unaligned offsets of a shared buffer."""
    return {
        "big": torch.randn(3 << 18),  # 3 MiB: read straight into its own memory
        "odd": torch.arange(7, dtype=torch.int16),
        "rng": torch.get_rng_state(),  # uint8, 5056 bytes
        "half": torch.randn(5, 3).half(),
        "f64": torch.randn(13, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "arr": np.arange(9, dtype=np.int32).reshape(3, 3),
        "big_u8": torch.randint(0, 255, ((1 << 20) + 3,), dtype=torch.uint8),
    }


def _assert_owned(tensor: torch.Tensor, key: str) -> None:
    storage = tensor.untyped_storage()
    assert tensor.storage_offset() == 0, key
    assert storage.nbytes() == tensor.numel() * tensor.element_size(), key
    assert tensor.is_contiguous(), key
    if tensor.numel():
        assert tensor.data_ptr() % 64 == 0, f"{key} at {tensor.data_ptr() % 64} mod 64"  # as torch.empty aligns


def test_loaded_tensors_own_their_memory(tmp_path: Path) -> None:
    state = _mixed()
    safepoint.save(tmp_path / "ckpt", state)
    loaded = safepoint.load(tmp_path / "ckpt")
    assert_same(loaded, state)
    pointers = []
    for key, value in loaded.items():
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        _assert_owned(tensor, key)
        if tensor.numel():
            pointers.append(tensor.untyped_storage().data_ptr())
    assert len(set(pointers)) == len(pointers) == len(loaded) - 1  # each its own memory; the empty one has none


def test_a_backend_without_sequential_reads_also_gives_owned_tensors(tmp_path: Path) -> None:
    state = _mixed()
    safepoint.save(tmp_path / "ckpt", state)
    storage = FaultyStorage(LocalStorage(tmp_path / "ckpt"))  # only the Storage protocol: no open_reader
    assert not isinstance(storage, SequentialReads)
    leaves = read_checkpoint(storage, "").leaves  # type: ignore[arg-type]
    for index, value in enumerate(leaves):
        _assert_owned(torch.from_numpy(value) if isinstance(value, np.ndarray) else value, str(index))


def test_restored_optimizer_state_owns_its_memory(tmp_path: Path) -> None:
    model = torch.nn.Linear(7, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 7)).sum().backward()
    optimizer.step()
    safepoint.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer})
    fresh = torch.nn.Linear(7, 3)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    safepoint.restore(tmp_path / "ckpt", {"model": fresh, "optimizer": fresh_optimizer})
    # Adam keeps the tensors that load_state_dict receives: those are the read path's own
    for index, state in enumerate(fresh_optimizer.state.values()):
        for name, value in state.items():
            _assert_owned(value, f"{index}/{name}")


SET_RNG = """
import sys, torch, safepoint
state = safepoint.load(sys.argv[1])
torch.set_rng_state(state["rng"]["cpu"])
print(float(torch.rand(())))
"""


def test_a_loaded_rng_state_can_be_set(tmp_path: Path) -> None:
    # a view at an offset of the file buffer made torch.set_rng_state crash the process (exit 139)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    expected = float(torch.rand(()))
    safepoint.save(tmp_path / "ckpt", {"x": torch.ones(1001), "n": torch.arange(3, dtype=torch.int16),
                                       "rng": {"cpu": rng}})  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SET_RNG, str(tmp_path / "ckpt")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert float(result.stdout) == expected


def test_a_loaded_tensor_does_not_keep_the_rest_of_the_file_alive(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "ckpt", {"big": torch.zeros(1 << 20), "small": torch.ones(3)})
    small = safepoint.load(tmp_path / "ckpt")["small"]
    assert small.untyped_storage().nbytes() == 12  # not the 4 MiB file buffer


def _lbfgs_run(path: Path, steps_before: int, steps_after: int, resume: bool) -> list[float]:
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 40), torch.randn(64, 2)

    def fresh() -> tuple[torch.nn.Module, torch.optim.LBFGS]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        return model, torch.optim.LBFGS(model.parameters(), lr=0.1, history_size=4, max_iter=3)

    def step(model: torch.nn.Module, optimizer: torch.optim.LBFGS) -> float:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            return loss

        return float(optimizer.step(closure).detach())  # type: ignore[union-attr]

    model, optimizer = fresh()
    losses = [step(model, optimizer) for _ in range(steps_before)]
    if resume:
        safepoint.save(path, {"model": model, "optimizer": optimizer})
        model, optimizer = fresh()
        safepoint.restore(path, {"model": model, "optimizer": optimizer})
    losses += [step(model, optimizer) for _ in range(steps_after)]
    return losses + [float(p.detach().double().sum()) for p in model.parameters()]


def test_lbfgs_resumed_through_restore_continues_bitwise(tmp_path: Path) -> None:
    assert _lbfgs_run(tmp_path / "ckpt", 3, 4, resume=True) == _lbfgs_run(tmp_path / "ckpt", 3, 4, resume=False)


# -- the header is checked before anything is allocated, and every byte is hashed ------------------------------------
def _with_gap(path: Path) -> tuple[Path, dict[str, Any]]:
    """A valid file from another writer: padding between the tensors (safepoint's own files have none)."""
    state = {"w": torch.arange(6.0), "b": torch.arange(4, dtype=torch.int64)}
    safepoint.save(path, state)
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    spans = {name: header[name]["data_offsets"] for name in ("w", "b")}
    parts, offset = [], 0
    for name, (begin, end) in sorted(spans.items()):
        parts.append(b"\xab" * 8 + section[begin:end])
        header[name]["data_offsets"] = [offset + 8, offset + 8 + end - begin]
        offset += 8 + end - begin
    file.write_bytes(join_safetensors(header, b"".join(parts) + b"\xcd" * 5))
    reseal_files(path)
    return file, state


def test_padding_between_values_is_read_and_hashed(tmp_path: Path) -> None:
    file, state = _with_gap(tmp_path / "ckpt")
    assert_same(safepoint.load(tmp_path / "ckpt"), state)
    data = bytearray(file.read_bytes())
    data[data.index(b"\xab" * 8) + 3] ^= 1  # damage in the padding, outside every value
    file.write_bytes(data)
    with pytest.raises(safepoint.CorruptCheckpointError, match="checksum"):
        safepoint.load(tmp_path / "ckpt")
    assert not safepoint.verify(tmp_path / "ckpt").ok


def test_overlapping_values_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    safepoint.save(path, {"a": torch.arange(4.0), "b": torch.arange(4.0)})
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    header["b"]["data_offsets"] = [8, 24]  # half inside "a"
    file.write_bytes(join_safetensors(header, section))
    reseal_files(path)
    with pytest.raises(safepoint.CorruptCheckpointError, match="overlap"):
        safepoint.load(path)


def test_a_damaged_header_is_reported_as_damage(tmp_path: Path) -> None:
    # the header is parsed before the checksum is known: a flipped bit there must still read as corruption
    path = tmp_path / "ckpt"
    safepoint.save(path, {"a": torch.arange(4.0)})
    (file,) = payload_paths(path)
    data = bytearray(file.read_bytes())
    data[9] ^= 0x40  # inside the JSON header
    file.write_bytes(data)
    with pytest.raises(safepoint.CorruptCheckpointError, match="checksum"):
        safepoint.load(path)


def test_a_file_that_ends_during_the_read_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    safepoint.save(path, {"a": torch.zeros(1 << 20)})
    (file,) = payload_paths(path)
    storage = LocalStorage(path)
    reader = storage.open_reader(file.name if file.parent == path else str(file.relative_to(path)))
    try:
        reader.readinto([memoryview(bytearray(10)), memoryview(bytearray(file.stat().st_size - 11))])
        with pytest.raises(safepoint.StorageError, match="ended early") as caught:
            reader.readinto([memoryview(bytearray(1)), memoryview(bytearray(1))])
        assert caught.value.errno == errno.EIO
    finally:
        reader.close()


def test_loading_from_an_object_store_gives_owned_tensors() -> None:
    state = _mixed()
    url = "memory://read-path/owned"
    safepoint.save(url, state)
    loaded = safepoint.load(url)
    assert_same(loaded, state)
    for key, value in loaded.items():
        _assert_owned(torch.from_numpy(value) if isinstance(value, np.ndarray) else value, key)


def test_object_store_reads_split_values_across_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    # ranged requests of 1000 bytes: most values, and the header, straddle two or more of them
    monkeypatch.setattr(safepoint._storage.fsspec, "_READ_CHUNK", 1000)
    state = _mixed()
    url = "memory://read-path/split"
    safepoint.save(url, state)
    assert_same(safepoint.load(url), state)
