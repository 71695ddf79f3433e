"""What a run shows beyond its epoch rows: the attention figure of a fixed validation batch, every
`trainer.attention_every_n_epochs` epochs and at the end (PNG files in the run dir's `attention/`, and W&B
images), and a table of validation predictions at the end.

The training loop knows nothing of this: `fit` calls `on_epoch_end` as one of its epoch-end callbacks, and
`perceiver.experiment.run` calls `at_end` with the best weights loaded. Only rank 0 builds one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from perceiver.data.augment import BatchAugment, resize
from perceiver.experiment.figures import draw_attention, supports_attention_maps
from perceiver.training import EpochEnd, TrainSettings

log = logging.getLogger(__name__)

FIGURE_DIR = "attention"  # below the run dir


def spread_images(dataset: Dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (image, label) pairs evenly spaced over a split, as uint8 (B, C, H, W) and (B,): the same images
    every epoch and on resume (the validation split is seeded), and of several classes even when the split is
    ordered by class (an image folder's is)."""
    size = len(dataset)
    indices = torch.linspace(0, size - 1, min(count, size)).round().long().tolist() if size and count else []
    pairs = [dataset[i] for i in indices]
    if not pairs:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.stack([image for image, _ in pairs]), torch.tensor([int(label) for _, label in pairs])


class RunDashboards:
    """The fixed validation batch, and what is drawn and logged from it."""

    def __init__(
        self,
        model: nn.Module,
        augment: BatchAugment,
        val: Dataset,
        settings: TrainSettings,
        run_dir: Path,
        tracker: Any,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.augment, self.run_dir, self.tracker, self.class_names = augment, Path(run_dir), tracker, class_names
        self.every = settings.attention_every_n_epochs
        self.figure_images = settings.attention_images
        if self.figure_images and not supports_attention_maps(model):
            log.info("%s has no attention maps: no attention figure is drawn", type(model).__name__)
            self.figure_images = 0
        self.table_rows = getattr(tracker, "prediction_rows", 0)
        self.images, self.labels = spread_images(val, max(self.figure_images, self.table_rows))

    def callbacks(self) -> list:
        """What `fit` should call at epoch ends."""
        return [self.on_epoch_end] if self.figure_images and self.every else []

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.epoch % self.every == 0:
            self.attention(end.model, f"epoch-{end.epoch:04d}", "attention/maps", end.global_step, f"epoch {end.epoch}")

    def at_end(self, model: nn.Module, global_step: int, best_epoch: int) -> None:
        """With the best weights (those the test set is evaluated with), at the step of the last epoch row."""
        if self.figure_images:
            self.attention(model, "final", "attention/final", global_step, f"best weights (epoch {best_epoch})")
        if self.table_rows and len(self.images):
            self.tracker.log_predictions("predictions", self.predictions(model), step=global_step)

    def attention(self, model: nn.Module, name: str, key: str, step: int, title: str) -> Path | None:
        """Draw the figure into attention/<name>.png and log it; a figure that fails only warns, and is not
        tried again: it never stops a training run."""
        images, labels = self.figure_batch()
        try:
            path = self.run_dir / FIGURE_DIR / f"{name}.png"
            draw_attention(model, self.augment, images, path, labels.tolist(), self.class_names, title=title)
        except Exception as error:
            log.warning("no attention figure (%s: %s); training goes on without it", type(error).__name__, error)
            self.figure_images = 0
            return None
        self.tracker.log_images({key: path}, step=step)
        return path

    def figure_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`figure_images` of the fixed batch, spread over it like the batch over the split."""
        indices = torch.linspace(0, len(self.images) - 1, min(self.figure_images, len(self.images))).round().long()
        return self.images[indices], self.labels[indices]

    @torch.no_grad()
    def predictions(self, model: nn.Module) -> list[tuple[Any, str, str, float]]:
        """(image as (H, W, C) uint8 at the model's input size, label, prediction, confidence) per image."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            images = self.images[: self.table_rows].to(device)
            probabilities = torch.softmax(model(self.augment.preprocess(images)).float(), dim=-1)
        finally:
            model.train(was_training)
        confidence, predicted = probabilities.max(dim=-1)
        shown = resize(images.float(), self.augment.image_size).round().clamp(0, 255).to(torch.uint8)
        return [
            (picture.permute(1, 2, 0).cpu().numpy(), self.name(int(label)), self.name(int(guess)), float(p))
            for picture, label, guess, p in zip(shown, self.labels, predicted, confidence, strict=False)
        ]

    def name(self, index: int) -> str:
        names = self.class_names
        return names[index] if names is not None and index < len(names) else str(index)
