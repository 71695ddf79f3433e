"""The training loop: fit with validation each epoch, Keras-style early stopping, checkpoints, and one
final test evaluation with the best weights.

Metrics are accumulated on the device and read once per epoch, so a step never waits on the host.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from perceiver.augment import BatchAugment
from perceiver.tracking import NullTracker

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainSettings:
    """The `trainer` config group; checked on construction so a bad value fails before any work."""

    epochs: int = 50
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    grad_clip_norm: float | None = None
    early_stopping_patience: int | None = 15
    num_workers: int = 2
    progress_bar: bool = True
    log_every_n_steps: int = 50
    deterministic: bool = False
    save_checkpoints: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"trainer.{name}={value!r} is invalid: it must be a positive integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"trainer.num_workers={self.num_workers!r} is invalid: it must be an integer >= 0")
        patience = self.early_stopping_patience
        if patience is not None and (not isinstance(patience, int) or patience <= 0):
            raise ValueError(
                f"trainer.early_stopping_patience={patience!r} is invalid: "
                "a positive integer, or null to never stop early"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r} is invalid: choose one of {', '.join(PRECISIONS)}")
        clip = self.grad_clip_norm
        if clip is not None and (not isinstance(clip, int | float) or clip <= 0):
            raise ValueError(f"trainer.grad_clip_norm={clip!r} is invalid: a positive number, or null for no clipping")
        device = resolve_device(self.device)
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError("trainer.precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"trainer.device={name!r} is invalid: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=auto or cpu")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels for exact reruns (slower); TF32 matmuls otherwise on CUDA.

    Set both ways, so one job of a sweep never inherits the previous job's setting in the same process.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled


# ----------------------------------------------------------------------------- metrics


class RunningMetrics:
    """Sums of loss and top-1/top-5 hits kept as device tensors (the count on the host); `compute` syncs once."""

    def __init__(self, device: torch.device, num_classes: int) -> None:
        self.top_k = min(5, num_classes)
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits
        self.count = 0

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        hits = logits.topk(self.top_k, dim=-1).indices == labels[:, None]
        self.sums += torch.stack(
            [loss.detach().double() * n, hits[:, 0].sum().double(), hits.any(dim=-1).sum().double()]
        )
        self.count += n

    def compute(self) -> dict[str, float]:
        loss, top1, top5 = self.sums.tolist()
        n = max(self.count, 1)
        return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy from logits against class indices, or against soft targets (Mixup/CutMix)."""
    logits = logits.float()
    if targets.is_floating_point():
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class EarlyStopping:
    """Keras `EarlyStopping(monitor="val_loss", patience)`: stop after `patience` epochs in a row
    without a lower validation loss; remember the best weights to restore them."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0

    def update(self, val_loss: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True when it is the best so far."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.epochs_without_improvement >= self.patience


def step_scheduler(scheduler: Any, epochs_done: int, val_loss: float) -> None:
    """Advance an epoch-wise scheduler: torch's ReduceLROnPlateau reads the validation loss, timm's
    schedulers take the epoch count, other torch schedulers step plainly."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif hasattr(scheduler, "step_update"):  # timm.scheduler.Scheduler
        scheduler.step(epochs_done, metric=val_loss)
    else:
        scheduler.step()


# ----------------------------------------------------------------------------- loop


def steady_throughput(history: list[dict[str, float]]) -> float:
    """Training images/s over all epochs but the first, which also pays for warm-up and compilation."""
    epochs = history[1:] or history
    seconds = sum(row["epoch_seconds"] for row in epochs)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in epochs)
    return images / max(seconds, 1e-9)


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    epochs_run: int
    stopped_early: bool
    images_per_second: float
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_one_epoch(
    model: nn.Module,
    augment: BatchAugment,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: TrainSettings,
    device: torch.device,
    num_classes: int,
    description: str,
) -> tuple[dict[str, float], int]:
    model.train()
    metrics = RunningMetrics(device, num_classes)
    images_seen = 0
    bar = tqdm(loader, desc=description, leave=False, disable=not settings.progress_bar, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        inputs, targets = augment(images, labels)
        with autocast(device, settings.precision):
            logits = model(inputs)
        loss = classification_loss(logits, targets, augment.loss_label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if settings.grad_clip_norm:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        metrics.update(loss, logits, labels)
        images_seen += labels.shape[0]
        if settings.progress_bar and step % settings.log_every_n_steps == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")  # one sync per log interval, never per step
    return metrics.compute(), images_seen


@torch.no_grad()
def evaluate(
    model: nn.Module,
    augment: BatchAugment,
    loader: Iterable,
    device: torch.device,
    precision: str,
    num_classes: int,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (fractions) over a whole loader, with the inference preprocessing."""
    model.eval()
    metrics = RunningMetrics(device, num_classes)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(augment.preprocess(images))
        metrics.update(classification_loss(logits, labels), logits, labels)
    return metrics.compute()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a crash mid-write leaves the old checkpoint intact."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def fit(
    model: nn.Module,
    augment: BatchAugment,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    settings: TrainSettings,
    run_dir: Path,
    num_classes: int,
    tracker: Any = None,
    config: dict[str, Any] | None = None,
) -> FitResult:
    """Train for up to `settings.epochs`, keep the weights with the lowest validation loss, and load
    them into `model` before returning."""
    tracker = tracker or NullTracker()
    device = resolve_device(settings.device)
    step_model = torch.compile(model) if settings.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    stopper = EarlyStopping(settings.early_stopping_patience)
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, settings.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        train, seen = train_one_epoch(
            step_model,
            augment,
            train_loader,
            optimizer,
            scaler,
            settings,
            device,
            num_classes,
            f"epoch {epoch}/{settings.epochs}",
        )
        elapsed = time.perf_counter() - started  # `train` was read from the device: the epoch is done
        val = evaluate(step_model, augment, val_loader, device, settings.precision, num_classes)
        improved = stopper.update(val["loss"], epoch)
        step_scheduler(scheduler, epoch, val["loss"])
        row = {
            "epoch": epoch,
            **{f"train/{k}": v for k, v in train.items()},
            **{f"val/{k}": v for k, v in val.items()},
            "lr": lr,
            "images_per_second": seen / elapsed,
            "epoch_seconds": elapsed,
        }
        history.append(row)
        tracker.log(row, step=epoch)
        log.info(
            "epoch %3d  train loss %.4f top1 %.4f  val loss %.4f top1 %.4f top5 %.4f  lr %.2e  %.0f img/s%s",
            epoch,
            train["loss"],
            train["top1"],
            val["loss"],
            val["top1"],
            val["top5"],
            lr,
            seen / elapsed,
            "  (best)" if improved else "",
        )
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        if settings.save_checkpoints:
            common = {"epoch": epoch, "val": val, "config": config}
            if improved:
                save_checkpoint(run_dir / "best.pt", {"model": best_state, **common})
            save_checkpoint(
                run_dir / "last.pt",
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
                    "best_epoch": stopper.best_epoch,
                    **common,
                },
            )
        if stopper.should_stop:
            log.info("early stopping: no lower validation loss for %d epochs", stopper.patience)
            break
    if stopper.best_epoch == 0:
        raise FloatingPointError(
            f"the validation loss was never finite in {epoch} epochs (last: {history[-1]['val/loss']}); "
            "lower optimizer.lr, set trainer.grad_clip_norm, or use trainer.precision=fp32"
        )
    model.load_state_dict(best_state)
    best_val = next(row for row in history if row["epoch"] == stopper.best_epoch)
    return FitResult(
        best_epoch=stopper.best_epoch,
        best_val={k.removeprefix("val/"): v for k, v in best_val.items() if k.startswith("val/")},
        epochs_run=epoch,
        stopped_early=stopper.should_stop,
        images_per_second=steady_throughput(history),
        train_seconds=sum(row["epoch_seconds"] for row in history),
        history=history,
    )
