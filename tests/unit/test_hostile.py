"""Hostile checkpoints: pickle payloads, paths out of the root, symlinks, absurd sizes.

Invariant defended: *no code runs on load* (nothing is unpickled without an explicit opt-in; paths in a manifest
can never escape the checkpoint root), with a clear error naming the problem and no huge allocation. Each hostile
checkpoint is forged from a real one with every checksum recomputed (tests/helpers.py), so the defence under test
is the one that fires; canary files and audit hooks show that nothing ran and nothing outside was opened.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import runpy
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint import CorruptCheckpointError, RestoreError, UnsafeCheckpointError
from tests.helpers import (
    audit_events,
    edit_manifest,
    join_safetensors,
    payload_paths,
    read_manifest,
    reseal_files,
    split_safetensors,
    tensor_bits,
    xxh3,
)


class _Reduce:
    """Pickles as a call of ``function(*args)``: what a malicious pickle does when it is loaded."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.function, self.args


def _evil(kind: str, canary: Path) -> Any:
    code = f"open({str(canary)!r}, 'w').close()"
    if kind == "os.system":
        return _Reduce(os.system, f"touch {shlex.quote(str(canary))}")
    if kind == "subprocess":
        return _Reduce(subprocess.call, [sys.executable, "-c", code])
    if kind == "eval":
        return _Reduce(eval, code)
    if kind == "exec":
        return _Reduce(builtins.exec, code)
    script = canary.with_name("evil_script.py")
    script.write_text(code)
    return _Reduce(runpy.run_path, str(script))


KINDS = ["os.system", "subprocess", "eval", "exec", "runpy"]


def _payload(kind: str, canary: Path) -> bytes:
    if kind == "protocol 0 by hand":
        return b"cposix\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR."
    return pickle.dumps(_evil(kind, canary))


def _ran_nothing(events: list[tuple[str, tuple[Any, ...]]]) -> None:
    ran = [e for e, _ in events if e != "open"]
    assert ran == [], f"unpickling or process creation happened: {ran}"


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    return tmp_path / "canary"


@pytest.mark.parametrize("kind", [*KINDS, "protocol 0 by hand"])
def test_the_payloads_are_live(canary: Path, kind: str) -> None:
    # the control: each payload does create the canary when something unpickles it
    pickle.loads(_payload(kind, canary))
    assert canary.exists()


# -- (b) an entry saved with safepoint.Pickled ----------------------------------------------------------------------
@pytest.fixture(params=KINDS)
def pickled(request: pytest.FixtureRequest, tmp_path: Path, canary: Path) -> Path:
    path = tmp_path / "checkpoint"
    state = {"w": torch.ones(2), "cfg": {"inner": [safepoint.Pickled(_evil(request.param, canary))]}}
    safepoint.save(path, state)
    assert not canary.exists()
    return path


KEY = "cfg/inner/0"


def test_a_pickled_entry_is_not_loaded_without_opt_in(pickled: Path, canary: Path) -> None:
    for allow in (False, [], ["cfg/inner/1"], ["cf"], ["cfg/inner/0/x"], ["w"]):
        with audit_events() as events, pytest.raises(UnsafeCheckpointError) as info:
            safepoint.load(pickled, allow_pickle=allow)
        assert repr(KEY) in str(info.value)
        _ran_nothing(events)
        assert not canary.exists()


@pytest.mark.parametrize("live_value", [0, None, "text", torch.zeros(3), {"x": 1}, [0]], ids=repr)
def test_restore_into_a_plain_value_does_not_unpickle(pickled: Path, canary: Path, live_value: Any) -> None:
    live = {"w": torch.zeros(2), "cfg": {"inner": [live_value]}}
    weights = live["w"]
    with audit_events() as events, pytest.raises((RestoreError, UnsafeCheckpointError)) as info:
        safepoint.restore(pickled, live)
    assert KEY in str(info.value)
    _ran_nothing(events)
    assert not canary.exists()
    assert live["w"] is weights
    assert tensor_bits(weights) == tensor_bits(torch.zeros(2)), "nothing is applied when anything fails"
    assert live["cfg"]["inner"][0] is live_value


def test_restore_without_the_pickled_entry_leaves_it_alone(pickled: Path, canary: Path) -> None:
    live = {"w": torch.zeros(2)}
    with audit_events() as events:
        report = safepoint.restore(pickled, live, strict=False)
    _ran_nothing(events)
    assert not canary.exists()
    assert report.unexpected == ("cfg",)
    assert tensor_bits(live["w"]) == tensor_bits(torch.ones(2))


def test_verify_does_not_unpickle(pickled: Path, canary: Path) -> None:
    with audit_events() as events:
        assert safepoint.verify(pickled).ok
    _ran_nothing(events)
    assert not canary.exists()


def test_opting_in_does_unpickle(pickled: Path, canary: Path) -> None:
    # the control for this checkpoint: its payload is live, so the tests above would see it run
    safepoint.load(pickled, allow_pickle=[KEY])
    assert canary.exists()


# -- (a) pickle bytes written into a payload file ------------------------------------------------------------------
@pytest.fixture(params=[*KINDS, "protocol 0 by hand"])
def smuggled(request: pytest.FixtureRequest, tmp_path: Path, canary: Path) -> tuple[Path, bytes]:
    """A checkpoint whose tensor "weights" holds a pickle payload; every checksum matches."""
    payload = _payload(request.param, canary)
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"weights": torch.zeros(len(payload), dtype=torch.uint8), "bias": torch.ones(3)})
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    begin, end = header["weights"]["data_offsets"]
    file.write_bytes(join_safetensors(header, section[:begin] + payload + section[end:]))
    reseal_files(path)
    return path, payload


def test_pickle_bytes_in_a_tensor_are_only_data(smuggled: tuple[Path, bytes], canary: Path) -> None:
    path, payload = smuggled
    with audit_events() as events:
        loaded = safepoint.load(path)
        live = {"weights": torch.zeros(len(payload), dtype=torch.uint8), "bias": torch.zeros(3)}
        safepoint.restore(path, live)
    _ran_nothing(events)
    assert not canary.exists()
    assert tensor_bits(loaded["weights"]) == payload
    assert tensor_bits(live["weights"]) == payload


def _as_pickle_entry(body: dict[str, Any]) -> None:
    entry = next(e for e in body["entries"] if e["key"] == "weights")
    entry["kind"] = "pickle"
    node = next(n for k, n in body["tree"]["v"] if k == "weights")
    node["k"] = "pickle"


def test_a_forged_pickle_entry_is_not_loaded_without_opt_in(smuggled: tuple[Path, bytes], canary: Path) -> None:
    path, payload = smuggled
    edit_manifest(path, _as_pickle_entry)
    for allow in (False, ["bias"], ["weight"]):
        with audit_events() as events, pytest.raises(UnsafeCheckpointError) as info:
            safepoint.load(path, allow_pickle=allow)
        assert "'weights'" in str(info.value)
        _ran_nothing(events)
    for live_value in (torch.zeros(len(payload), dtype=torch.uint8), 0, None):
        live = {"weights": live_value, "bias": torch.zeros(3)}
        with audit_events() as events, pytest.raises((RestoreError, UnsafeCheckpointError)) as failure:
            safepoint.restore(path, live)
        assert "weights" in str(failure.value)
        _ran_nothing(events)
        assert tensor_bits(live["bias"]) == tensor_bits(torch.zeros(3))
    assert not canary.exists()


def test_a_forged_entry_key_cannot_borrow_an_opt_in(smuggled: tuple[Path, bytes], canary: Path) -> None:
    # the entry sits at "weights" but claims the key "trusted", which the caller allowed to unpickle
    path, _ = smuggled

    def forge(body: dict[str, Any]) -> None:
        _as_pickle_entry(body)
        next(e for e in body["entries"] if e["key"] == "weights")["key"] = "trusted"

    edit_manifest(path, forge)
    with audit_events() as events, pytest.raises(CorruptCheckpointError):
        safepoint.load(path, allow_pickle=["trusted"])
    _ran_nothing(events)
    assert not canary.exists()


def test_an_object_array_entry_is_refused(smuggled: tuple[Path, bytes], canary: Path) -> None:
    path, _ = smuggled

    def forge(body: dict[str, Any]) -> None:
        entry = next(e for e in body["entries"] if e["key"] == "weights")
        entry["kind"], entry["dtype"] = "ndarray", "O"
        next(n for k, n in body["tree"]["v"] if k == "weights")["k"] = "ndarray"

    edit_manifest(path, forge)
    with audit_events() as events, pytest.raises(CorruptCheckpointError) as info:
        safepoint.load(path)
    assert "dtype" in str(info.value)
    _ran_nothing(events)
    assert not canary.exists()


def test_a_torch_save_file_in_place_of_the_payload_is_refused(tmp_path: Path, canary: Path) -> None:
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"w": torch.ones(3)})
    (file,) = payload_paths(path)
    torch.save({"w": _evil("eval", canary)}, file)
    reseal_files(path)
    with audit_events() as events, pytest.raises(CorruptCheckpointError) as info:
        safepoint.load(path)
    assert info.value.path == str(file)
    _ran_nothing(events)
    assert not canary.exists()


@pytest.mark.parametrize("kind", [*KINDS, "protocol 0 by hand"])
@pytest.mark.parametrize("target", ["manifest", "payload", "lock"])
def test_a_pickle_in_place_of_any_file_runs_nothing(tmp_path: Path, canary: Path, kind: str, target: str) -> None:
    """Every file a checkpoint directory can hold, replaced by a live pickle: every reader refuses or ignores it."""
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"w": torch.ones(3)})
    (payload,) = payload_paths(path)
    files = {"manifest": path / "manifest.json", "payload": payload, "lock": payload.parent.with_suffix(".lock")}
    files[target].write_bytes(_payload(kind, canary))
    if target == "payload":
        reseal_files(path)  # the checksum matches: the payload parser itself must refuse it
    with audit_events() as events:
        for read in (safepoint.load, lambda p: safepoint.restore(p, {"w": torch.zeros(3)})):
            if target == "lock":
                read(path)  # never opened by a reader: the checkpoint loads
            else:
                with pytest.raises(CorruptCheckpointError):
                    read(path)
        report = safepoint.verify(path)
        assert report.ok is (target == "lock")
        safepoint.CheckpointManager(tmp_path / "elsewhere").close()
    _ran_nothing(events)
    assert not canary.exists()


# -- paths out of the root ------------------------------------------------------------------------------------------
@pytest.fixture
def victim(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint at root/checkpoint and, outside it, a valid copy of its payload at root/outside.safetensors.

    A reader that followed a manifest path to the copy would find exactly the bytes the manifest promises."""
    path = tmp_path / "root" / "checkpoint"
    safepoint.save(path, {"w": torch.arange(4.0)})
    outside = tmp_path / "root" / "outside.safetensors"
    shutil.copy(payload_paths(path)[0], outside)
    return path, outside


BAD_PATHS = [
    "../outside.safetensors",
    "{outside}",  # the absolute path of the copy
    "x/../../outside.safetensors",
    "..",
    "a\x00b",
    "x" * 10_000,
    "a//b",
    "",
    "/",
    "a/",
    "./outside.safetensors",
    "..\\outside.safetensors",
    "\u2024\u2024/outside",  # one-dot leaders, which look like ".."
]


def _opened(events: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    return [os.fsdecode(args[0]) for event, args in events if event == "open" and isinstance(args[0], (str, bytes))]


@pytest.mark.parametrize("bad", BAD_PATHS, ids=[repr(p[:30]) for p in BAD_PATHS])
def test_a_path_out_of_the_root_is_refused_before_any_read(victim: tuple[Path, Path], bad: str) -> None:
    path, outside = victim
    bad = bad.replace("{outside}", str(outside))
    edit_manifest(path, lambda body: body["files"][0].update(path=bad))
    with audit_events() as events, pytest.raises(UnsafeCheckpointError) as info:
        safepoint.load(path)
    assert info.value.path == str(path / "manifest.json")
    # only the checkpoint directory and its manifest were opened: no payload, nothing outside
    assert set(_opened(events)) <= {str(path), "manifest.json"}, _opened(events)
    report = safepoint.verify(path)
    assert not report.ok
    assert report.checkpoints[0].bad_file == str(path / "manifest.json")


def test_a_path_to_a_secret_outside_never_reveals_it(tmp_path: Path) -> None:
    path = tmp_path / "root" / "checkpoint"
    safepoint.save(path, {"w": torch.arange(4.0)})
    secret = tmp_path / "root" / "secret"
    secret.write_bytes(b"TOPSECRET-" + os.urandom(16).hex().encode())

    def aim(body: dict[str, Any]) -> None:
        body["files"][0].update(path="../secret", size=secret.stat().st_size, checksum=xxh3(secret.read_bytes()))

    edit_manifest(path, aim)
    with audit_events() as events, pytest.raises(UnsafeCheckpointError) as info:
        safepoint.load(path)
    assert "TOPSECRET" not in str(info.value)
    assert set(_opened(events)) <= {str(path), "manifest.json"}, _opened(events)
    report = safepoint.verify(path)
    assert "TOPSECRET" not in (report.checkpoints[0].error or "")


def test_a_payload_symlinked_outside_is_refused(victim: tuple[Path, Path]) -> None:
    path, outside = victim
    (file,) = payload_paths(path)
    file.unlink()
    file.symlink_to(outside)  # the target has exactly the promised bytes
    with pytest.raises(UnsafeCheckpointError) as info:
        safepoint.load(path)
    assert info.value.path == str(file)
    report = safepoint.verify(path)
    assert not report.ok
    assert report.checkpoints[0].bad_file == str(file)


def test_an_attempt_directory_symlinked_outside_is_refused(victim: tuple[Path, Path]) -> None:
    path, _ = victim
    (file,) = payload_paths(path)
    elsewhere = path.parent / "elsewhere"
    shutil.copytree(file.parent, elsewhere)
    shutil.rmtree(file.parent)
    file.parent.symlink_to(elsewhere, target_is_directory=True)
    assert file.read_bytes() == (elsewhere / file.name).read_bytes()  # following the link would succeed
    with pytest.raises(UnsafeCheckpointError):
        safepoint.load(path)
    assert not safepoint.verify(path).ok


def test_a_manifest_symlinked_outside_is_refused(victim: tuple[Path, Path]) -> None:
    path, _ = victim
    elsewhere = path.parent / "manifest-elsewhere.json"
    shutil.copy(path / "manifest.json", elsewhere)
    (path / "manifest.json").unlink()
    (path / "manifest.json").symlink_to(elsewhere)
    with pytest.raises(UnsafeCheckpointError):
        safepoint.load(path)


def test_a_fifo_in_place_of_a_payload_does_not_hang(victim: tuple[Path, Path]) -> None:
    path, _ = victim
    (file,) = payload_paths(path)
    file.unlink()
    os.mkfifo(file)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            safepoint.load(path)
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(3)
    hung = worker.is_alive()
    if hung:  # release the reader: a writer opening the FIFO lets its open() return
        os.close(os.open(file, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert not hung, "load blocked on a FIFO"
    assert isinstance(outcome[0], UnsafeCheckpointError)


# -- absurd sizes ---------------------------------------------------------------------------------------------------
def _header_length(path: Path, length: int) -> Path:
    (file,) = payload_paths(path)
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", length) + data[8:])
    reseal_files(path)
    return file


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 2**40, (256 << 20) + 1, "size - 7", 0])
def test_a_huge_declared_header_length_is_corrupt(tmp_path: Path, length: int | str) -> None:
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"w": torch.arange(4.0)})
    size = payload_paths(path)[0].stat().st_size
    file = _header_length(path, size - 7 if length == "size - 7" else int(length))
    with pytest.raises(CorruptCheckpointError) as info:
        safepoint.load(path)
    assert info.value.path == str(file)
    assert "header" in str(info.value)


def _absurd_shape(path: Path) -> None:
    (file,) = payload_paths(path)
    header, section = split_safetensors(file.read_bytes())
    header["w"]["shape"] = [2**40, 2**40]
    file.write_bytes(join_safetensors(header, section))
    reseal_files(path)
    edit_manifest(path, lambda body: body["entries"][0].update(shape=[2**40, 2**40]))


def _absurd_size(path: Path) -> None:
    edit_manifest(path, lambda body: body["files"][0].update(size=2**62))


def _absurd_both(path: Path) -> None:
    def edit(body: dict[str, Any]) -> None:
        body["files"][0]["size"] = 2**126
        body["entries"][0]["shape"] = [2**30] * 4

    edit_manifest(path, edit)


def _many_dims(path: Path) -> None:
    edit_manifest(path, lambda body: body["entries"][0].update(shape=[2**63 - 1] * 64))


def _huge_manifest(path: Path) -> None:
    with open(path / "manifest.json", "r+b") as handle:
        handle.truncate(600 << 20)  # sparse: no disk used, over MAX_MANIFEST_BYTES


def _huge_header(path: Path) -> None:
    _header_length(path, 2**63)


ABSURD: dict[str, tuple[Callable[[Path], None], type[Exception]]] = {
    "shape": (_absurd_shape, CorruptCheckpointError),
    "file size": (_absurd_size, CorruptCheckpointError),
    "size and shape": (_absurd_both, CorruptCheckpointError),
    "64 huge dims": (_many_dims, CorruptCheckpointError),
    "manifest size": (_huge_manifest, UnsafeCheckpointError),
    "header length": (_huge_header, CorruptCheckpointError),
}

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    import safepoint

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    safepoint.load(sys.argv[1])  # warm up: imports and one healthy load
    results = {"baseline": peak()}
    for case, path in json.loads(sys.argv[2]).items():
        start = time.monotonic()
        try:
            safepoint.load(path)
            error = None
        except Exception as err:
            error = type(err).__name__
        results[case] = {"error": error, "seconds": time.monotonic() - start, "peak": peak()}
    print(json.dumps(results))
    """
)


def test_absurd_sizes_are_refused_quickly_without_allocating(tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    safepoint.save(healthy, {"w": torch.arange(16.0)})
    cases: dict[str, str] = {}
    for name, (forge, _) in ABSURD.items():
        path = tmp_path / name.replace(" ", "_")
        safepoint.save(path, {"w": torch.arange(16.0)})
        forge(path)
        cases[name] = str(path)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(healthy), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    baseline = results.pop("baseline")
    for name, (_, expected) in ABSURD.items():
        outcome = results[name]
        assert outcome["error"] == expected.__name__, (name, outcome)
        assert outcome["seconds"] < 2.0, (name, outcome)
        assert outcome["peak"] - baseline < 64 << 20, f"{name}: peak memory grew by {outcome['peak'] - baseline}"


def test_the_manifest_itself_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"w": torch.ones(1)})
    _huge_manifest(path)
    with pytest.raises(UnsafeCheckpointError) as info:
        safepoint.load(path)
    assert str(path / "manifest.json") in str(info.value)


def test_forged_checkpoints_with_valid_checksums_still_load_when_harmless(tmp_path: Path) -> None:
    # the control for the forging helpers: resealing an unchanged checkpoint keeps it valid
    path = tmp_path / "checkpoint"
    safepoint.save(path, {"w": torch.arange(3.0)})
    before = read_manifest(path)
    reseal_files(path)
    assert read_manifest(path) == before
    edit_manifest(path, lambda body: body.update(writer="forged"))
    assert safepoint.load(path)["w"].tolist() == [0.0, 1.0, 2.0]
