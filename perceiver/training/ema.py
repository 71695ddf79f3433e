"""An exponential moving average (EMA) of the weights (`trainer.ema_decay`).

Averaging the weights of the last few hundred steps smooths away the noise a high learning rate leaves in them;
on a short run the average often validates better than the weights themselves, so the loop evaluates it beside
them at every epoch end and keeps whichever has the lower validation loss.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """`average = d * average + (1 - d) * weights` after every optimizer step, with d = min(decay, (1 + n) /
    (10 + n)) at the n-th update: early averages do not drag the initial weights along. Integer buffers are copied.
    The count stays on the host, so an update never waits on the device. A skipped (non-finite) step leaves the
    weights alone, and its update moves the average towards those unchanged weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} is invalid: it must lie in (0, 1), e.g. 0.999")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        averaged, current = [], []
        for mine, theirs in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                mine.copy_(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
