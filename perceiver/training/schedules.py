"""Learning-rate schedules set before every optimizer step.

An epoch-wise schedule holds each rate for a whole epoch, so on a short run a one-epoch warm-up trains the
first epoch at the warm-up's starting rate. `StepSchedule` sets the rate at every step from the training
progress in epochs (the end of the step about to be taken), so it holds no
state of its own and a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

DECAYS = ("cosine", "linear", "constant")


class StepSchedule:
    """A linear warm-up from 0 to each group's learning rate over `warmup_epochs`, then a `decay` (cosine |
    linear | constant) to `final_lr_ratio` times that rate at the end of `epochs`."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        warmup_epochs: float = 1.0,
        decay: str = "cosine",
        final_lr_ratio: float = 0.0,
    ) -> None:
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r} is invalid: choose one of {', '.join(DECAYS)}")
        if not 0.0 <= final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio={final_lr_ratio} is invalid: it must lie in [0, 1]")
        if warmup_epochs < 0 or epochs < 1:
            raise ValueError(
                f"warmup_epochs={warmup_epochs}, epochs={epochs}: the warm-up cannot be negative and a run has "
                "at least one epoch"
            )
        self.optimizer, self.epochs, self.warmup_epochs = optimizer, epochs, warmup_epochs
        self.decay, self.final_lr_ratio = decay, final_lr_ratio
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(self, progress: float) -> float:
        """The rate after `progress` epochs of training, as a fraction of the configured one."""
        if progress < self.warmup_epochs:
            return progress / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        done = min(1.0, (progress - self.warmup_epochs) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * done))
        elif self.decay == "linear":
            shape = 1.0 - done
        else:
            shape = 1.0
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * shape

    def set_step(self, step: int, steps_per_epoch: int | None) -> None:
        """Set every group's rate for the `step`-th step (the first is 1), with `steps_per_epoch` steps an epoch."""
        if steps_per_epoch is None:
            raise ValueError("a per-step schedule measures progress in epochs: the train loader must have a length")
        factor = self.factor(step / steps_per_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = list(state["base_lrs"])
