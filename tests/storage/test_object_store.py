"""safepoint end to end on object stores: the manager, the one-checkpoint functions and the CLI on memory:// and
on S3 (a real HTTP server on loopback), concurrent writers in separate processes, corruption behind safepoint's
back, and a writer killed mid-save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safepoint
from safepoint import _faults as faults
from safepoint._cli import main
from safepoint._gc import collect
from safepoint._storage import open_storage

from ..conftest import fresh_state, make_state, tensors_of
from .conftest import Backend, S3Server

ROOT = Path(__file__).resolve().parents[2]
SLOW = os.environ.get("SAFEPOINT_SLOW") == "1"


def manager_of(backend: Backend, **kwargs: Any) -> safepoint.CheckpointManager:
    return safepoint.CheckpointManager(backend.location, storage_options=backend.options, **kwargs)


def test_manager_saves_restores_keeps_and_verifies_on_an_object_store(object_backend: Backend) -> None:
    with manager_of(object_backend, keep_last=2) as manager:
        saved = {}
        for step in range(4):
            state = make_state(seed=step)
            saved[step] = tensors_of(state)
            info = manager.save(step, state, metrics={"loss": 1.0 / (step + 1)})
            assert info.path == object_backend.open().describe(f"step-{step:012d}")
        assert manager.steps() == [2, 3]
        report = manager.verify()
        assert report.ok
        assert [c.step for c in report.checkpoints] == [2, 3]
        assert report.notes == ()
        target = fresh_state()
        restored = manager.restore(target)
        assert restored is not None
        assert restored.step == 3
        assert tensors_of(target).keys() == saved[3].keys()
        for key, tensor in tensors_of(target).items():
            assert torch.equal(tensor, saved[3][key]), key
    storage = object_backend.open()
    assert storage.listdir("") == ["step-000000000002", "step-000000000003"]
    for step, info in ((2, report.checkpoints[0]), (3, report.checkpoints[1])):
        # what a finished save leaves: the commit record and the committed attempt's data, no lock, no staging copy
        assert storage.listdir(f"step-{step:012d}") == [info.save_id, "manifest.json"]
        assert storage.listdir(f"step-{step:012d}/{info.save_id}") == ["00000.safetensors"]


def test_one_checkpoint_functions_work_on_a_url(object_backend: Backend) -> None:
    url, options = object_backend.location, object_backend.options
    state = make_state()
    info = safepoint.save(url, state, step=7, storage_options=options)
    assert info.step == 7
    assert safepoint.verify(url, storage_options=options).ok
    loaded = safepoint.load(url, storage_options=options)
    assert torch.equal(loaded["model"]["0.weight"], state["model"].state_dict()["0.weight"])
    target = fresh_state()
    report = safepoint.restore(url, target, storage_options=options)
    assert report.step == 7
    with pytest.raises(safepoint.CheckpointExistsError) as caught:
        safepoint.save(url, make_state(seed=1), step=7, storage_options=options)
    assert caught.value.verified is True
    assert safepoint.load(url, storage_options=options)["progress"] == state["progress"]


def test_nothing_committed_at_a_url_is_not_found(object_backend: Backend) -> None:
    with pytest.raises(safepoint.CheckpointNotFoundError, match=object_backend.kind):
        safepoint.load(object_backend.location, storage_options=object_backend.options)
    with manager_of(object_backend) as manager:
        assert manager.restore(fresh_state()) is None
        assert manager.steps() == []


# -- the command line --------------------------------------------------------------------------------------------
def cli_options(s3: S3Server) -> list[str]:
    return [arg for key, value in s3.options.items() for arg in ("-o", f"{key}={json.dumps(value)}")]


def test_cli_lists_inspects_verifies_and_collects_on_s3(
    s3_server: S3Server, s3_url: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = s3_url()
    with safepoint.CheckpointManager(url, storage_options=s3_server.options) as manager:
        for step in (10, 20):
            manager.save(step, {"weights": torch.full((8,), float(step))}, metrics={"loss": step / 100})
    options = cli_options(s3_server)
    assert main(["ls", url, *options]) == 0
    out = capsys.readouterr().out
    assert url in out
    assert "committed" in out
    assert "10" in out
    assert "20" in out
    assert main(["inspect", url, "--step", "10", *options]) == 0
    assert "weights" in capsys.readouterr().out
    assert main(["verify", url, *options]) == 0
    assert "step 20" in capsys.readouterr().out
    assert main(["gc", url, *options]) == 0
    assert "nothing to collect" in capsys.readouterr().out


def test_cli_reads_plain_string_options_as_strings(
    s3_server: S3Server, s3_url: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = s3_url()
    safepoint.save(url, {"weights": torch.ones(4)}, step=3, storage_options=s3_server.options)
    plain = ["-o", "key=testing", "-o", "secret=testing", "-o", f"endpoint_url={s3_server.endpoint}"]
    assert main(["verify", url, *plain]) == 0
    assert "step 3" in capsys.readouterr().out


def test_cli_without_the_options_fails_with_one_error_line(
    s3_server: S3Server, s3_url: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", "nosuchproto://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "nosuchproto" in err
    assert main(["ls", s3_url(), "-o", "not-a-pair"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["verify", s3_url(), *cli_options(s3_server)]) == 2  # nothing there yet
    assert "does not exist" in capsys.readouterr().err


# -- corruption behind safepoint's back --------------------------------------------------------------------------
def _damage(client: Any, bucket: str, key: str, how: str) -> None:
    if how == "delete":
        client.delete_object(Bucket=bucket, Key=key)
        return
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        del data[-5:]
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_damaged_s3_object_is_detected_and_restore_falls_back(
    s3_server: S3Server, s3_url: Callable[[], str], how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = s3_url()
    with safepoint.CheckpointManager(url, storage_options=s3_server.options) as manager:
        older, newer = make_state(seed=1), make_state(seed=2)
        manager.save(1, older)
        info = manager.save(2, newer)
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    key = f"{prefix}/step-000000000002/{info.save_id}/00000.safetensors"
    _damage(s3_server.client(), s3_server.bucket, key, how)

    report = safepoint.verify(url, storage_options=s3_server.options)
    assert [(c.step, c.ok) for c in report.checkpoints] == [(1, True), (2, False)]
    assert report.bad[0].bad_file == f"s3://{s3_server.bucket}/{key}"
    assert main(["verify", url, *cli_options(s3_server)]) == 1
    assert "INVALID step 2" in capsys.readouterr().out

    with safepoint.CheckpointManager(url, storage_options=s3_server.options) as manager:
        target = fresh_state()
        restored = manager.restore(target)
    assert restored is not None
    assert restored.step == 1
    assert [s.step for s in restored.skipped] == [2]
    assert key in restored.skipped[0].reason
    expected = {"flip": "checksum", "truncate": "bytes", "delete": "missing"}[how]
    assert expected in restored.skipped[0].reason
    for name, tensor in tensors_of(target).items():
        assert torch.equal(tensor, tensors_of(older)[name]), name


# -- a save that fails or dies midway ----------------------------------------------------------------------------
def test_a_failed_save_leaves_nothing_on_the_object_store(object_backend: Backend) -> None:
    with manager_of(object_backend) as manager:
        manager.save(0, make_state())
        with faults.armed({"commit.publish.before": "eio"}), pytest.raises(OSError, match="injected"):
            manager.save(1, make_state())
        assert manager.steps() == [0]
    storage = object_backend.open()
    assert storage.listdir("") == ["step-000000000000"]


def writer(
    url: str, options: dict[str, Any], index: int, trials: int, *extra: str, stderr: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.workers.s3_writer", url, json.dumps(options), str(index), str(trials)]
    return subprocess.Popen(
        [*command, *extra], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


@pytest.mark.parametrize("point", [pytest.param("data.fsync.after", marks=pytest.mark.slow), "commit.publish.before"])
def test_a_writer_killed_mid_save_leaves_nothing_visible_and_gc_collects_it_after_the_grace_period(
    s3_server: S3Server, s3_url: Callable[[], str], point: str
) -> None:
    url = s3_url()
    process = writer(url, s3_server.options, 0, 1, "--crash-at", point)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err

    storage = open_storage(url, s3_server.options)
    attempts = [name for name in storage.listdir("step-000000000000") if name != "manifest.json"]
    assert len(attempts) == 2  # the dead attempt's data and its lock
    with safepoint.CheckpointManager(url, storage_options=s3_server.options) as manager:
        assert manager.steps() == []
        assert manager.restore(fresh_state()) is None
        report = manager.verify()
    assert report.checkpoints == ()
    assert "uncommitted save" in report.notes[0]

    patient = collect(open_storage(url, s3_server.options))  # the default grace period: the writer may be alive
    assert patient.removed == ()
    assert len(patient.in_progress) == 1
    time.sleep(1.1)
    collected = collect(open_storage(url, s3_server.options, grace_period=1))
    assert collected.in_progress == ()
    assert len(collected.removed) == 1
    assert not storage.exists("step-000000000000")
    with safepoint.CheckpointManager(url, storage_options=s3_server.options) as manager:
        manager.save(0, make_state())  # the step is free again
        assert manager.steps() == [0]


# -- several processes saving the same steps at once -------------------------------------------------------------
def test_concurrent_writers_of_the_same_step_on_s3_one_wins_whole(
    s3_server: S3Server, s3_url: Callable[[], str], tmp_path: Path
) -> None:
    writers, trials = (4, 30) if SLOW else (3, 4)
    url = s3_url()
    # stderr to files: a pipe nobody reads while the writers run could fill and stall them
    logs = [(tmp_path / f"writer-{index}.log").open("w+") for index in range(writers)]
    processes = [writer(url, s3_server.options, index, trials, stderr=logs[index]) for index in range(writers)]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.strip() == "ready", process.communicate(timeout=60)
        start = time.time() + 0.5
        for process in processes:  # every writer gets its start before any is waited for
            assert process.stdin is not None
            process.stdin.write(f"{start} 0.8\n")
            process.stdin.close()
        outputs = [process.stdout.read() if process.stdout else "" for process in processes]
        for process in processes:
            process.wait(timeout=240)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        errors = []
        for log in logs:
            log.seek(0)
            errors.append(log.read())
            log.close()
    results = [[json.loads(line) for line in out.splitlines()] for out in outputs]
    for index, rows in enumerate(results):
        assert len(rows) == trials, f"writer {index}: {errors[index]}"
    for step in range(trials):
        rows = [rows_of[step] for rows_of in results]
        outcomes = sorted(row["outcome"] for row in rows)
        assert outcomes == ["exists"] * (writers - 1) + ["won"], (step, rows)
        winner = next(i for i, row in enumerate(rows) if row["outcome"] == "won")
        checkpoint = f"{url}/step-{step:012d}"
        loaded = safepoint.load(checkpoint, storage_options=s3_server.options)  # verifies every byte
        assert loaded["progress"] == {"writer": winner}
        for name, tensor in loaded["weights"].items():
            assert torch.all(tensor == float(winner)), (step, name)
        manifest = open_storage(checkpoint, s3_server.options).read_bytes("manifest.json", 1 << 20)
        assert json.loads(manifest)["save_id"] == rows[winner]["save_id"]
    # the even trials' pause before publishing makes the writers meet at the exclusive create itself
    raced = sum("while this save was writing" in row.get("message", "") for rows in results for row in rows)
    assert raced >= 1, results
    # the losers cleaned up after themselves: each step holds the winner's attempt and the manifest only
    storage = open_storage(url, s3_server.options)
    for step in range(trials):
        assert len(storage.listdir(f"step-{step:012d}")) == 2


def test_payload_objects_are_cut_smaller_on_object_stores_so_they_upload_in_parallel(tmp_path: Path) -> None:
    state = {"tensors": {f"t{i}": torch.zeros(4 << 20) for i in range(3)}}  # 3 x 16 MiB
    counts = {}
    for location in (str(tmp_path / "local"), f"memory://{tmp_path.name}-sharding"):
        safepoint.save(location, state)
        manifest = json.loads(open_storage(location).read_bytes("manifest.json", 1 << 20))
        counts[location.split("://")[0] if "://" in location else "local"] = len(manifest["files"])
        assert safepoint.load(location)["tensors"]["t2"].shape == (4 << 20,)
        open_storage(location).remove_tree("")
    assert counts == {"local": 1, "memory": 2}
