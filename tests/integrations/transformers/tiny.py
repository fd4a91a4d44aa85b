"""A tiny GPT-2 trained by a real Trainer with SafepointTrainerMixin; run as a script by the tests.

``python -m tests.integrations.transformers.tiny OUTPUT RESULT [--resume] [--trainer sft]`` trains, optionally
resumes with ``resume_from_checkpoint=True``, and saves the final weights, optimizer state and step to RESULT with
``safepoint.save``. ``SP_KILL=<point>:<step>`` (and ``SP_KILL_RANK``) make the process SIGKILL itself: ``step``
before the save of that step, ``in-save`` after the model files are staged and before safepoint commits,
``publish`` after the commit and before the rename. Under ``torch.distributed.run`` it runs as every rank.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import safepoint
from safepoint.integrations.transformers import SafepointTrainerMixin
from tests.helpers import end_rank

VOCAB, LENGTH, SAMPLES = 64, 8, 8


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def training_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": 8,
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def _kill_point() -> tuple[str, int] | None:
    spec = os.environ.get("SP_KILL")
    if not spec:
        return None
    rank = os.environ.get("SP_KILL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    point, step = spec.split(":")
    return point, int(step)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            _die()


class StartedAt(TrainerCallback):
    """Records the step training (re)started from."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step


class KillingTrainer(SafepointTrainerMixin, Trainer):
    """The user's one-line trainer, plus the test's kill points inside a save."""

    kill: tuple[str, int] | None = None

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.kill == ("in-save", self.state.global_step):
            _die()

    def _safepoint_publish(self, staged: str, final: str) -> None:
        if self.kill == ("publish", self.state.global_step):
            _die()
        super()._safepoint_publish(staged, final)


def build(
    output_dir: str,
    trainer_class: type[Trainer] = KillingTrainer,
    eval_dataset: TokenData | None = None,
    **overrides: Any,
) -> Trainer:
    args = training_args(output_dir, **overrides)
    return trainer_class(model=tiny_model(), args=args, train_dataset=TokenData(), eval_dataset=eval_dataset)


def result_of(trainer: Trainer, started: int | None) -> dict[str, Any]:
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "global_step": trainer.state.global_step,
        "started": started,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("result")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--limit", type=int, default=None)
    options = parser.parse_args()
    kill = _kill_point()
    trainer = build(options.output, save_total_limit=options.limit)
    assert isinstance(trainer, KillingTrainer)
    trainer.kill = kill
    started = StartedAt()
    trainer.add_callback(started)
    if kill is not None and kill[0] == "step":
        trainer.add_callback(KillAt(kill[1]))
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    if trainer.args.process_index == 0:
        safepoint.save(options.result, result_of(trainer, started.step))
    end_rank()


if __name__ == "__main__":
    main()
