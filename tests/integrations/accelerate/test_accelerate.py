"""save_state/load_state of safepoint.integrations.accelerate on a real Accelerator (CPU, one process).

Invariants defended: visible means complete (a checkpoint appears under its name only whole), restore is total
or nothing and loud (a damaged checkpoint is refused or skipped with a warning, never a silent fresh start),
nothing is deleted before its replacement is durable, and no code runs on load (no pickle written or read).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

import safepoint
from safepoint.integrations.accelerate import load_state, save_state
from tests.helpers import assert_same, audit_events

ROOT = Path(__file__).resolve().parents[3]


class Counter:
    """A registered object with a tensor, a number and a list in its state."""

    def __init__(self) -> None:
        self.total = torch.zeros(3)
        self.calls = 0
        self.names: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone(), "calls": self.calls, "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"].clone()
        self.calls = int(state["calls"])
        self.names = list(state["names"])


@dataclass
class Run:
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    counter: Counter

    def train(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(torch.randn(4, 6)).pow(2).mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.counter.total += 1.5
            self.counter.calls += 1
            self.counter.names.append(f"step{self.counter.calls}")

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": _clone(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "counter": self.counter.state_dict(),
            "rng": torch.get_rng_state(),
        }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def make_run(project: Path | None = None, *, total_limit: int | None = None, seed: int = 0) -> Run:
    torch.manual_seed(seed)
    config = ProjectConfiguration(
        project_dir=str(project) if project else None,
        automatic_checkpoint_naming=project is not None,
        total_limit=total_limit,
    )
    accelerator = Accelerator(cpu=True, project_config=config)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Dropout(0.1), torch.nn.Linear(5, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return Run(accelerator, model, optimizer, scheduler, counter)


def assert_restored(run: Run, expected: dict[str, Any]) -> None:
    for key, value in run.snapshot().items():
        assert_same(value, expected[key], key)


def flip_largest_payload(checkpoint: Path) -> Path:
    payload = max((p for p in checkpoint.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))
    return payload


def test_round_trip_restores_models_optimizers_schedulers_rng_step_and_registered_objects(tmp_path: Path) -> None:
    run = make_run(seed=0)
    run.train(3)
    run.accelerator.step = 7  # Accelerate's gradient-accumulation counter, saved with the RNG states
    saved = run.snapshot()
    path = save_state(run.accelerator, tmp_path / "ckpt")
    assert path == tmp_path / "ckpt"
    run.train(2)  # everything moves on, then comes back
    run.accelerator.step = 0

    report = load_state(run.accelerator, tmp_path / "ckpt")

    assert_restored(run, saved)
    assert run.accelerator.step == 7
    assert report.skipped == ()
    for key in ("model", "optimizer", "scheduler", "custom_checkpoint_0", "random_states", "accelerator"):
        assert key in report.restored


def test_resumed_training_continues_bitwise(tmp_path: Path) -> None:
    first = make_run(seed=0)
    first.train(2)
    save_state(first.accelerator, tmp_path / "ckpt")
    first.train(3)
    expected = first.snapshot()

    second = make_run(seed=99)  # other initial weights and RNG: everything must come from the checkpoint
    load_state(second.accelerator, tmp_path / "ckpt")
    second.train(3)
    assert_restored(second, expected)


def test_automatic_naming_total_limit_and_iteration(tmp_path: Path) -> None:
    run = make_run(tmp_path / "project", total_limit=2)
    for _ in range(4):
        run.train(1)
        save_state(run.accelerator)
    checkpoints = tmp_path / "project" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_2", "checkpoint_3"]  # no leftovers either
    assert run.accelerator.project_configuration.iteration == 4
    for name in ("checkpoint_2", "checkpoint_3"):
        assert safepoint.verify(checkpoints / name).ok


def test_load_state_without_input_dir_takes_the_newest_and_moves_the_iteration_past_it(tmp_path: Path) -> None:
    run = make_run(tmp_path / "project")
    run.train(1)
    save_state(run.accelerator)
    run.train(1)
    save_state(run.accelerator)
    expected = run.snapshot()

    resumed = make_run(tmp_path / "project", seed=5)
    report = load_state(resumed.accelerator)
    assert_restored(resumed, expected)
    assert report.path.startswith(str(tmp_path / "project" / "checkpoints" / "checkpoint_1"))
    # Accelerate leaves the iteration at 0, so its next save would collide with checkpoint_0
    assert resumed.accelerator.project_configuration.iteration == 2
    assert save_state(resumed.accelerator).name == "checkpoint_2"


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = make_run(tmp_path / "project")
    run.train(1)
    save_state(run.accelerator)
    expected = run.snapshot()
    run.train(1)
    save_state(run.accelerator)
    flip_largest_payload(tmp_path / "project" / "checkpoints" / "checkpoint_1")

    resumed = make_run(tmp_path / "project", seed=5)
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        report = load_state(resumed.accelerator)

    assert_restored(resumed, expected)
    damaged = str(tmp_path / "project" / "checkpoints" / "checkpoint_1")
    assert [skipped.path for skipped in report.skipped] == [damaged]
    assert any(damaged in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert resumed.accelerator.project_configuration.iteration == 2  # never onto the damaged one


def test_damaged_explicit_checkpoint_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    run = make_run(seed=0)
    run.train(2)
    save_state(run.accelerator, tmp_path / "ckpt")
    payload = flip_largest_payload(tmp_path / "ckpt")
    run.train(1)
    before = run.snapshot()

    with pytest.raises(safepoint.CorruptCheckpointError) as caught:
        load_state(run.accelerator, tmp_path / "ckpt")
    assert payload.name in str(caught.value)
    assert_restored(run, before)


def test_every_checkpoint_damaged_raises_instead_of_starting_fresh(tmp_path: Path) -> None:
    run = make_run(tmp_path / "project")
    for _ in range(2):
        run.train(1)
        save_state(run.accelerator)
    for name in ("checkpoint_0", "checkpoint_1"):
        flip_largest_payload(tmp_path / "project" / "checkpoints" / name)
    resumed = make_run(tmp_path / "project", seed=5)
    before = resumed.snapshot()
    with pytest.raises(safepoint.CorruptCheckpointError, match="none of the 2 checkpoints"):
        load_state(resumed.accelerator)
    assert_restored(resumed, before)


def test_nothing_to_load_raises(tmp_path: Path) -> None:
    run = make_run(tmp_path / "project")
    with pytest.raises(safepoint.CheckpointNotFoundError, match="nothing to load"):
        load_state(run.accelerator)
    with pytest.raises(safepoint.CheckpointNotFoundError, match="does not exist"):
        load_state(run.accelerator, tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # looking did not create it


def test_accelerate_own_checkpoint_is_not_mistaken_for_one(tmp_path: Path) -> None:
    run = make_run(seed=0)
    run.accelerator.save_state(str(tmp_path / "native"))
    with pytest.raises(safepoint.CheckpointNotFoundError, match=r"accelerator\.load_state"):
        load_state(run.accelerator, tmp_path / "native")


def test_an_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    run = make_run(tmp_path / "project")
    save_state(run.accelerator)
    run.accelerator.project_configuration.iteration = 0
    with pytest.raises(safepoint.CheckpointExistsError, match="checkpoint_0"):
        save_state(run.accelerator)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    plain = make_run()
    with pytest.raises(safepoint.CheckpointExistsError, match="taken"):
        save_state(plain.accelerator, tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    save_state(plain.accelerator, tmp_path / "empty")  # an empty folder is replaced atomically
    assert safepoint.verify(tmp_path / "empty").ok


def test_other_registered_objects_are_a_restore_error(tmp_path: Path) -> None:
    run = make_run(seed=0)
    save_state(run.accelerator, tmp_path / "ckpt")
    other = make_run(seed=0)
    other.accelerator.register_for_checkpointing(Counter())  # two registered objects now, one saved
    with pytest.raises(safepoint.RestoreError, match="custom_checkpoint_1"):
        load_state(other.accelerator, tmp_path / "ckpt")


def test_a_value_that_cannot_be_stored_exactly_names_its_key(tmp_path: Path) -> None:
    class Opaque:
        def state_dict(self) -> dict[str, Any]:
            return {"callback": lambda: None}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            raise AssertionError("never loaded")

    run = make_run(tmp_path / "project")
    run.accelerator.register_for_checkpointing(Opaque())
    with pytest.raises(safepoint.InvalidStateError, match="custom_checkpoint_1/callback"):
        save_state(run.accelerator)
    assert os.listdir(tmp_path / "project" / "checkpoints") == []  # nothing visible, no leftover
    assert run.accelerator.project_configuration.iteration == 0


def test_no_pickle_is_written_or_read(tmp_path: Path) -> None:
    run = make_run(seed=0)
    run.train(2)
    with audit_events() as events:
        save_state(run.accelerator, tmp_path / "ckpt")
        load_state(run.accelerator, tmp_path / "ckpt")
    assert [event for event, _ in events if event.startswith("pickle.")] == []
    written = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert written, "nothing was written"
    for path in written:
        head = path.read_bytes()[:16]
        assert path.suffix in (".json", ".safetensors"), path
        assert not head.startswith(b"\x80"), f"{path} is a pickle"
        assert not head.startswith(b"PK"), f"{path} is a torch.save zip"


def test_save_state_hooks_are_refused(tmp_path: Path) -> None:
    run = make_run(seed=0)
    handle = run.accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: None)
    with pytest.raises(safepoint.ConfigError, match="hooks"):
        save_state(run.accelerator, tmp_path / "ckpt")
    handle.remove()
    assert not (tmp_path / "ckpt").exists()


def test_without_accelerate_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['accelerate'] = None\n"
        "try:\n    import safepoint.integrations.accelerate\n"
        "except ImportError as err:\n    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'safepoint[accelerate]'" in result.stdout


def test_grad_scaler_round_trips(tmp_path: Path) -> None:
    # Accelerate makes a GradScaler only for fp16 on an accelerator; on the CPU one is set by hand, as it would be
    run = make_run(seed=0)
    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    save_state(run.accelerator, tmp_path / "ckpt")
    other = make_run(seed=0)
    other.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    report = load_state(other.accelerator, tmp_path / "ckpt")
    assert "scaler" in report.restored
    assert other.accelerator.scaler.state_dict() == {
        "scale": 1024.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 7,
        "_growth_tracker": 0,
    }


def test_an_invalid_total_limit_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run = make_run(tmp_path / "project", total_limit=-1)
    with pytest.raises(safepoint.ConfigError, match="total_limit"):
        save_state(run.accelerator)
    assert not (tmp_path / "project" / "checkpoints").exists()
    assert run.accelerator.project_configuration.iteration == 0
