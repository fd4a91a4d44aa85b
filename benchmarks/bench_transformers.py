"""The Transformers Trainer's own checkpointing against SafepointTrainerMixin: same model, same data, one run.

A GPT-2 built from a config (no download; about 10 M parameters with the defaults, so ~40 MB of weights and
~80 MB of AdamW state) trains on random tokens on the CPU, saving every ``--save-steps`` steps. Two trainers run
side by side in one process, alternating, each repeat in a fresh output directory:

- ``default``: ``Trainer`` as shipped (safetensors weights, ``torch.save`` pickles for the optimizer, scheduler,
  RNG and training arguments; no fsync).
- ``safepoint``: ``class T(SafepointTrainerMixin, Trainer)``.

For each save, ``blocked`` is the wall time of ``Trainer._save_checkpoint`` (the training loop waits for all of
it: both are synchronous), and ``durable`` is the time until the checkpoint would survive a power loss. For the
mixin they are the same (it returns after the commit and the directory fsyncs). For the default, ``durable`` adds
what it would take to make its files durable afterwards: an fsync of every file it wrote and of the folders.
``os.sync()`` runs before every timed save, so no save pays for the previous one's dirty pages.

Run ``PYTHONPATH=src .venv/bin/python benchmarks/bench_transformers.py --help``; medians and ratios are printed
and written to ``benchmarks/out/bench_transformers.md`` (every timing in ``bench_transformers.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _durable import fsync_tree
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from safepoint.integrations.transformers import SafepointTrainerMixin

ROOT = Path(__file__).resolve().parent
METHODS = ("default", "safepoint")


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, vocab: int, length: int, samples: int) -> None:
        self.ids = torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Timed:
    """Times each ``_save_checkpoint``; ``durable_after`` makes the default's folder durable, timed apart."""

    timings: list[dict[str, float]]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        os.sync()
        start = time.perf_counter()
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        blocked = time.perf_counter() - start
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")  # type: ignore[attr-defined]
        extra = 0.0
        if not isinstance(self, SafepointTrainerMixin):
            start = time.perf_counter()
            fsync_tree(folder)
            extra = time.perf_counter() - start
        self.timings.append({"blocked": blocked, "durable": blocked + extra})


class DefaultTrainer(Timed, Trainer):
    pass


class SafepointTrainer(Timed, SafepointTrainerMixin, Trainer):
    pass


def run(method: str, output: str, options: argparse.Namespace) -> list[dict[str, float]]:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=options.vocab, n_positions=options.length, n_embd=options.width, n_layer=options.layers,
        n_head=8, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=output, max_steps=options.saves * options.save_steps, save_strategy="steps",
        save_steps=options.save_steps, save_total_limit=2, per_device_train_batch_size=2, logging_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    cls = DefaultTrainer if method == "default" else SafepointTrainer
    trainer = cls(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens(options.vocab, options.length, 64))
    trainer.timings = []
    trainer.train()
    return trainer.timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--saves", type=int, default=3, help="saves per run")
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method, alternating")
    parser.add_argument("--dir", default=None, help="where the runs write (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    options = parser.parse_args()
    base = Path(options.dir or tempfile.mkdtemp(prefix="bench_transformers-"))
    timings: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
    for repeat in range(options.repeats):
        order = METHODS if repeat % 2 == 0 else METHODS[::-1]
        for method in order:
            output = base / f"{method}-{repeat}"
            timings[method].extend(run(method, str(output), options))
            shutil.rmtree(output)
    medians = {
        method: {kind: statistics.median(t[kind] for t in timings[method]) for kind in ("blocked", "durable")}
        for method in METHODS
    }
    params = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(
        vocab_size=options.vocab, n_positions=options.length, n_embd=options.width, n_layer=options.layers, n_head=8,
    )).parameters())  # fmt: skip
    lines = [
        f"# bench_transformers ({platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__})",
        "",
        f"GPT-2, {params / 1e6:.1f} M parameters; {len(timings['default'])} saves per method; directory {base}",
        "",
        "| method | blocked (median s) | until durable (median s) |",
        "|---|---|---|",
        *(f"| {m} | {medians[m]['blocked']:.3f} | {medians[m]['durable']:.3f} |" for m in METHODS),
        "",
        f"safepoint / default: blocked {medians['safepoint']['blocked'] / medians['default']['blocked']:.2f}x, "
        f"until durable {medians['safepoint']['durable'] / medians['default']['durable']:.2f}x",
    ]
    print("\n".join(lines))
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "bench_transformers.md").write_text("\n".join(lines) + "\n")
    (options.out / "bench_transformers.json").write_text(json.dumps({"options": vars(options) | {"out": str(
        options.out)}, "timings": timings}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
