"""Learning-rate schedules as pure functions of the step (so resuming needs only the step number).

The runner sets the lr before every iteration ``i`` of epoch ``e`` (global step ``t = e * iters_per_epoch + i``),
as upstream does, and applies the same value to every parameter group.

``linear_warmup_cosine_lr`` (upstream formula): for ``t < warmup_steps`` the lr rises linearly from
``warmup_lr`` towards ``init_lr``; afterwards ``min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * t / T))`` with
``T = max_epoch * iters_per_epoch``. The cosine is measured from step 0, so the lr drops a little at the end of
the warmup (paper recipe: 2.993e-5 at t=399, 2.809e-5 at t=400). ``run.cosine_after_warmup=True`` measures
the cosine from the end of the warmup instead (continuous). Upstream computes the warmup from the in-epoch
step, which restarts the ramp each epoch when the warmup is longer than an epoch; we use the global step
(identical whenever the warmup fits in the first epoch, as in the paper recipe).

``linear_warmup_step_lr``: warmup during epoch 0, then ``max(min_lr, init_lr * lr_decay_rate ** epoch)``.
``constant_lr``: warmup, then ``init_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

SCHEDULES = ("linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr")


def warmup_lr(step: int, *, warmup_steps: int, warmup_lr: float, init_lr: float) -> float:
    return min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / max(warmup_steps, 1))


@dataclass(frozen=True)
class LRSchedule:
    name: str
    init_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    iters_per_epoch: int
    max_epoch: int
    cosine_after_warmup: bool = False
    decay_rate: Optional[float] = None

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"run.lr_sched: unknown schedule {self.name!r}; known: {', '.join(SCHEDULES)}")
        if self.name == "linear_warmup_step_lr" and self.decay_rate is None:
            raise ValueError("run.lr_sched=linear_warmup_step_lr needs run.lr_decay_rate")

    @classmethod
    def from_run_config(cls, run) -> "LRSchedule":
        return cls(name=run.lr_sched, init_lr=float(run.init_lr), min_lr=float(run.min_lr),
                   warmup_lr=float(run.warmup_lr), warmup_steps=int(run.warmup_steps),
                   iters_per_epoch=int(run.iters_per_epoch), max_epoch=int(run.max_epoch),
                   cosine_after_warmup=bool(run.cosine_after_warmup),
                   decay_rate=None if run.lr_decay_rate is None else float(run.lr_decay_rate))

    @property
    def total_steps(self) -> int:
        return self.max_epoch * self.iters_per_epoch

    def __call__(self, step: int) -> float:
        """The lr for global step ``step`` (0-based)."""
        epoch = step // self.iters_per_epoch
        warm = dict(warmup_steps=self.warmup_steps, warmup_lr=self.warmup_lr, init_lr=self.init_lr)
        if self.name == "linear_warmup_step_lr":
            if epoch == 0:
                return warmup_lr(step, **warm)
            return max(self.min_lr, self.init_lr * self.decay_rate ** epoch)
        if step < self.warmup_steps:
            return warmup_lr(step, **warm)
        if self.name == "constant_lr":
            return self.init_lr
        if self.cosine_after_warmup:
            span = max(1, self.total_steps - self.warmup_steps)
            progress = (step - self.warmup_steps) / span
        else:
            progress = step / max(1, self.total_steps)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
