"""The training loop: fit with validation each epoch, Keras-style early stopping, checkpoints, and one
final test evaluation with the best weights.

Metrics are accumulated on the device and read once per epoch, so a step never waits on the host.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from perceiver import distributed
from perceiver.augment import BatchAugment
from perceiver.checkpoint import FORMAT as CHECKPOINT_FORMAT
from perceiver.checkpoint import VERSION as CHECKPOINT_VERSION
from perceiver.checkpoint import (
    Checkpointer,
    CheckpointError,
    StopSignals,
    TrainingInterrupted,
    restore_rng,
    rng_states,
    save_atomic,
)
from perceiver.tracking import NullTracker

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("error", "skip")


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
    checkpoint_every_n_steps: int | None = None
    keep_checkpoints: int = 2
    nonfinite_loss: str = "error"
    keep_freed_memory: bool = True
    peak_tflops: float | str | None = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every_n_steps", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"trainer.{name}={value!r} is invalid: it must be a positive integer")
        every = self.checkpoint_every_n_steps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(
                f"trainer.checkpoint_every_n_steps={every!r} is invalid: "
                "a positive integer, or null to save at epoch ends only"
            )
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            choices = ", ".join(NONFINITE_POLICIES)
            raise ValueError(f"trainer.nonfinite_loss={self.nonfinite_loss!r} is invalid: choose one of {choices}")
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
        peak = self.peak_tflops
        number = isinstance(peak, int | float) and not isinstance(peak, bool)
        if peak is not None and peak != "auto" and not (number and peak > 0):
            raise ValueError(
                f"trainer.peak_tflops={peak!r} is invalid: auto (measure a matmul at start-up), "
                "a positive number of TFLOP/s, or null (no perf/mfu)"
            )
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
        self.skipped = 0  # training steps skipped for a non-finite loss
        self.total_count = 0  # images over all ranks, set by compute()

    def state_dict(self) -> dict[str, Any]:
        """A part-done epoch's sums (over all ranks), so a run resumed mid-epoch reports the same metrics."""
        totals = self.totals()
        return {"sums": totals[:3].cpu(), "count": int(totals[3]), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved sums are global: rank 0 carries them on, the other ranks start from zero."""
        self.skipped = state["skipped"]
        if distributed.current().is_main:
            self.sums = state["sums"].to(self.sums.device)
            self.count = state["count"]

    def totals(self) -> torch.Tensor:
        """Loss and hit sums and the image count, summed over ranks (one collective in a distributed run)."""
        count = torch.tensor([self.count], dtype=self.sums.dtype, device=self.sums.device)
        return distributed.all_reduce_sum(torch.cat([self.sums, count]))

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        hits = logits.topk(self.top_k, dim=-1).indices == labels[:, None]
        self.sums += torch.stack(
            [loss.detach().double() * n, hits[:, 0].sum().double(), hits.any(dim=-1).sum().double()]
        )
        self.count += n

    def compute(self) -> dict[str, float]:
        """Global metrics: in a distributed run every rank gets the same all-reduced numbers."""
        loss, top1, top5, count = self.totals().tolist()
        self.total_count = int(count)
        n = max(count, 1)
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

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_loss", "best_epoch", "epochs_without_improvement")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (trainer.nonfinite_loss=error); the message says where."""

    def __init__(self, message: str, batch: int, value: float) -> None:
        super().__init__(message)
        self.batch, self.value = batch, value


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


def utilisation(images_per_second: float, flops_per_image: float | None, peak_flops: float | None) -> dict:
    """perf/tflops achieved by the model's arithmetic, and perf/mfu, its fraction of every rank's peak."""
    if flops_per_image is None:
        return {}
    achieved = images_per_second * flops_per_image
    row = {"perf/tflops": achieved / 1e12}
    if peak_flops:
        row["perf/mfu"] = achieved / (peak_flops * distributed.current().world_size)
    return row


def steady_throughput(history: list[dict[str, float]]) -> float:
    """Training images/s over all epochs but the first, which also pays for warm-up and compilation."""
    epochs = history[1:] or history
    seconds = sum(row["epoch_seconds"] for row in epochs)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in epochs)
    return images / max(seconds, 1e-9)


@dataclass
class EpochProgress:
    """A part-done epoch: its metric sums and training time, which a mid-epoch checkpoint must carry."""

    epoch: int
    metrics: RunningMetrics
    seconds_before: float = 0.0  # training time spent on this epoch before a resume
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics.state_dict(), "seconds": self.seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metrics.load_state_dict(state["metrics"])
        self.seconds_before = state["seconds"]


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    epochs_run: int
    stopped_early: bool
    images_per_second: float
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def epoch_batches(loader: Iterable, epoch: int, start_batch: int) -> Iterable:
    """`loader`'s batches of `epoch` from `start_batch` on. Our loaders (`set_epoch`) draw each epoch's order
    from (seed, epoch) and seek without reading; any other iterable is advanced past the batches done."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, start_batch)
        return loader
    return itertools.islice(loader, start_batch, None) if start_batch else loader


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
    metrics: RunningMetrics | None = None,
    start_batch: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> RunningMetrics:
    """One pass over `loader` (positioned by the caller; `start_batch` batches were done before a resume).

    The loss is checked before each update, one host sync per step, so that no NaN ever reaches the
    weights: NonFiniteLossError, or with `trainer.nonfinite_loss=skip` the step is skipped and counted.
    `after_step(batch)` runs at every step boundary (checkpoints, stop requests).
    """
    model.train()
    metrics = metrics or RunningMetrics(device, num_classes)
    total = len(loader) if hasattr(loader, "__len__") else None  # ours: the whole epoch
    bar = tqdm(
        loader,
        desc=description,
        leave=False,
        disable=not settings.progress_bar,
        dynamic_ncols=True,
        initial=start_batch,
        total=total,
    )
    for batch, (images, labels) in enumerate(bar, start=start_batch + 1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        inputs, targets = augment(images, labels)
        with autocast(device, settings.precision):
            logits = model(inputs)
        loss = classification_loss(logits, targets, augment.loss_label_smoothing)
        if distributed.any_rank(~torch.isfinite(loss)):  # all ranks skip or stop together
            if settings.nonfinite_loss == "error":
                value = loss.item()
                raise NonFiniteLossError(f"non-finite training loss ({value}) at batch {batch}", batch, value)
            metrics.skipped += 1
            if metrics.skipped == 1:
                log.warning(
                    "%s, batch %d: non-finite loss (%s), step skipped (trainer.nonfinite_loss=skip); "
                    "this epoch's skips are counted in train/skipped_steps",
                    description,
                    batch,
                    loss.item(),
                )
        else:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.grad_clip_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            metrics.update(loss, logits, labels)
            if settings.progress_bar and batch % settings.log_every_n_steps == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")  # one sync per log interval, never per step
        if after_step is not None:
            after_step(batch)
    return metrics


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


def restore_training(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    stopper: EarlyStopping,
) -> None:
    """Load a checkpoint's model, optimizer, scheduler, loss scaler and early-stopping state."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())[:400]
        raise CheckpointError(f"the checkpoint does not fit this model or optimizer: {detail}") from error
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    stopper.load_state_dict(state["early_stopping"])


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
    resume: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    flops_per_image: float | None = None,
    peak_flops: float | None = None,
) -> FitResult:
    """Train for up to `settings.epochs`, keep the weights with the lowest validation loss, and load
    them into `model` before returning.

    A resumable checkpoint is saved every epoch (and every `checkpoint_every_n_steps`); `resume`, a
    checkpoint's state, continues exactly where it was taken. SIGTERM/SIGINT save a checkpoint at the next
    step boundary and raise TrainingInterrupted; a non-finite loss saves the last good state and raises
    NonFiniteLossError (unless `nonfinite_loss=skip`). `flops_per_image` (a training step's FLOPs per image)
    and `peak_flops` (one device's) add the achieved TFLOP/s and the model FLOP utilisation to every epoch.
    """
    tracker = tracker or NullTracker()
    run_dir = Path(run_dir)
    device = resolve_device(settings.device)
    wrapped = distributed.wrap(model, device)  # DistributedDataParallel under torchrun
    step_model = torch.compile(wrapped) if settings.compile else wrapped
    # Evaluation runs on each rank's shard without gradient syncs; DDP's wrapper is for training steps.
    eval_model = step_model if wrapped is model else (torch.compile(model) if settings.compile else model)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    stopper = EarlyStopping(settings.early_stopping_patience)
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    writes_files = settings.save_checkpoints and distributed.current().is_main  # rank 0 alone writes
    checkpointer = Checkpointer(run_dir, settings.keep_checkpoints) if writes_files else None
    start_epoch, start_batch, step, progress = 1, 0, 0, None
    if resume is not None:
        restore_training(resume, model, optimizer, scheduler, scaler, stopper)
        best_state = resume["best_model"]
        history = list(resume["history"])
        start_epoch, start_batch = resume["next_epoch"], resume["next_batch"]
        step, progress = resume["global_step"], resume["epoch_progress"]
        log.info("resuming at epoch %d, batch %d (step %d)", start_epoch, start_batch, step)
    elif checkpointer is not None:
        checkpointer.clear()
    batches_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None

    def save(next_epoch: int, next_batch: int, epoch_progress: dict[str, Any] | None) -> Path | None:
        """Everything needed to continue at (next_epoch, next_batch) as if nothing had happened."""
        if checkpointer is None:
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": next_epoch - 1,  # completed epochs
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "global_step": step,
            "epoch_progress": epoch_progress,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            "scaler": scaler.state_dict(),
            "early_stopping": stopper.state_dict(),
            "best_epoch": stopper.best_epoch,
            "best_model": best_state,
            "history": history,
            "val": {k.removeprefix("val/"): v for k, v in history[-1].items() if k.startswith("val/")}
            if history
            else None,
            "rng": rng_states(),
            "config": config,
            "overrides": list(overrides or []),
            "wandb_run_id": tracker.run_id,
        }
        return checkpointer.save(state, step)

    stop = StopSignals()
    current = EpochProgress(start_epoch, RunningMetrics(device, num_classes))

    def after_step(batch: int) -> None:
        """At each step boundary: a checkpoint when one is due or a stop was requested; then stop if asked."""
        nonlocal step
        step += 1
        every = settings.checkpoint_every_n_steps
        due = every is not None and step % every == 0 and batch != batches_per_epoch  # the epoch end saves anyway
        stopping = distributed.any_rank(stop.signum is not None, device)  # every rank stops at the same step
        if not stopping and not due:
            return
        path = save(current.epoch, batch, current.state_dict())
        if stopping:
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, current.epoch, step, path, run_dir)

    if resume is not None:
        restore_rng(resume["rng"])  # last, so that nothing above draws from them
    with stop:
        for epoch in range(start_epoch, settings.epochs + 1):
            if stopper.should_stop:  # resumed after the epoch that stopped training
                break
            first_batch = start_batch if epoch == start_epoch else 0
            current = EpochProgress(epoch, RunningMetrics(device, num_classes))
            if first_batch and progress is not None:
                current.load_state_dict(progress)
            running = current.metrics
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_one_epoch(
                    step_model,
                    augment,
                    epoch_batches(train_loader, epoch, first_batch),
                    optimizer,
                    scaler,
                    settings,
                    device,
                    num_classes,
                    f"epoch {epoch}/{settings.epochs}",
                    metrics=running,
                    start_batch=first_batch,
                    after_step=after_step,
                )
            except NonFiniteLossError as error:
                path = save(epoch, error.batch - 1, current.state_dict())
                where = f"saved in {path}" if path else "not saved (trainer.save_checkpoints=false)"
                raise NonFiniteLossError(
                    f"the training loss became {error.value} at epoch {epoch}, step {step + 1} (batch {error.batch}"
                    f"{f' of {batches_per_epoch}' if batches_per_epoch else ''}); the last good state is {where}. "
                    "Lower optimizer.lr, set trainer.grad_clip_norm or use trainer.precision=fp32 and start again; "
                    f"or skip such steps: python train.py resume={run_dir} trainer.nonfinite_loss=skip",
                    error.batch,
                    error.value,
                ) from None
            elapsed = current.seconds()  # `running` is read below: the epoch is done
            if running.count == 0 and running.skipped:
                raise NonFiniteLossError(
                    f"every training step of epoch {epoch} had a non-finite loss ({running.skipped} skipped); "
                    "lower optimizer.lr, set trainer.grad_clip_norm or use trainer.precision=fp32",
                    0,
                    math.nan,
                )
            train = running.compute()
            val = evaluate(eval_model, augment, val_loader, device, settings.precision, num_classes)
            improved = stopper.update(val["loss"], epoch)
            step_scheduler(scheduler, epoch, val["loss"])
            row = {
                "epoch": epoch,
                **{f"train/{k}": v for k, v in train.items()},
                "train/skipped_steps": running.skipped,
                **{f"val/{k}": v for k, v in val.items()},
                "lr": lr,
                "images_per_second": running.total_count / elapsed,  # all ranks together
                "epoch_seconds": elapsed,
                **utilisation(running.total_count / elapsed, flops_per_image, peak_flops),
            }
            history.append(row)
            log.info(
                "epoch %3d  train loss %.4f top1 %.4f  val loss %.4f top1 %.4f top5 %.4f  lr %.2e  %.0f img/s%s%s%s",
                epoch,
                train["loss"],
                train["top1"],
                val["loss"],
                val["top1"],
                val["top5"],
                lr,
                running.total_count / elapsed,
                f" ({100 * row['perf/mfu']:.1f}% MFU)" if "perf/mfu" in row else "",
                "  (best)" if improved else "",
                f"  ({running.skipped} steps skipped: non-finite loss)" if running.skipped else "",
            )
            if improved:
                best_state = copy.deepcopy(model.state_dict())
            path = None
            if checkpointer is not None:
                if improved:
                    best = {"model": best_state, "epoch": epoch, "val": val, "config": config}
                    save_atomic(run_dir / "best.pt", best)
                path = save(epoch + 1, 0, None)
            tracker.log(row, step=epoch)  # after the checkpoint: a resumed run never logs an epoch twice
            if distributed.any_rank(stop.signum is not None, device):
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, epoch, step, path, run_dir)
            if stopper.should_stop:
                log.info("early stopping: no lower validation loss for %d epochs", stopper.patience)
                break
    if stopper.best_epoch == 0:
        raise FloatingPointError(
            f"the validation loss was never finite in {len(history)} epochs "
            f"(last: {history[-1]['val/loss'] if history else None}); "
            "lower optimizer.lr, set trainer.grad_clip_norm, or use trainer.precision=fp32"
        )
    model.load_state_dict(best_state)
    best_val = next(row for row in history if row["epoch"] == stopper.best_epoch)
    return FitResult(
        best_epoch=stopper.best_epoch,
        best_val={k.removeprefix("val/"): v for k, v in best_val.items() if k.startswith("val/")},
        epochs_run=history[-1]["epoch"],
        stopped_early=stopper.should_stop,
        images_per_second=steady_throughput(history),
        train_seconds=sum(row["epoch_seconds"] for row in history),
        history=history,
    )
