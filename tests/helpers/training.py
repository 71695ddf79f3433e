"""Tiny training problems for the tests of the loop: a two-class data set a tiny Perceiver learns in three
epochs of three steps, random batches, and a model that turns its logits into NaN on a chosen step."""

from __future__ import annotations

import math
from typing import Any

import torch

from perceiver import Perceiver
from perceiver.data import ArrayDataset, DeviceBatches

# A Perceiver small enough to train on the CPU in milliseconds a step, for two classes of 8 x 8 images.
TINY_CLASSIFIER = {
    "image_size": 8,
    "patch_size": 4,
    "num_classes": 2,
    "latent_dim": 4,
    "projection_dim": 8,
    "num_heads": 1,
}
TIMING = ("images_per_second", "epoch_seconds", "perf/tflops", "perf/mfu")  # wall-clock figures of an epoch row


def tiny_problem(seed: int = 0) -> tuple[DeviceBatches, DeviceBatches]:
    """96 training images (3 batches of 32) and 32 validation images; the class shows in the brightness."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (128,), generator=generator)
    images = (labels[:, None, None, None] * 150 + torch.randint(0, 100, (128, 3, 8, 8), generator=generator)).to(
        torch.uint8
    )
    data = ArrayDataset(images, labels)
    train = DeviceBatches(data.subset(torch.arange(96)), 32, torch.device("cpu"), shuffle=True)
    val = DeviceBatches(data.subset(torch.arange(96, 128)), 32, torch.device("cpu"))
    return train, val


def random_batches(count: int, batch_size: int = 4) -> DeviceBatches:
    """`count` shuffled batches of random 8 x 8 images and two-class labels (seeded by `count`)."""
    generator = torch.Generator().manual_seed(count)
    images = torch.randint(0, 256, (count * batch_size, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (count * batch_size,), generator=generator)
    return DeviceBatches(ArrayDataset(images, labels), batch_size, torch.device("cpu"), shuffle=True)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


class NaNAtCall(Perceiver):
    """Returns NaN logits on its `bad_call`-th training forward pass."""

    def __init__(self, bad_call: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call:
                return logits * math.nan
        return logits


class RecordingTracker:
    """Keeps what `fit` logs, as (row, step); `on_log(row, step)` may act on it (send a signal)."""

    run_id = None

    def __init__(self, on_log: Any = None) -> None:
        self.logged: list[tuple[dict[str, Any], int | None]] = []
        self.on_log = on_log

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))
        if self.on_log is not None:
            self.on_log(metrics, step)

    def step_rows(self) -> list[tuple[dict[str, Any], int | None]]:
        return [(row, step) for row, step in self.logged if "global_step" in row]

    def epoch_rows(self) -> list[tuple[dict[str, Any], int | None]]:
        return [(row, step) for row, step in self.logged if "epoch" in row]
