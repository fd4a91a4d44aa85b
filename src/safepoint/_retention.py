"""Retention policies as pure functions: (committed checkpoints) -> the steps to keep.

The kept set is the union of the policies that are set: the newest ``keep_last``, the best ``keep_best`` by
``best_metric``, and every step divisible by ``keep_every``. The newest committed step and any protected step
(the one just saved) are always kept. With no policy set, everything is kept. Nothing here touches storage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ._errors import ConfigError
from ._validate import positive_int

__all__ = ["RetentionPolicy", "steps_to_keep"]


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            positive_int(name, getattr(self, name), allow_none=True)
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"best_mode must be 'min' or 'max', not {self.best_mode!r}")
        if self.keep_best is not None and not (isinstance(self.best_metric, str) and self.best_metric):
            raise ConfigError("keep_best needs best_metric: the name of a metric passed to save(metrics=...)")
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise ConfigError(f"best_metric must be a string, not {self.best_metric!r}")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and self.keep_best is None and self.keep_every is None


def steps_to_keep(
    policy: RetentionPolicy, metrics_by_step: Mapping[int, Mapping[str, float]], protect: Iterable[int] = ()
) -> set[int]:
    """The committed steps to keep under ``policy``. ``metrics_by_step`` lists every committed step."""
    steps = sorted(metrics_by_step)
    if policy.keeps_everything or not steps:
        return set(steps)
    keep = {steps[-1], *(s for s in protect if s in metrics_by_step)}
    if policy.keep_last is not None:
        keep.update(steps[-policy.keep_last :])
    if policy.keep_every is not None:
        keep.update(s for s in steps if s % policy.keep_every == 0)
    if policy.keep_best is not None and policy.best_metric is not None:
        keep.update(_best(policy, metrics_by_step, policy.best_metric, policy.keep_best))
    return keep


def _best(policy: RetentionPolicy, metrics_by_step: Mapping[int, Mapping[str, float]], name: str, n: int) -> list[int]:
    scored = []
    for step, metrics in metrics_by_step.items():
        value = metrics.get(name)
        if value is None or math.isnan(value):
            continue  # a checkpoint without the metric (or a NaN loss) is never "best"
        scored.append((value if policy.best_mode == "min" else -value, -step, step))
    return [step for *_, step in sorted(scored)[:n]]
