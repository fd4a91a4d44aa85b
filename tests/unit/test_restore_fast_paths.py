"""The read path's speed work keeps restore exact and total-or-nothing (issue 10's read-path targets).

Each test here pins a way an optimisation of the restore path could go wrong: the check after an object's
``load_state_dict`` compares bits in words, the collector is paused only for the restore, ...
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint._pipeline import save_to
from safepoint._reader import READER_THREADS, read_checkpoint, read_manifest
from safepoint._restore import copied_entries
from safepoint._storage import LocalStorage
from tests.helpers import payload_paths


class Alters:
    """An object whose first load_state_dict keeps the data changed by ``change`` (a bug the check must catch)."""

    def __init__(self, value: torch.Tensor, change: Callable[[torch.Tensor], None] = lambda t: None) -> None:
        self.value, self.change = value, change
        self.gc_enabled_in_load: bool | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gc_enabled_in_load = gc.isenabled()
        self.value = state["value"].clone()
        self.change(self.value)
        self.change = lambda t: None  # once: the rollback's load_state_dict restores faithfully


def _flip_last_byte(tensor: torch.Tensor) -> None:
    tensor.view(-1).view(torch.uint8)[-1] ^= 1


@pytest.mark.parametrize(
    ("saved", "change"),
    [
        # bits differ, values compare equal: -0.0 == 0.0
        (torch.zeros(8), lambda t: t.neg_()),
        # the last byte of sizes that fit int64, int32, int16 and only uint8 words
        (torch.arange(16, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(12, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(6, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(5, dtype=torch.uint8), _flip_last_byte),
        (torch.arange(3, dtype=torch.int16), _flip_last_byte),
    ],
)
def test_the_check_after_load_state_dict_compares_every_bit(
    tmp_path: Path, saved: torch.Tensor, change: Callable[[torch.Tensor], None]
) -> None:
    safepoint.save(tmp_path / "c", {"obj": Alters(saved), "t": torch.ones(2)})
    live = {"obj": Alters(torch.full_like(saved, 7), change), "t": torch.zeros(2)}
    with pytest.raises(safepoint.RestoreError, match=r"obj/value: differs from the checkpoint"):
        safepoint.restore(tmp_path / "c", live)
    assert torch.equal(live["obj"].value, torch.full_like(saved, 7))  # rolled back
    assert torch.equal(live["t"], torch.zeros(2))
    safepoint.restore(tmp_path / "c", live)  # the same bits pass
    assert torch.equal(live["obj"].value.view(torch.uint8), saved.view(torch.uint8))


def test_the_check_compares_a_view_at_an_odd_offset(tmp_path: Path) -> None:
    """A live tensor whose bytes start at an odd offset of its storage is compared byte by byte, not skipped."""
    base = torch.arange(9, dtype=torch.uint8)
    safepoint.save(tmp_path / "c", {"obj": Alters(base[1:].clone())})
    odd = torch.zeros(9, dtype=torch.uint8)[1:]
    live = Alters(odd, _flip_last_byte)
    live.value = odd

    def keep_a_view(state: dict[str, Any]) -> None:
        storage = torch.empty(9, dtype=torch.uint8)
        storage[1:] = state["value"]
        storage[-1] ^= 1
        live.value = storage[1:]  # storage offset 1: no word view fits

    live.load_state_dict = keep_a_view  # type: ignore[method-assign]
    with pytest.raises(safepoint.RestoreError, match=r"obj/value: differs"):
        safepoint.restore(tmp_path / "c", {"obj": live})


def test_the_collector_is_paused_during_a_restore_and_enabled_after(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"obj": Alters(torch.ones(3))})
    live = Alters(torch.zeros(3))
    assert gc.isenabled()
    safepoint.restore(tmp_path / "c", {"obj": live})
    assert live.gc_enabled_in_load is False
    assert gc.isenabled()
    failing = Alters(torch.zeros(3), lambda t: t.add_(1))
    with pytest.raises(safepoint.RestoreError):
        safepoint.restore(tmp_path / "c", {"obj": failing})
    assert gc.isenabled()  # enabled again after a failed restore too


def test_a_collector_the_caller_disabled_stays_disabled(tmp_path: Path) -> None:
    safepoint.save(tmp_path / "c", {"obj": Alters(torch.ones(3))})
    gc.disable()
    try:
        safepoint.restore(tmp_path / "c", {"obj": Alters(torch.zeros(3))})
        safepoint.load(tmp_path / "c")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_manager_restore_pauses_the_collector(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, {"obj": Alters(torch.ones(3))})
        live = Alters(torch.zeros(3))
        manager.restore({"obj": live})
    assert live.gc_enabled_in_load is False
    assert gc.isenabled()


# -- copied entries: small values read into one shared buffer, copied into the live tensors, dropped ---------------
def _save_in_files(path: Path, state: dict[str, Any], file_bytes: int) -> list[Path]:
    """Save ``state`` cut into payload files of about ``file_bytes``; the payload files in manifest order."""
    storage = LocalStorage(path)
    storage.shard_bytes = file_bytes
    save_to(storage, "", 0, state, metrics=None, state_version=1)
    return payload_paths(path)


def _owns_its_memory(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def small_tensors(count: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.float64, torch.int16, torch.uint8, torch.bfloat16, torch.bool)
    return {
        f"t{i}": torch.randint(0, 2 if dtypes[i % 6] is torch.bool else 100, (i % 5 + 1, 3), generator=generator).to(
            dtypes[i % 6]
        )
        for i in range(count)
    }


def test_copied_values_restore_exactly_into_tensors_of_every_layout(tmp_path: Path) -> None:
    saved = {"plain": small_tensors(40, seed=0), "nested": [small_tensors(3, seed=1), (torch.arange(6.0),)]}
    safepoint.save(tmp_path / "c", saved)
    live_plain = {k: torch.zeros_like(v) for k, v in saved["plain"].items()}
    wide = torch.zeros(6, 4)
    strided = wide[:, 1]  # a non-contiguous target: stride 4
    live_plain["t0"] = torch.zeros(3, 1).t()  # shape (1, 3) with strides (1, 1)
    live_plain["t2"] = torch.zeros(3, 3, dtype=torch.int16).t()  # transposed: not contiguous
    nested_first = {k: torch.zeros_like(v) for k, v in saved["nested"][0].items()}
    live: dict[str, Any] = {"plain": live_plain, "nested": [nested_first, (strided,)]}
    safepoint.restore(tmp_path / "c", live)
    for key, value in saved["plain"].items():
        assert torch.equal(live_plain[key], value), key
    for key, value in saved["nested"][0].items():
        assert torch.equal(nested_first[key], value), key
    assert torch.equal(strided, torch.arange(6.0))
    assert torch.equal(wide[:, 0], torch.zeros(6))  # nothing around the strided target was written
    assert torch.equal(wide[:, 2:], torch.zeros(6, 2))


def test_values_that_something_keeps_own_their_memory(tmp_path: Path) -> None:
    """Values next to copied ones in the same file, restored into a Replace, a Pickled, an object and a list
    that is replaced whole, are owned: none shares a hidden buffer with another."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = {
        "plain": small_tensors(20, seed=2),
        "history": {"a": torch.arange(3.0), "b": torch.arange(5)},
        "opt": optimizer,
        "kept": safepoint.Pickled(None),
        "listed": [],
        "inner": {"p": torch.ones(4), "q": torch.arange(2.0)},
    }
    saved["kept"].value = torch.arange(4.0)
    saved["listed"] = []
    safepoint.save(tmp_path / "c", saved)
    history: dict[str, Any] = {}
    fresh = torch.nn.Linear(3, 2)
    live_opt = torch.optim.Adam(fresh.parameters())
    kept = safepoint.Pickled(None)
    live = {
        "plain": {k: torch.zeros_like(v) for k, v in saved["plain"].items()},
        "history": safepoint.Replace(history),
        "opt": live_opt,
        "kept": kept,
        "listed": [],
        "inner": {"p": torch.zeros(4), "q": None},  # q: a None restored by assignment, so the value is kept
    }
    safepoint.restore(tmp_path / "c", live)
    kept_values = [history["a"], history["b"], live["inner"]["q"]]
    kept_values += [t for s in live_opt.state_dict()["state"].values() for t in s.values() if t.dim()]
    assert len(kept_values) == 7
    for tensor in kept_values:
        assert _owns_its_memory(tensor), tensor
    assert torch.equal(history["a"], torch.arange(3.0))
    assert torch.equal(live["inner"]["q"], torch.arange(2.0))
    assert torch.equal(live["inner"]["p"], torch.ones(4))


def test_a_damaged_last_file_leaves_every_target_untouched(tmp_path: Path) -> None:
    state = {f"e{i}": small_tensors(30, seed=i) for i in range(4)}
    files = _save_in_files(tmp_path / "c", state, file_bytes=1 << 10)
    assert len(files) >= 4
    data = bytearray(files[-1].read_bytes())
    data[-1] ^= 0xFF
    files[-1].write_bytes(data)
    live = {entry: {k: torch.full_like(v, 7) for k, v in values.items()} for entry, values in state.items()}
    with pytest.raises(safepoint.CorruptCheckpointError):
        safepoint.restore(tmp_path / "c", live)
    for values in live.values():
        for key, tensor in values.items():
            assert torch.equal(tensor, torch.full_like(tensor, 7)), key


def test_a_mismatch_after_the_read_leaves_every_target_untouched(tmp_path: Path) -> None:
    state = {"a": small_tensors(30, seed=3), "b": {"x": torch.ones(3)}}
    safepoint.save(tmp_path / "c", state)
    live: dict[str, Any] = {"a": {k: torch.full_like(v, 7) for k, v in state["a"].items()}, "b": {"x": torch.ones(4)}}
    with pytest.raises(safepoint.RestoreError, match="b/x"):
        safepoint.restore(tmp_path / "c", live)
    for key, tensor in live["a"].items():
        assert torch.equal(tensor, torch.full_like(tensor, 7)), key


def test_only_plain_tensor_entries_under_plain_containers_are_copied(tmp_path: Path) -> None:
    tied = torch.arange(6.0)
    saved: dict[str, Any] = {
        "plain": {"w": torch.ones(2), "deep": [torch.zeros(1), (torch.ones(3),)]},
        "module": torch.nn.Linear(2, 2),
        "replaced": {"r": torch.ones(2)},
        "pickled": safepoint.Pickled(torch.ones(1)),
        "tied": {"a": tied, "b": tied[2:]},
        "short": [torch.ones(1)],
        "param": {"p": torch.ones(2)},
        "array": {"n": torch.ones(2)},
    }
    safepoint.save(tmp_path / "c", saved)

    class Sub(torch.Tensor):
        pass

    live: dict[str, Any] = {
        "plain": {"w": torch.zeros(2), "deep": [torch.zeros(1), (torch.zeros(3),)]},
        "module": torch.nn.Linear(2, 2),
        "replaced": safepoint.Replace({}),
        "pickled": safepoint.Pickled(None),
        "tied": {"a": torch.zeros(6), "b": torch.zeros(4)},
        "short": [],
        "param": {"p": torch.nn.Parameter(torch.zeros(2))},
        "array": {"n": torch.zeros(2).as_subclass(Sub)},
    }
    manifest = read_manifest(LocalStorage(tmp_path / "c"), "")
    found = copied_entries(manifest.tree, live)
    copied = {manifest.entries[i].key for i in found.shareable()}
    assert copied == {"plain/w", "plain/deep/0", "plain/deep/1/0", "param/p"}
    # a module's values are read into its own tensors, or own their memory: its load_state_dict receives them
    assert {manifest.entries[i].key for i in found.given} == {"module/weight", "module/bias"}
    assert found[next(i for i in found.given if manifest.entries[i].key == "module/weight")] is live["module"].weight


# -- prefetch: the disk starts on the first payload files while the manifest is parsed -------------------------------
class RecordingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.prefetched: list[str] = []

    def prefetch(self, path: str) -> None:
        self.prefetched.append(path)
        super().prefetch(path)


def test_the_first_payload_files_are_prefetched_before_they_are_read(tmp_path: Path) -> None:
    state = {f"e{i}": {"t": torch.full((64,), float(i))} for i in range(6)}
    files = _save_in_files(tmp_path / "c", state, file_bytes=64)
    assert len(files) == 6
    storage = RecordingStorage(tmp_path / "c")
    loaded = read_checkpoint(storage, "")
    names = [str(path.relative_to(tmp_path / "c")) for path in files]
    assert storage.prefetched == names[:READER_THREADS]
    assert [loaded.manifest.files[i].path for i in range(READER_THREADS)] == storage.prefetched
    storage.prefetched.clear()
    read_manifest(storage, "")  # listing checkpoints reads manifests only: no hint
    assert storage.prefetched == []


def test_a_prefetch_of_a_missing_or_odd_file_is_silent(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    for name in ("missing", "dir", "link", "link/x"):
        storage.prefetch(name)


def test_a_missing_payload_file_is_still_reported_by_name(tmp_path: Path) -> None:
    files = _save_in_files(tmp_path / "c", {"a": {"t": torch.ones(64)}, "b": {"t": torch.ones(64)}}, file_bytes=64)
    files[0].unlink()
    live = {"a": {"t": torch.zeros(64)}, "b": {"t": torch.zeros(64)}}
    with pytest.raises(safepoint.CorruptCheckpointError, match="is missing") as caught:
        safepoint.restore(tmp_path / "c", live)
    assert caught.value.path == str(files[0])
    assert torch.equal(live["b"]["t"], torch.zeros(64))
