"""The zoo's cases: what each builds (model, optimizer, scheduler, scaler, loader, RNG) and how one step trains.

Importing this module is cheap: torch only. Transformers, torchdata and Lightning are imported by the cases that
use them, inside the worker process. Every state holds ``safepoint.RNGState()`` and every step draws from the
Python, NumPy and torch generators (data, dropout), so a resume that does not restore the RNG diverges.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as sched

import safepoint

Draw = Callable[[], Any]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))


def draw_batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs scaled by the Python and NumPy generators, so those must be restored too."""
    scale = 1.0 + random.random() + float(np.random.rand())
    return torch.randn(n, 6) * scale, torch.randint(0, 3, (n,))


def classify(model: nn.Module, data: Any) -> torch.Tensor:
    inputs, target = data
    return F.cross_entropy(model(inputs), target)


def group_trace(optimizer: torch.optim.Optimizer) -> list[float]:
    """Per-group values that schedulers drive: lr, momentum, first beta."""
    values: list[float] = []
    for group in optimizer.param_groups:
        values.append(float(group["lr"]))
        if "momentum" in group:
            values.append(float(group["momentum"]))
        if "betas" in group:
            values.append(float(group["betas"][0]))
    return values


class Loop:
    """A plain training loop over a state dict; ``step`` returns the values compared per step (loss first)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        draw: Draw = draw_batch,
        loss: LossFn = classify,
        closure: bool = False,
        plateau: bool = False,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.draw, self.loss_fn, self.closure, self.plateau = draw, loss, closure, plateau
        self.progress: dict[str, int] = {"step": -1, "seen": 0}
        self.state: dict[str, Any] = {"model": model, "optimizer": optimizer}
        if scheduler is not None:
            self.state["scheduler"] = scheduler
        self.state["rng"] = safepoint.RNGState()
        self.state["progress"] = self.progress

    def backward(self, data: Any) -> torch.Tensor:
        loss = self.loss_fn(self.model, data)
        loss.backward()
        return loss

    def update(self, data: Any) -> torch.Tensor:
        if self.closure:

            def closure() -> torch.Tensor:
                self.optimizer.zero_grad()
                return self.backward(data)

            loss = self.optimizer.step(closure)
            assert isinstance(loss, torch.Tensor)
        else:
            loss = self.backward(data)
            self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def step(self, step: int) -> list[float]:
        self.model.train()
        loss = self.update(self.draw())
        if self.scheduler is not None:
            if self.plateau:
                self.scheduler.step(loss.item())
            else:
                self.scheduler.step()
        self.progress["step"] = step
        self.progress["seen"] += 1
        return [loss.item(), *group_trace(self.optimizer), *self.extra_trace()]

    def extra_trace(self) -> list[float]:
        return []


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Loop]
    covers: tuple[str, ...] = ()  # torch.optim / lr_scheduler class names this case exercises
    steps: int = 8
    stop_at: int = 4  # steps trained before the checkpoint; the resumed run trains the rest


# -- optimizers ----------------------------------------------------------------------------------------------


def optimizer_case(name: str, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], **loop: Any) -> Case:
    def build() -> Loop:
        model = mlp()
        return Loop(model, make(list(model.parameters())), **loop)

    return Case(f"optim-{name}", build, covers=(name.split("-", maxsplit=1)[0],))


def sparse_adam() -> Loop:
    model = nn.Sequential(nn.Embedding(12, 4, sparse=True), nn.Dropout(0.2))

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 12, (5,)), torch.randn(5, 4) * (1.0 + random.random())

    def loss(module: nn.Module, data: Any) -> torch.Tensor:
        index, target = data
        return (module(index) - target).pow(2).mean()

    return Loop(model, torch.optim.SparseAdam(list(model.parameters()), lr=0.05), draw=draw, loss=loss)


def muon() -> Loop:
    model = mlp()
    matrices = [p for p in model.parameters() if p.ndim == 2]  # Muon takes 2-D parameters only
    return Loop(model, torch.optim.Muon(matrices, lr=0.02))


OPTIMIZER_CASES = [
    optimizer_case("SGD", lambda p: torch.optim.SGD(p, lr=0.05)),
    optimizer_case(
        "SGD-nesterov", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ),
    optimizer_case("SGD-dampening", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, maximize=False)),
    optimizer_case("Adam", lambda p: torch.optim.Adam(p, lr=1e-2)),
    optimizer_case("Adam-amsgrad", lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3)),
    optimizer_case("Adam-fused", lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)),
    optimizer_case("Adam-forloop", lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False)),
    optimizer_case("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)),
    optimizer_case("AdamW-amsgrad", lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True)),
    optimizer_case("Adamax", lambda p: torch.optim.Adamax(p, lr=1e-2)),
    optimizer_case("Adadelta", lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=1e-3)),
    optimizer_case("Adagrad", lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    optimizer_case("Adafactor", lambda p: torch.optim.Adafactor(p, lr=1e-2)),
    optimizer_case("ASGD", lambda p: torch.optim.ASGD(p, lr=0.05, t0=2)),
    optimizer_case("NAdam", lambda p: torch.optim.NAdam(p, lr=1e-2, momentum_decay=4e-3)),
    optimizer_case(
        "NAdam-decoupled", lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)
    ),
    optimizer_case("RAdam", lambda p: torch.optim.RAdam(p, lr=1e-2)),
    optimizer_case(
        "RAdam-decoupled", lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)
    ),
    optimizer_case("RMSprop", lambda p: torch.optim.RMSprop(p, lr=1e-2)),
    optimizer_case("RMSprop-centered", lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True)),
    optimizer_case("Rprop", lambda p: torch.optim.Rprop(p, lr=1e-2)),
    optimizer_case("LBFGS", lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3, history_size=4), closure=True),
    optimizer_case(
        "LBFGS-wolfe",
        lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3, history_size=4, line_search_fn="strong_wolfe"),
        closure=True,
    ),
    Case("optim-SparseAdam", sparse_adam, covers=("SparseAdam",)),
    Case("optim-Muon", muon, covers=("Muon",)),
]

# -- schedulers ----------------------------------------------------------------------------------------------


class Warmup:
    """A callable object as LambdaLR's lr_lambda: torch saves its __dict__ (a plain function is not saved)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.calls = 0

    def __call__(self, epoch: int) -> float:
        self.calls += 1
        return min(1.0, (epoch + 1) / self.steps)


def scheduler_case(
    name: str, make: Callable[[torch.optim.Optimizer], Any], covers: tuple[str, ...] = (), *, plateau: bool = False
) -> Case:
    def build() -> Loop:
        model = mlp()
        first, *_, last = model.children()  # two param groups with their own learning rates, as in fine-tuning
        groups = [{"params": first.parameters(), "lr": 0.1}, {"params": last.parameters(), "lr": 0.05}]
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        return Loop(model, optimizer, make(optimizer), plateau=plateau)

    return Case(f"sched-{name}", build, covers=covers or (name.split("-", maxsplit=1)[0],))


SCHEDULER_CASES = [
    scheduler_case("LambdaLR", lambda o: sched.LambdaLR(o, lambda e: 0.9**e)),
    scheduler_case("LambdaLR-object", lambda o: sched.LambdaLR(o, Warmup(5))),
    scheduler_case("MultiplicativeLR", lambda o: sched.MultiplicativeLR(o, lambda e: 0.95)),
    scheduler_case("StepLR", lambda o: sched.StepLR(o, step_size=3, gamma=0.5)),
    scheduler_case("MultiStepLR", lambda o: sched.MultiStepLR(o, milestones=[2, 5, 5], gamma=0.5)),
    scheduler_case("ConstantLR", lambda o: sched.ConstantLR(o, factor=0.5, total_iters=5)),
    scheduler_case("LinearLR", lambda o: sched.LinearLR(o, start_factor=0.2, total_iters=6)),
    scheduler_case("ExponentialLR", lambda o: sched.ExponentialLR(o, gamma=0.9)),
    scheduler_case("CosineAnnealingLR", lambda o: sched.CosineAnnealingLR(o, T_max=5, eta_min=1e-3)),
    scheduler_case(
        "CosineAnnealingWarmRestarts", lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=1e-3)
    ),
    scheduler_case("PolynomialLR", lambda o: sched.PolynomialLR(o, total_iters=6, power=2.0)),
    scheduler_case(
        "ReduceLROnPlateau",
        lambda o: sched.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=0, cooldown=1, threshold=0.05),
        plateau=True,
    ),
    scheduler_case(
        "CyclicLR", lambda o: sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2, mode="triangular2")
    ),
    scheduler_case(
        "CyclicLR-exp-range",
        lambda o: sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, mode="exp_range", gamma=0.9),
    ),
    scheduler_case(
        "CyclicLR-scale-fn",
        lambda o: sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2, scale_fn=lambda x: 0.8**x),
    ),
    scheduler_case("OneCycleLR", lambda o: sched.OneCycleLR(o, max_lr=0.2, total_steps=10, pct_start=0.4)),
    scheduler_case(
        "SequentialLR",
        lambda o: sched.SequentialLR(
            o, [sched.LinearLR(o, start_factor=0.2, total_iters=3), sched.ExponentialLR(o, gamma=0.8)], milestones=[3]
        ),
        covers=("SequentialLR", "LinearLR", "ExponentialLR"),
    ),
    scheduler_case(
        "ChainedScheduler",
        lambda o: sched.ChainedScheduler(
            [sched.ConstantLR(o, factor=0.5, total_iters=5), sched.ExponentialLR(o, gamma=0.9)]
        ),
        covers=("ChainedScheduler", "ConstantLR", "ExponentialLR"),
    ),
]

# -- the rest ------------------------------------------------------------------------------------------------


class ScaledLoop(Loop):
    """torch.amp.GradScaler on CPU with bf16 autocast; a huge initial scale makes it back off and grow mid-run."""

    def __init__(self) -> None:
        model = mlp()
        super().__init__(model, torch.optim.Adam(model.parameters(), lr=1e-2))
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**118, growth_factor=4.0, growth_interval=2)
        self.state["scaler"] = self.scaler

    def update(self, data: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.loss_fn(self.model, data)
        self.scaler.scale(loss * 256.0).backward()  # a large loss overflows the huge scale: steps are skipped
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return loss.float()

    def extra_trace(self) -> list[float]:
        return [self.scaler.get_scale()]


class ExtraState(nn.Module):
    """Keeps a Python counter and a running mean outside its parameters, saved through get/set_extra_state."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.seen = 0
        self.mean = torch.zeros(3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(inputs)
        if self.training:
            self.seen += inputs.shape[0]
            self.mean = 0.9 * self.mean + 0.1 * out.detach().mean(0)
        return out + self.mean * (1.0 + self.seen / 100)

    def get_extra_state(self) -> dict[str, Any]:
        return {"seen": self.seen, "mean": self.mean}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.mean = state["mean"]


def extra_state() -> Loop:
    model = ExtraState()
    return Loop(model, torch.optim.Adam(model.parameters(), lr=1e-2))


class GPT2Loop(Loop):
    """A tiny GPT-2 (built from a config, no download) whose lm_head shares its weight with the embeddings."""

    def __init__(self) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True)
        model = GPT2LMHeadModel(config)
        assert self.tied(model), "the zoo's GPT-2 must tie lm_head to wte"

        def draw() -> torch.Tensor:
            return torch.randint(0, 32, (2, 8))

        def loss(module: nn.Module, ids: Any) -> torch.Tensor:
            result: torch.Tensor = module(input_ids=ids, labels=ids).loss
            return result

        super().__init__(model, torch.optim.AdamW(model.parameters(), lr=1e-2), draw=draw, loss=loss)

    @staticmethod
    def tied(model: nn.Module) -> bool:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
        return bool(head.weight is embedding.weight)

    def extra_trace(self) -> list[float]:
        return [float(self.tied(self.model))]


class LoaderLoop(Loop):
    """Batches from a shuffling StatefulDataLoader; saved mid-epoch, the run crosses an epoch boundary after."""

    def __init__(self, workers: int) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import RandomSampler

        inputs = torch.randn(22, 6)
        targets = torch.randint(0, 3, (22,))
        dataset = torch.utils.data.TensorDataset(inputs, targets)
        # Generators of its own: with none, every new iterator draws a seed from the global RNG, and a resumed run
        # creates one mid-epoch where the uninterrupted run did not, so dropout would differ even with torch.save.
        # The sampler's is separate from the loader's: the loader's (worker base seeds) is drawn from again by the
        # resumed iterator, which would shift the shared stream and reshuffle the next epoch differently.
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(5))
        seeds = torch.Generator().manual_seed(6)
        self.loader = StatefulDataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers, generator=seeds)
        self.batches: Iterator[Any] | None = None
        model = mlp()
        super().__init__(model, torch.optim.Adam(model.parameters(), lr=1e-2), draw=self.next_batch)
        self.state["loader"] = self.loader

    def next_batch(self) -> Any:
        if self.batches is None:
            self.batches = iter(self.loader)
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def extra_trace(self) -> list[float]:
        return [float(self.progress["seen"])]


class AveragingLoop(Loop):
    """Stochastic weight averaging and an EMA of the weights (torch.optim.swa_utils), with SWALR."""

    def __init__(self) -> None:
        from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        super().__init__(model, optimizer, SWALR(optimizer, swa_lr=0.05, anneal_epochs=3))
        self.averages = [AveragedModel(model), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))]
        self.state["swa"], self.state["ema"] = self.averages

    def step(self, step: int) -> list[float]:
        trace = super().step(step)
        for average in self.averages:
            average.update_parameters(self.model)
        return trace


def batchnorm() -> Loop:
    """Buffers next to the parameters: running statistics and an int64 batch counter."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
    return Loop(model, torch.optim.Adam(model.parameters(), lr=1e-2))


def bfloat16() -> Loop:
    """A bf16 model: parameters and optimizer state in a dtype numpy has no name for."""

    def loss(module: nn.Module, data: Any) -> torch.Tensor:
        inputs, target = data
        return F.cross_entropy(module(inputs.bfloat16()).float(), target)

    model = mlp().bfloat16()
    return Loop(model, torch.optim.AdamW(model.parameters(), lr=1e-2), loss=loss)


OTHER_CASES = [
    Case("swa-averaged-ema", AveragingLoop, covers=("SWALR",)),
    Case("module-batchnorm", batchnorm),
    Case("model-bfloat16", bfloat16),
    Case("amp-GradScaler", ScaledLoop, steps=10, stop_at=5),
    Case("module-extra-state", extra_state),
    Case("transformers-gpt2-tied", GPT2Loop),
    Case("loader-workers-0", lambda: LoaderLoop(0), steps=10, stop_at=4),
    Case("loader-workers-2", lambda: LoaderLoop(2), steps=10, stop_at=4),
]

CASES: dict[str, Case] = {case.name: case for case in [*OPTIMIZER_CASES, *SCHEDULER_CASES, *OTHER_CASES]}
