"""The training loop's settings: one dataclass whose field names are the `trainer` config group's.

It is plain Python: the experiment layer derives the config schema from it (types checked when the config
is composed) and builds it from the composed config; the checks here hold for any caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from perceiver.training.device import resolve_device

PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("error", "skip")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class TrainSettings:
    """Checked on construction, so a bad value fails before any work; messages name `trainer.<field>`."""

    epochs: int = 50
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    grad_clip_norm: float | None = None
    ema_decay: float | None = None  # None = no EMA of the weights (perceiver/training/ema.py)
    early_stopping_patience: int | None = 15
    num_workers: int = 2
    progress_bar: bool = True
    log_every_n_steps: int = 50
    deterministic: bool = False
    save_checkpoints: bool = True
    checkpoint_every_n_steps: int | None = None
    keep_checkpoints: int = 2
    nonfinite_loss: str = "error"
    keep_freed_memory: bool = True
    peak_tflops: Any = "auto"  # float | "auto" | None
    sync_free: Any = "auto"  # bool | "auto"
    attention_every_n_epochs: int | None = 5  # read by the experiment layer's attention figures, not the loop
    attention_images: int = 4

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every_n_steps", "keep_checkpoints"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"trainer.{name}={getattr(self, name)!r} is invalid: it must be a positive integer")
        self._check_optional_counts()
        self._check_choices()
        clip = self.grad_clip_norm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip <= 0):
            raise ValueError(f"trainer.grad_clip_norm={clip!r} is invalid: a positive number, or null for no clipping")
        decay = self.ema_decay
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1):
            raise ValueError(
                f"trainer.ema_decay={decay!r} is invalid: a number between 0 and 1 (exclusive), e.g. 0.999, "
                "or null for no EMA of the weights"
            )
        peak = self.peak_tflops
        number = isinstance(peak, int | float) and not isinstance(peak, bool)
        if peak is not None and peak != "auto" and not (number and peak > 0):
            raise ValueError(
                f"trainer.peak_tflops={peak!r} is invalid: auto (measure a matmul at start-up), "
                "a positive number of TFLOP/s, or null (no perf/mfu)"
            )
        if not isinstance(self.sync_free, bool) and self.sync_free != "auto":
            raise ValueError(f"trainer.sync_free={self.sync_free!r} is invalid: auto (on CUDA), true or false")
        device = resolve_device(self.device)
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError("trainer.precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")

    def checks_on_device(self, device: torch.device) -> bool:
        """Whether the non-finite flags and stop requests are read only every `log_every_n_steps` (before a
        checkpoint and at the epoch's end) rather than after every step (perceiver/training/deferred.py)."""
        return self.sync_free is True or (self.sync_free == "auto" and device.type == "cuda")

    def _check_optional_counts(self) -> None:
        every = self.checkpoint_every_n_steps
        if every is not None and not _positive_int(every):
            raise ValueError(
                f"trainer.checkpoint_every_n_steps={every!r} is invalid: "
                "a positive integer, or null to save at epoch ends only"
            )
        patience = self.early_stopping_patience
        if patience is not None and not _positive_int(patience):
            raise ValueError(
                f"trainer.early_stopping_patience={patience!r} is invalid: "
                "a positive integer, or null to never stop early"
            )
        for name in ("num_workers", "attention_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"trainer.{name}={value!r} is invalid: it must be an integer >= 0")
        every = self.attention_every_n_epochs
        if every is not None and not _positive_int(every):
            raise ValueError(
                f"trainer.attention_every_n_epochs={every!r} is invalid: "
                "a positive integer, or null to draw the attention maps at the end of training only"
            )

    def _check_choices(self) -> None:
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            choices = ", ".join(NONFINITE_POLICIES)
            raise ValueError(f"trainer.nonfinite_loss={self.nonfinite_loss!r} is invalid: choose one of {choices}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r} is invalid: choose one of {', '.join(PRECISIONS)}")
