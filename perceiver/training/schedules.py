"""Learning-rate schedules stepped after every optimizer step.

An epoch-wise schedule holds each rate for a whole epoch, so on a short run a one-epoch warm-up trains the
first epoch at the warm-up's starting rate. These change the rate at every step; they are written in epochs
(what a user knows when writing the config) and counted in steps.
"""

from __future__ import annotations

import math

import torch

DECAYS = ("cosine", "linear", "constant")


class StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A linear warm-up from 0 to each group's learning rate over `warmup_epochs`, then a `decay` (cosine |
    linear | constant) to `final_lr_ratio` times that rate at the end of `epochs`. Step it after every
    optimizer step; its state (the step count) is saved with the checkpoint like any torch scheduler's."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
        warmup_epochs: float = 1.0,
        decay: str = "cosine",
        final_lr_ratio: float = 0.0,
    ) -> None:
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r} is invalid: choose one of {', '.join(DECAYS)}")
        if not 0.0 <= final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio={final_lr_ratio} is invalid: it must lie in [0, 1]")
        if warmup_epochs < 0 or steps_per_epoch < 1 or epochs < 1:
            raise ValueError(
                f"warmup_epochs={warmup_epochs}, steps_per_epoch={steps_per_epoch}, epochs={epochs}: "
                "the warm-up cannot be negative and a run has at least one step"
            )
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = min(round(warmup_epochs * steps_per_epoch), self.total_steps)
        self.decay, self.final_lr_ratio = decay, final_lr_ratio
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """The learning rate at `step` (0 = the first) as a fraction of the configured one."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 1.0
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * shape

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]  # last_epoch counts steps here
