"""SafepointTrainerMixin on a real Transformers Trainer: layout, verified resume, fallback, rotation, kills, pickles.

A tiny GPT-2 built from a config trains on the CPU; one run of 8 steps (checkpoints at 2, 4, 6, 8) is shared,
and each test works on a copy of its output directory. Runs that get killed run in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from transformers import GPT2LMHeadModel, Trainer

import safepoint
from safepoint.integrations import transformers as integration
from tests.helpers import assert_same, audit_events
from tests.integrations.transformers.tiny import StartedAt, TokenData, build, result_of

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted run: its output directory and its final weights, optimizer state and step."""
    output = tmp_path_factory.mktemp("reference") / "out"
    trainer = build(str(output))
    trainer.train()
    return output, result_of(trainer, 0)


def copy_run(reference: tuple[Path, dict[str, Any]], tmp_path: Path, keep: tuple[int, ...]) -> Path:
    output = tmp_path / "out"
    shutil.copytree(reference[0], output)
    for checkpoint in output.glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) not in keep:
            shutil.rmtree(checkpoint)
    return output


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def resume(output: Path, resume_from: str | bool = True, **overrides: Any) -> tuple[Trainer, StartedAt]:
    trainer = build(str(output), **overrides)
    started = StartedAt()
    trainer.add_callback(started)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, started


def assert_same_run(result: dict[str, Any], expected: dict[str, Any]) -> None:
    assert result["global_step"] == expected["global_step"]
    assert_same(result["model"], expected["model"], "model")
    assert_same(result["optimizer"], expected["optimizer"], "optimizer")


def assert_json_or_safetensors(root: Path) -> None:
    """Every file is JSON or safetensors: nothing that could be a pickle (or a zip of pickles)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        else:
            assert path.suffix == ".safetensors", path
            with safe_open(str(path), framework="pt") as tensors:
                assert list(tensors.keys()), path


# -- what a save leaves on disk ----------------------------------------------------------------------------------
def test_checkpoint_folder_is_transformers_format_plus_one_safepoint_record(
    reference: tuple[Path, dict[str, Any]],
) -> None:
    output, result = reference
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    checkpoint = output / "checkpoint-8"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "safepoint",
        "trainer_state.json",
        "training_args.json",
    ]
    assert json.loads((checkpoint / "training_args.json").read_text())["output_dir"] == str(output)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 8
    loaded = GPT2LMHeadModel.from_pretrained(str(checkpoint))
    assert_same(
        {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"},
        {k: v for k, v in result["model"].items() if k != "lm_head.weight"},
    )
    assert safepoint.verify(checkpoint / "safepoint").ok
    assert_json_or_safetensors(output)


def test_user_save_model_writes_training_args_as_json_and_no_pickle(tmp_path: Path) -> None:
    trainer = build(str(tmp_path / "out"), max_steps=1, save_strategy="no")
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "training_args.bin").exists()
    assert json.loads((tmp_path / "final" / "training_args.json").read_text())["max_steps"] == 1
    assert_json_or_safetensors(tmp_path / "final")


# -- resume ------------------------------------------------------------------------------------------------------
def test_resume_is_bitwise_and_unpickles_nothing(reference: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    output = copy_run(reference, tmp_path, keep=(2, 4))
    with audit_events() as events:
        trainer, started = resume(output)
    assert started.step == 4
    assert [event for event, _ in events if event.startswith("pickle.")] == []
    # torch.load(weights_only=True) unpickles without the pickle module's audit event: watch the files opened too
    opened = [str(args[0]) for event, args in events if event == "open" and isinstance(args[0], (str, Path))]
    assert [name for name in opened if name.endswith((".pt", ".pth", ".bin", ".pkl"))] == []
    assert any(name.endswith("model.safetensors") for name in opened)  # the watch sees the files resume reads
    assert_same_run(result_of(trainer, started.step), reference[1])
    assert_json_or_safetensors(output)


def test_corrupt_newest_falls_back_with_a_warning_then_is_replaced(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = copy_run(reference, tmp_path, keep=(2, 4))
    flip_middle_byte(largest_file(output / "checkpoint-4"))
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        trainer, started = resume(output, save_total_limit=2)
    assert started.step == 2
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert str(output / "checkpoint-4") in skipped[0]
    assert_same_run(result_of(trainer, started.step), reference[1])
    # the damaged checkpoint-4 was replaced by the resumed run's, and rotation kept the newest two
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_existing_checkpoint_folder_is_replaced_only_once_the_new_one_is_durable(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(integration, "_RENAMEAT2", None)
    output = copy_run(reference, tmp_path, keep=(2, 4))
    (output / "checkpoint-4" / "model.safetensors").write_bytes(b"damaged")
    trainer, started = resume(output, max_steps=4)
    assert started.step == 2
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert trainer._safepoint_verify(str(output / "checkpoint-4"))["global_step"] == 4


@pytest.mark.parametrize(
    "damage",
    ["model.safetensors", "trainer_state.json", "training_args.json", "config.json", "payload", "manifest"],
)
def test_explicit_damaged_path_is_refused_naming_it(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path, damage: str
) -> None:
    output = copy_run(reference, tmp_path, keep=(4,))
    checkpoint = output / "checkpoint-4"
    record = checkpoint / "safepoint"
    if damage == "payload":
        target = largest_file(record)
    elif damage == "manifest":
        target = next(record.rglob("manifest.json"))
    else:
        target = checkpoint / damage
    flip_middle_byte(target)
    trainer = build(str(output))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(safepoint.CorruptCheckpointError) as caught:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(checkpoint) in str(caught.value)
    assert_same(dict(trainer.model.state_dict()), before)


@pytest.mark.parametrize("change", ["extra optimizer.pt", "missing file", "not a safepoint checkpoint"])
def test_a_folder_the_commit_does_not_cover_exactly_is_refused(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path, change: str
) -> None:
    output = copy_run(reference, tmp_path, keep=(4,))
    checkpoint = output / "checkpoint-4"
    if change == "extra optimizer.pt":
        (checkpoint / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle the Trainer would torch.load
        expected = "optimizer.pt"
    elif change == "missing file":
        (checkpoint / "generation_config.json").unlink()
        expected = "generation_config.json is missing"
    else:
        shutil.rmtree(checkpoint / "safepoint")
        expected = "not a safepoint checkpoint"
    with pytest.raises(safepoint.CorruptCheckpointError, match=expected) as caught:
        build(str(output)).train(resume_from_checkpoint=str(checkpoint))
    assert str(checkpoint) in str(caught.value)


def test_every_checkpoint_damaged_raises_instead_of_training_from_scratch(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    output = copy_run(reference, tmp_path, keep=(2, 4))
    flip_middle_byte(output / "checkpoint-2" / "model.safetensors")
    shutil.rmtree(output / "checkpoint-4" / "safepoint")
    trainer = build(str(output))
    with pytest.raises(safepoint.CorruptCheckpointError, match="none of the 2 checkpoints") as caught:
        trainer.train(resume_from_checkpoint=True)
    assert str(output / "checkpoint-2") in str(caught.value)
    assert str(output / "checkpoint-4") in str(caught.value)
    assert trainer.state.global_step == 0


def test_rotation_keeps_the_checkpoint_just_saved_over_a_higher_numbered_leftover(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    output = copy_run(reference, tmp_path, keep=(4, 8))
    flip_middle_byte(output / "checkpoint-8" / "model.safetensors")  # a damaged leftover of a later step
    trainer, started = resume(output, max_steps=6, save_total_limit=1)
    assert started.step == 4
    # the Trainer's own rotation orders by number: it would keep the damaged checkpoint-8 and delete checkpoint-6
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-6"]
    assert trainer._safepoint_verify(str(output / "checkpoint-6"))["global_step"] == 6


def test_a_checkpoint_moved_aside_by_a_killed_replacement_is_put_back(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    output = copy_run(reference, tmp_path, keep=(4, 6))
    (output / "checkpoint-6").rename(output / ".checkpoint-6.safepoint-replaced")
    trainer, started = resume(output)
    assert started.step == 6
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert_same_run(result_of(trainer, started.step), reference[1])


# -- killed runs -------------------------------------------------------------------------------------------------
def run_tiny(output: Path, result: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("SP_KILL", None)
    if kill is not None:
        env["SP_KILL"] = kill
    command = [sys.executable, "-m", "tests.integrations.transformers.tiny", str(output), str(result), *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def killed_then_resumed(reference: tuple[Path, dict[str, Any]], tmp_path: Path, kill: str) -> None:
    output = tmp_path / "out"
    killed = run_tiny(output, tmp_path / "unused", kill=kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    newest = (int(kill.split(":")[1]) - 1) // 2 * 2  # the last save that completed before the kill
    visible = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
    assert visible == [f"checkpoint-{s}" for s in range(2, newest + 1, 2)]
    trainer, started = resume(output)
    assert started.step == newest
    assert_same_run(result_of(trainer, started.step), reference[1])
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_killed_mid_save_resumes_bitwise(reference: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    killed_then_resumed(reference, tmp_path, "in-save:6")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["step:5", "publish:6", "in-save:2"])
def test_killed_anywhere_resumes_bitwise(reference: tuple[Path, dict[str, Any]], tmp_path: Path, kill: str) -> None:
    if kill == "in-save:2":  # nothing committed yet: resume=True finds no checkpoint, as the Trainer says
        killed = run_tiny(tmp_path / "out", tmp_path / "unused", kill=kill)
        assert killed.returncode == -9
        assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == []
        with pytest.raises(ValueError, match="No valid checkpoint found"):
            build(str(tmp_path / "out")).train(resume_from_checkpoint=True)
        return
    killed_then_resumed(reference, tmp_path, kill)


# -- packaging ---------------------------------------------------------------------------------------------------
def test_without_transformers_the_import_error_names_the_extra() -> None:
    code = "import sys; sys.modules['transformers'] = None; import safepoint.integrations.transformers"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "ImportError" in done.stderr
    assert "pip install 'safepoint[transformers]'" in done.stderr


def test_only_public_safepoint_names_are_used() -> None:
    source = Path(integration.__file__).read_text(encoding="utf-8")
    used = {line.split()[1] for line in source.splitlines() if line.startswith(("import safepoint", "from safepoint"))}
    assert used == {"safepoint"}
    names = {word.split(".")[1].split("(")[0] for word in source.split() if word.startswith("safepoint.")}
    names.discard("integrations")
    assert names <= set(safepoint.__all__), names - set(safepoint.__all__)


def test_load_best_model_at_end_keeps_and_verifies_the_best_checkpoint(tmp_path: Path) -> None:
    output = tmp_path / "out"
    trainer = build(
        str(output), eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True, save_total_limit=2, eval_dataset=TokenData(),
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    assert ".safepoint" not in best  # the final name, not the staging one it was saved under
    assert Path(best).parent == output
    assert best != str(output / "checkpoint-8")  # the highest loss (greater_is_better) came before the end
    # rotation after each commit kept the best one and the newest
    assert sorted(p.name for p in output.iterdir()) == sorted([Path(best).name, "checkpoint-8"])
    recorded = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert recorded == best
    flip_middle_byte(Path(best) / "model.safetensors")
    with pytest.raises(safepoint.CorruptCheckpointError, match=r"model\.safetensors"):
        trainer._load_best_model()
