"""TRL's trainers through the mixin: a real SFTTrainer saves and resumes bitwise, offline, on the CPU; and a
trainer that writes extra state files into the checkpoint folder the way TRL's GRPOTrainer does gets them inside
the one commit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

import safepoint
from safepoint.integrations.transformers import SafepointTrainerMixin
from tests.helpers import assert_same
from tests.integrations.transformers.tiny import StartedAt, build

WORDS = [f"w{i}" for i in range(40)]
VOCAB = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


class SafeSFTTrainer(SafepointTrainerMixin, SFTTrainer):
    pass


def tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def sft_trainer(output: Path) -> SafeSFTTrainer:
    generator = torch.Generator().manual_seed(3)
    texts = [" ".join(WORDS[j] for j in torch.randint(0, 40, (6,), generator=generator).tolist()) for _ in range(8)]
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1,
        pad_token_id=0,
    )  # fmt: skip
    args = SFTConfig(
        output_dir=str(output), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, max_length=16,
    )  # fmt: skip
    return SafeSFTTrainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer(),
    )


def test_sft_trainer_saves_and_resumes_bitwise_through_the_mixin(tmp_path: Path) -> None:
    output = tmp_path / "out"
    uninterrupted = sft_trainer(output)
    uninterrupted.train()
    checkpoint = output / "checkpoint-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "tokenizer.json" in names
    assert "safepoint" in names
    assert [n for n in names if n.endswith((".bin", ".pt", ".pth"))] == []
    shutil.rmtree(checkpoint)
    resumed = sft_trainer(output)
    started = StartedAt()
    resumed.add_callback(started)
    resumed.train(resume_from_checkpoint=True)
    assert started.step == 2
    assert resumed.state.global_step == 4
    assert_same(dict(resumed.model.state_dict()), dict(uninterrupted.model.state_dict()), "model")
    assert_same(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict(), "optimizer")


class ExtraStateTrainer(Trainer):
    """Writes and reads an extra JSON file in the checkpoint folder exactly as TRL's GRPOTrainer does with
    ``entropy_ctrl_state.json`` (``_save_checkpoint`` after super, ``_load_optimizer_and_scheduler``)."""

    coefficient = 0.5

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with open(os.path.join(folder, "extra_state.json"), "w") as file:
            json.dump({"coefficient": self.coefficient * self.state.global_step}, file)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            with open(os.path.join(checkpoint, "extra_state.json")) as file:
                self.coefficient = json.load(file)["coefficient"]


class SafeExtraStateTrainer(SafepointTrainerMixin, ExtraStateTrainer):
    pass


def test_extra_state_files_of_a_trl_style_trainer_are_inside_the_commit(tmp_path: Path) -> None:
    output = tmp_path / "out"
    build(str(output), trainer_class=SafeExtraStateTrainer, max_steps=4).train()
    assert json.loads((output / "checkpoint-4" / "extra_state.json").read_text()) == {"coefficient": 2.0}
    assert not any(p.name.startswith(".") for p in output.iterdir())
    resumed = build(str(output), trainer_class=SafeExtraStateTrainer, max_steps=4)
    assert isinstance(resumed, SafeExtraStateTrainer)
    resumed.train(resume_from_checkpoint=str(output / "checkpoint-4"))
    assert resumed.coefficient == 2.0  # read back by the trainer's own loader
    (output / "checkpoint-4" / "extra_state.json").write_text('{"coefficient": 9.0}')
    with pytest.raises(safepoint.CorruptCheckpointError, match=r"extra_state\.json"):
        build(str(output), trainer_class=SafeExtraStateTrainer).train(
            resume_from_checkpoint=str(output / "checkpoint-4")
        )
