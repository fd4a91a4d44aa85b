"""``safepoint migrate``, ``import`` and ``export`` on real directories: output, exit codes and what they write."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safepoint
from safepoint._cli import main
from tests.helpers import assert_same

MIGRATIONS = textwrap.dedent(
    """
    import safepoint

    migrations = safepoint.Migrations()

    @migrations.register(from_version=1)
    def add_gradient_checkpointing(state):
        return safepoint.set_default(state, "config/gradient_checkpointing", False)

    @migrations.register(from_version=2)
    def rename_lr(state):
        safepoint.remove_key(state, "config/legacy")
        return safepoint.rename_key(state, "config/lr", "learning_rate", default=1e-3)

    not_migrations = 42
    """
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with a migrations module and a version-1 run, as a user would have."""
    (tmp_path / "my_migrations.py").write_text(MIGRATIONS)
    monkeypatch.chdir(tmp_path)
    state = {"w": torch.arange(3.0), "config": {"lr": 0.5, "legacy": "x"}}
    with safepoint.CheckpointManager(tmp_path / "run") as manager:
        manager.save(100, state, metrics={"loss": 0.25})
    yield tmp_path
    sys.modules.pop("my_migrations", None)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_migrate_dry_run_shows_the_changes_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(project / "run")
    code, out, err = run(capsys, "migrate", "run", "--to", "3", "--migrations", "my_migrations:migrations",
                         "--dry-run")  # fmt: skip
    assert code == 0
    assert err == ""
    assert out.splitlines() == [
        f"checkpoint      {project / 'run' / 'step-000000000100'} (step 100)",
        "state_version   1 -> 3",
        "migrations      add_gradient_checkpointing (1 -> 2), rename_lr (2 -> 3)",
        "changes (4)",
        "  + config/gradient_checkpointing: bool False",
        "  + config/learning_rate: float 0.5",
        "  - config/legacy: str 'x'",
        "  - config/lr: float 0.5",
        "dry run: nothing written",
    ]
    assert snapshot(project / "run") == before
    assert sorted(os.listdir(project)) == ["my_migrations.py", "run"]


def test_migrate_writes_a_new_checkpoint_and_leaves_the_source_alone(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(project / "run")
    code, out, _ = run(capsys, "migrate", "run", "--to", "3", "--migrations", "my_migrations.py:migrations",
                       "--output", "migrated")  # fmt: skip
    assert code == 0
    assert f"wrote {project / 'migrated'} (step 100, state_version 3" in out
    assert snapshot(project / "run") == before
    assert_same(
        safepoint.load(project / "migrated"),
        {"w": torch.arange(3.0), "config": {"gradient_checkpointing": False, "learning_rate": 0.5}},
    )
    report = safepoint.restore(project / "migrated", {"w": torch.zeros(3), "config": {}}, strict=False,
                               state_version=3)  # fmt: skip
    assert report.step == 100
    assert report.state_version == 3
    assert dict(report.metrics) == {"loss": 0.25}


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--to", "3", "--migrations", "my_migrations:migrations"], 2, "--output DIR is required without --dry-run"),
        (["--to", "3", "--dry-run", "--migrations", "my_migrations"], 2, "takes MODULE:ATTR"),
        (["--to", "3", "--dry-run", "--migrations", "nowhere:migrations"], 2, "importing 'nowhere' failed"),
        (["--to", "3", "--dry-run", "--migrations", "my_migrations:not_migrations"], 2, "is int, not a safepoint"),
        (["--to", "3", "--dry-run"], 2, "--migrations MODULE:ATTR is needed to upgrade from state_version 1 to 3"),
        (
            ["--to", "5", "--dry-run", "--migrations", "my_migrations:migrations"],
            1,
            "no migration is registered from version 3, 4",
        ),
        (["--to", "0", "--dry-run", "--migrations", "my_migrations:migrations"], 1, "newer than this code's 0"),
        (["--to", "3", "--dry-run", "--step", "7"], 2, "step 7 is not committed"),
    ],
)
def test_migrate_refuses_bad_requests(
    project: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    result, _, err = run(capsys, "migrate", "run", *argv)
    assert result == code
    assert err.startswith("error: ")
    assert message in err
    assert sorted(os.listdir(project)) == ["my_migrations.py", "run"]


def test_migrate_to_the_saved_version_does_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "migrate", "run", "--to", "1", "--output", "out")
    assert code == 0
    assert "already at state_version 1: nothing to migrate, nothing written" in out
    assert not (project / "out").exists()


def test_import_and_export_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"model": {"w": torch.ones(2, 2)}, "epoch": 4}
    torch.save(state, tmp_path / "old.pt")
    code, out, _ = run(capsys, "import", str(tmp_path / "old.pt"), str(tmp_path / "ckpt"), "--step", "9")
    assert code == 0
    assert f"imported torch {tmp_path / 'old.pt'} -> {tmp_path / 'ckpt'}" in out
    assert "step 9," in out
    assert "entries: model, epoch" in out
    code, out, _ = run(capsys, "export", str(tmp_path / "ckpt"), str(tmp_path / "m.safetensors"),
                       "--format", "safetensors", "--key", "model")  # fmt: skip
    assert code == 0
    assert out.startswith(f"exported {tmp_path / 'm.safetensors'} (safetensors, ")
    assert_same(load_file(tmp_path / "m.safetensors"), {"w": torch.ones(2, 2)})
    code, _, err = run(capsys, "export", str(tmp_path / "ckpt"), str(tmp_path / "m.safetensors"),
                       "--format", "safetensors")  # fmt: skip
    assert code == 2
    assert "exists; refusing to overwrite it" in err


def test_import_of_a_malicious_pickle_exits_1_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def payload(canary: Path) -> bytes:  # the classic os.system call, behind a protocol-2 header
        return b"\x80\x02cposix\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR."

    pickle.loads(payload(tmp_path / "control"))
    assert (tmp_path / "control").exists()  # the payload is live
    canary = tmp_path / "canary"
    (tmp_path / "evil.pt").write_bytes(payload(canary))
    code, out, err = run(capsys, "import", str(tmp_path / "evil.pt"), str(tmp_path / "ckpt"))
    assert code == 1
    assert out == ""
    assert "needs arbitrary pickle" in err
    assert not canary.exists()
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("migrate", ["--dry-run", "--output DIR", "never modified", "MODULE:ATTR"]),
        ("import", ["weights_only=True", "training_args.bin", "must not exist"]),
        ("export", ["torch.load(weights_only=True)", "--key model", "complete or not at all"]),
    ],
)
def test_help_answers_the_question(capsys: pytest.CaptureFixture[str], command: str, words: list[str]) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    flat = " ".join(out.split())
    for word in words:
        assert word in flat, word
