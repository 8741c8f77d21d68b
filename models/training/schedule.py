"""The learning-rate schedule: linear warmup, then step decay (``multistep``) or ``cosine``.

Stepped every optimizer step. The schedule is a function of the module's settings and the
run's length; only its position (the step count) is checkpointed, so a resumed run follows the
settings it was started with now (a longer ``max_epochs`` stretches a cosine run).

The run's length is read when training starts (``StepSchedule.refresh``), not when the
optimizer is configured: asking the trainer earlier would build the train loader before a
resumed run's loader state is restored, and its interrupted epoch would start over.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SCHEDULES = ("multistep", "cosine")


@dataclass
class LrFactor:
    """LR multiplier at optimizer step ``step``: linear warmup, then multistep or cosine.

    ``lengths()`` gives (optimizer steps per epoch, total optimizer steps); until ``resolve``
    has read them the factor is 1.
    """

    schedule: str
    milestones: tuple[int, ...]
    gamma: float
    warmup_epochs: float
    min_lr_ratio: float
    lengths: Callable[[], tuple[float, float]] | None = None
    steps_per_epoch: float = math.nan
    total_steps: float = math.nan
    warmup_steps: int = field(default=0)

    def resolve(self) -> None:
        if self.lengths is not None:
            self.steps_per_epoch, self.total_steps = self.lengths()
        if self.warmup_epochs:
            self.warmup_steps = round(self.warmup_epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        if math.isnan(self.steps_per_epoch):
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "multistep":
            epoch = step / self.steps_per_epoch
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        span = max(1.0, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over one ``LrFactor`` whose checkpoint holds the position only.

    LambdaLR would also save the factor's fields and the base LRs and restore them over the
    ones configured now; here a resumed run continues at its step with the current settings.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: LrFactor) -> None:
        self.factor = factor
        super().__init__(optimizer, factor)

    def refresh(self) -> None:
        """Read the run's length and set the LR of the current step (at the start of training,
        after a resumed run's state is back)."""
        self.factor.resolve()
        scale = self.factor(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * scale
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the position only; the LR follows at refresh(), when training starts
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
