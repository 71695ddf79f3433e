"""The training loop: fit with validation each epoch, Keras-style early stopping, checkpoints, and the best
weights loaded back at the end.

Metrics are accumulated on the device and read once per epoch, so a step never waits on the host for them.
The loop knows nothing of configs or command lines: it takes built parts and a `TrainSettings`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from perceiver.data.augment import BatchAugment
from perceiver.training import distributed
from perceiver.training.checkpoint import Checkpointer, save_atomic
from perceiver.training.deferred import DeferredChecks, masked_update
from perceiver.training.device import autocast, resolve_device
from perceiver.training.metrics import (
    RunningMetrics,
    classification_loss,
    steady_throughput,
    training_flops,
    utilisation,
)
from perceiver.training.settings import TrainSettings
from perceiver.training.signals import StopSignals, TrainingInterrupted
from perceiver.training.state import BestModel, CheckpointError, RunRecord, TrainState, restore_rng
from perceiver.training.stopping import (
    EarlyStopping,
    NonFiniteLossError,
    check_epoch_trained,
    check_some_epoch_was_finite,
    divergence_advice,
    step_is_finite,
    warn_skipped,
)

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Where epoch rows and step rows go (W&B, or nowhere); `run_id` is recorded in checkpoints to continue the
    same run. `step` is the global training step: it only grows, also across a resume."""

    run_id: str | None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...


class _NoTracker:
    run_id = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass


@dataclass
class TrainingParts:
    """What is trained, and how: the model, its input pipeline, the optimizer and an epoch-wise scheduler."""

    model: nn.Module
    augment: BatchAugment
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    num_classes: int | None = None  # None = model.num_classes

    def __post_init__(self) -> None:
        if self.num_classes is None:
            self.num_classes = self.model.num_classes


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    epochs_run: int
    stopped_early: bool
    images_per_second: float
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    global_step: int = 0  # optimisation steps in all, the step of the last epoch row


@dataclass(frozen=True)
class EpochEnd:
    """What an epoch-end callback of `fit` is shown: the epoch's row (as logged), the global step it was
    logged at, and the model with this epoch's weights (in whatever mode training left it)."""

    epoch: int
    global_step: int
    row: dict[str, float]
    model: nn.Module


EpochCallback = Callable[[EpochEnd], None]  # e.g. the experiment layer's attention figures


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


def epoch_batches(loader: Iterable, epoch: int, start_batch: int) -> Iterable:
    """`loader`'s batches of `epoch` from `start_batch` on. Our loaders (`set_epoch`) draw each epoch's order
    from (seed, epoch) and seek without reading; any other iterable is advanced past the batches done."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, start_batch)
        return loader
    return itertools.islice(loader, start_batch, None) if start_batch else loader


def flops_per_image(model: nn.Module, batch_size: int) -> float | None:
    """A training step's FLOPs per image, from the model's own count; None for a model without one."""
    try:
        return training_flops(model, batch_size) / batch_size
    except TypeError:
        return None


@dataclass
class TrainStep:
    """One optimisation step on a batch: augment, forward (autocast), the loss policy, backward, update."""

    model: nn.Module  # what runs the step: the model, or its compiled / DDP-wrapped form
    augment: BatchAugment
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: TrainSettings
    device: torch.device
    checks: DeferredChecks | None = None  # the non-finite check on the device (no host sync), or per step

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, metrics: RunningMetrics, where: str, batch: int):
        """Returns the loss (a device tensor); a step whose loss is not finite changes nothing (see
        `step_is_finite`, or `deferred` with `checks`)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        inputs, targets = self.augment(images, labels)
        with autocast(self.device, self.settings.precision):
            logits = self.model(inputs)
        loss = classification_loss(logits, targets, self.augment.loss_label_smoothing)
        if self.checks is not None:
            self.masked_step(loss, logits, labels, metrics, batch)
            return loss
        if not step_is_finite(loss, self.settings.nonfinite_loss, metrics.skipped, where, batch):
            metrics.skipped += 1
            return loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        metrics.update(loss, logits, labels)
        return loss

    def masked_step(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, metrics: RunningMetrics, batch: int
    ) -> None:
        """Backward and an update that a non-finite loss masks on the device: nothing read on the host."""
        ok = self.checks.observe(loss, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip_norm)
        masked_update(self.optimizer, self.scaler, ok)
        metrics.update(loss, logits, labels, keep=ok)


def draws_progress_bar(enabled: bool) -> bool:
    """A bar only where someone watches it: on rank 0 and in a terminal. Redirected to a file (a cluster
    job's log) every redraw is a line of `\r` noise, and one bar per rank would overwrite each other."""
    isatty = getattr(sys.stderr, "isatty", None)
    return enabled and distributed.current().is_main and callable(isatty) and isatty()


def train_one_epoch(
    step: TrainStep,
    loader: Iterable,
    metrics: RunningMetrics,
    description: str = "",
    start_batch: int = 0,
    after_step: Callable[[int], None] | None = None,
    report_loss: Callable[[int, float], None] | None = None,
    steps_before: int = 0,
) -> RunningMetrics:
    """One pass over `loader` (positioned by the caller; `start_batch` batches were done before a resume).
    `after_step(batch)` runs at every step boundary (checkpoints, stop requests). Every `log_every_n_steps`
    global steps (`steps_before` were done before this call) the loss is read, a host sync, once per interval
    and never per step: it shows in the bar, or without one as a log line in a long epoch (a short one has
    just its epoch-end line), and goes to `report_loss(global step, loss)` (the tracker's step rows)."""
    step.model.train()
    settings = step.settings
    total = len(loader) if hasattr(loader, "__len__") else None  # ours: the whole epoch
    every = settings.log_every_n_steps
    draw = draws_progress_bar(settings.progress_bar)
    if draw:
        batches = tqdm(loader, desc=description, leave=False, dynamic_ncols=True, initial=start_batch, total=total)
    else:
        batches = loader
    log_lines = not draw and distributed.current().is_main and (total is None or total > 4 * every)
    of = f"/{total}" if total is not None else ""
    reads = draw or log_lines or report_loss is not None
    for batch, (images, labels) in enumerate(batches, start=start_batch + 1):
        loss = step(images, labels, metrics, description, batch)
        global_step = steps_before + batch - start_batch
        if reads and global_step % every == 0:
            value = loss.item()  # one sync per log interval, never per step
            if draw:
                batches.set_postfix(loss=f"{value:.3f}")
            elif log_lines:
                log.info("%s  batch %d%s  loss %.4f", description, batch, of, value)
            if report_loss is not None:
                report_loss(global_step, value)
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
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (fractions) over a whole loader, with the inference preprocessing. `observe(images,
    labels, logits)` sees every batch (evaluate.py's confusion matrix and mistakes: the same numbers, one pass)."""
    model.eval()
    metrics = RunningMetrics(device, num_classes)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(augment.preprocess(images))
        metrics.update(classification_loss(logits, labels), logits, labels)
        if observe is not None:
            observe(images, labels, logits)
    return metrics.compute()


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


def fit(
    parts: TrainingParts,
    train_loader: Iterable,
    val_loader: Iterable,
    settings: TrainSettings,
    run_dir: Path,
    resume: TrainState | None = None,
    tracker: Tracker | None = None,
    record: RunRecord | None = None,
    callbacks: Sequence[EpochCallback] = (),
) -> FitResult:
    """Train for up to `settings.epochs`, keep the weights with the lowest validation loss, and load
    them into `parts.model` before returning.

    A resumable checkpoint is saved every epoch (and every `checkpoint_every_n_steps`); `resume` continues
    exactly where it was taken. SIGTERM/SIGINT save a checkpoint at the next step boundary and raise
    TrainingInterrupted; a non-finite loss saves the last good state and raises NonFiniteLossError (unless
    `nonfinite_loss=skip`). With a numeric `settings.peak_tflops` and a model that counts its FLOPs, every
    epoch row also holds the achieved TFLOP/s and the model FLOP utilisation. `record` (the run's config
    and overrides) is written into every checkpoint.

    The tracker gets each epoch row, and on rank 0 a step row (`global_step`, `train_step/loss`,
    `train_step/lr`) every `log_every_n_steps` steps, both at the global step. `callbacks` run at every epoch
    end after the checkpoint and the row (not when stopping for a signal), on every rank.
    """
    fitting = _Fit(parts, settings, Path(run_dir), tracker or _NoTracker(), record or RunRecord(), callbacks)
    return fitting.run(train_loader, val_loader, resume)


class _Fit:
    """One call of `fit`: the parts, the training state they advance, and what happens at step and epoch ends."""

    def __init__(
        self,
        parts: TrainingParts,
        settings: TrainSettings,
        run_dir: Path,
        tracker: Tracker,
        record: RunRecord,
        callbacks: Sequence[EpochCallback] = (),
    ) -> None:
        self.parts, self.settings, self.run_dir, self.tracker, self.record = parts, settings, run_dir, tracker, record
        self.callbacks = list(callbacks)
        self.device = resolve_device(settings.device)
        model = parts.model
        wrapped = distributed.wrap(model, self.device)  # DistributedDataParallel under torchrun
        step_model = torch.compile(wrapped) if settings.compile else wrapped
        # Evaluation runs on each rank's shard without gradient syncs; DDP's wrapper is for training steps.
        self.eval_model = step_model if wrapped is model else (torch.compile(model) if settings.compile else model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        halts = settings.nonfinite_loss == "error"
        self.checks = DeferredChecks(self.device, halts) if settings.checks_on_device(self.device) else None
        self.step = TrainStep(step_model, parts.augment, parts.optimizer, scaler, settings, self.device, self.checks)
        self.stopper = EarlyStopping(settings.early_stopping_patience)
        self.best_state = copy.deepcopy(model.state_dict())
        self.history: list[dict[str, float]] = []
        self.global_step = 0
        writes_files = settings.save_checkpoints and distributed.current().is_main  # rank 0 alone writes
        self.checkpointer = Checkpointer(run_dir, settings.keep_checkpoints) if writes_files else None
        self.stop = StopSignals()
        self.flops_per_image = flops_per_image(model, settings.batch_size)
        peak = settings.peak_tflops
        self.peak_flops = peak * 1e12 if isinstance(peak, int | float) and not isinstance(peak, bool) else None

    # ------------------------------------------------------------------ the main path

    def run(self, train_loader: Iterable, val_loader: Iterable, resume: TrainState | None) -> FitResult:
        self.batches_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
        start_epoch, start_batch, progress = self.restore(resume)
        with self.stop:
            for epoch in range(start_epoch, self.settings.epochs + 1):
                if self.stopper.should_stop:  # resumed after the epoch that stopped training
                    break
                first_batch = start_batch if epoch == start_epoch else 0
                current = self.train_epoch(train_loader, epoch, first_batch, progress if first_batch else None)
                self.end_epoch(current, val_loader)
                if self.stopper.should_stop:
                    log.info("early stopping: no lower validation loss for %d epochs", self.stopper.patience)
                    break
        return self.result()

    def train_epoch(
        self, loader: Iterable, epoch: int, first_batch: int, progress: dict[str, Any] | None
    ) -> EpochProgress:
        current = EpochProgress(epoch, RunningMetrics(self.device, self.parts.num_classes))
        if progress is not None:
            current.load_state_dict(progress)
        self.current = current
        batches = epoch_batches(loader, epoch, first_batch)
        description = f"epoch {epoch}/{self.settings.epochs}"
        report = self.log_step if distributed.current().is_main else None
        try:
            train_one_epoch(
                self.step, batches, current.metrics, description, first_batch, self.after_step, report, self.global_step
            )
            self.read_checks(description)  # an epoch's last steps, where its length is not known
        except NonFiniteLossError as error:
            raise self.diverged(error, current) from None
        check_epoch_trained(epoch, current.metrics.count, current.metrics.skipped, self.settings.precision)
        return current

    def end_epoch(self, current: EpochProgress, val_loader: Iterable) -> None:
        """Validate, step the scheduler, remember the best weights, save, log; then stop if asked to."""
        epoch, running = current.epoch, current.metrics
        elapsed = current.seconds()
        lr = self.parts.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        train = running.compute()
        val = evaluate(
            self.eval_model,
            self.parts.augment,
            val_loader,
            self.device,
            self.settings.precision,
            self.parts.num_classes,
        )
        improved = self.stopper.update(val["loss"], epoch)
        step_scheduler(self.parts.scheduler, epoch, val["loss"])
        row = self.epoch_row(epoch, train, val, running, lr, elapsed)
        self.history.append(row)
        log_epoch(row, improved, running.skipped)
        if improved:
            self.best_state = copy.deepcopy(self.parts.model.state_dict())
        path = self.save_epoch_end(epoch, val, improved)
        self.tracker.log(row, step=self.global_step)  # after the checkpoint: a resumed run never logs an epoch twice
        if distributed.any_rank(self.stop.signum is not None, self.device):
            raise TrainingInterrupted(self.stop.signum or signal.SIGTERM, epoch, self.global_step, path, self.run_dir)
        for callback in self.callbacks:
            callback(EpochEnd(epoch, self.global_step, row, self.parts.model))

    def log_step(self, global_step: int, loss: float) -> None:
        """A step row for the tracker, from the loss the loop has just read anyway (no extra host sync)."""
        lr = self.parts.optimizer.param_groups[0]["lr"]
        self.tracker.log({"global_step": global_step, "train_step/loss": loss, "train_step/lr": lr}, step=global_step)

    def after_step(self, batch: int) -> None:
        """At each step boundary: a checkpoint when one is due or a stop was requested; then stop if asked.
        With checks on the device, stop requests and non-finite losses are read only every
        `log_every_n_steps`, before a checkpoint and at the epoch's end (where every rank reads them)."""
        self.global_step += 1
        every = self.settings.checkpoint_every_n_steps
        due = every is not None and self.global_step % every == 0 and batch != self.batches_per_epoch
        if self.checks is not None:
            if not (due or batch % self.settings.log_every_n_steps == 0 or batch == self.batches_per_epoch):
                return
            self.read_checks(f"epoch {self.current.epoch}/{self.settings.epochs}")
        stopping = distributed.any_rank(self.stop.signum is not None, self.device)  # every rank stops together
        if not stopping and not due:
            return
        path = self.save(self.current.epoch, batch, self.current.state_dict())
        if stopping:
            signum = self.stop.signum or signal.SIGTERM
            raise TrainingInterrupted(signum, self.current.epoch, self.global_step, path, self.run_dir)

    def read_checks(self, where: str) -> None:
        """The device-side non-finite record (one host sync): skipped steps are counted, or the error raised
        with the state rewound to before the bad step (the updates after it were halted)."""
        report = self.checks.read() if self.checks is not None else None
        if report is None:
            return
        if self.settings.nonfinite_loss == "error":
            self.global_step -= report.steps_since
            message = f"non-finite training loss ({report.value}) at batch {report.batch}"
            raise NonFiniteLossError(message, report.batch, report.value)
        if self.current.metrics.skipped == 0:
            warn_skipped(where, report.batch, report.value)
        self.current.metrics.skipped += report.count

    # ------------------------------------------------------------------ state, checkpoints, results

    def restore(self, resume: TrainState | None) -> tuple[int, int, dict[str, Any] | None]:
        """Load a checkpoint into the parts; (first epoch, first batch, the part-done epoch's progress)."""
        if resume is None:
            if self.checkpointer is not None:
                self.checkpointer.clear()
            return 1, 0, None
        parts = self.parts
        load_training_state(resume, parts.model, parts.optimizer, parts.scheduler, self.step.scaler)
        self.stopper.load_state_dict(resume.early_stopping)
        self.best_state, self.history = resume.best_model, list(resume.history)
        self.global_step = resume.global_step
        log.info("resuming at epoch %d, batch %d (step %d)", resume.next_epoch, resume.next_batch, self.global_step)
        restore_rng(resume.rng)  # last, so that nothing above draws from them
        return resume.next_epoch, resume.next_batch, resume.epoch_progress

    def snapshot(self, next_epoch: int, next_batch: int, progress: dict[str, Any] | None) -> TrainState:
        """Everything needed to continue at (next_epoch, next_batch) as if nothing had happened."""
        parts = self.parts
        scheduler = parts.scheduler
        return TrainState(
            model=parts.model.state_dict(),
            optimizer=parts.optimizer.state_dict(),
            scheduler=scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            scaler=self.step.scaler.state_dict(),
            early_stopping=self.stopper.state_dict(),
            best_model=self.best_state,
            history=self.history,
            next_epoch=next_epoch,
            next_batch=next_batch,
            global_step=self.global_step,
            epoch_progress=progress,
            run=RunRecord(self.record.config, list(self.record.overrides), self.tracker.run_id),
        )

    def save(self, next_epoch: int, next_batch: int, progress: dict[str, Any] | None) -> Path | None:
        if self.checkpointer is None:
            return None
        return self.checkpointer.save(self.snapshot(next_epoch, next_batch, progress).to_dict(), self.global_step)

    def save_epoch_end(self, epoch: int, val: dict[str, float], improved: bool) -> Path | None:
        if self.checkpointer is None:
            return None
        if improved:
            best = BestModel(self.best_state, epoch, val, self.record.config, **self.model_card())
            save_atomic(self.run_dir / "best.pt", best.to_dict())
        return self.save(epoch + 1, 0, None)

    def model_card(self) -> dict[str, Any]:
        """best.pt's description of the model: the run's (how it was built, its classes and data), and the
        normalisation and input side read from the input pipeline itself, so they are what training applied."""
        augment = self.parts.augment
        return {
            **(self.record.model_card or {}),
            "mean": augment.mean.flatten().tolist(),
            "std": augment.std.flatten().tolist(),
            "image_size": augment.image_size,
        }

    def diverged(self, error: NonFiniteLossError, current: EpochProgress) -> NonFiniteLossError:
        """Save the last good state (before the bad step) and say where the loss diverged."""
        path = self.save(current.epoch, error.batch - 1, current.state_dict())
        where = f"saved in {path}" if path else "not saved (trainer.save_checkpoints=false)"
        of = f" of {self.batches_per_epoch}" if self.batches_per_epoch else ""
        advice = divergence_advice(self.settings.precision)
        advice = advice[0].upper() + advice[1:]
        return NonFiniteLossError(
            f"the training loss became {error.value} at epoch {current.epoch}, step {self.global_step + 1} "
            f"(batch {error.batch}{of}); the last good state is {where}. {advice} and start again, "
            "or resume it with trainer.nonfinite_loss=skip to skip such steps",
            error.batch,
            error.value,
            checkpoint=path,
            run_dir=self.run_dir,
        )

    def epoch_row(
        self,
        epoch: int,
        train: dict[str, float],
        val: dict[str, float],
        running: RunningMetrics,
        lr: float,
        elapsed: float,
    ) -> dict[str, float]:
        throughput = running.total_count / elapsed  # all ranks together
        return {
            "epoch": epoch,
            **{f"train/{k}": v for k, v in train.items()},
            "train/skipped_steps": running.skipped,
            **{f"val/{k}": v for k, v in val.items()},
            "lr": lr,
            "images_per_second": throughput,
            "epoch_seconds": elapsed,
            **utilisation(throughput, self.flops_per_image, self.peak_flops),
        }

    def result(self) -> FitResult:
        check_some_epoch_was_finite(self.stopper.best_epoch, self.history, self.settings.precision)
        self.parts.model.load_state_dict(self.best_state)
        best = next(row for row in self.history if row["epoch"] == self.stopper.best_epoch)
        return FitResult(
            best_epoch=self.stopper.best_epoch,
            best_val={k.removeprefix("val/"): v for k, v in best.items() if k.startswith("val/")},
            epochs_run=self.history[-1]["epoch"],
            stopped_early=self.stopper.should_stop,
            images_per_second=steady_throughput(self.history),
            train_seconds=sum(row["epoch_seconds"] for row in self.history),
            history=self.history,
            global_step=self.global_step,
        )


def load_training_state(
    state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> None:
    """A checkpoint's model, optimizer, scheduler and loss-scaler state, into the live objects."""
    try:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())[:400]
        raise CheckpointError(f"the checkpoint does not fit this model or optimizer: {detail}") from error
    if scheduler is not None and state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if state.scaler:  # empty when saved without fp16 loss scaling
        scaler.load_state_dict(state.scaler)


def log_epoch(row: dict[str, float], improved: bool, skipped: int) -> None:
    log.info(
        "epoch %3d  train loss %.4f top1 %.4f  val loss %.4f top1 %.4f top5 %.4f  lr %.2e  %.0f img/s%s%s%s",
        row["epoch"],
        row["train/loss"],
        row["train/top1"],
        row["val/loss"],
        row["val/top1"],
        row["val/top5"],
        row["lr"],
        row["images_per_second"],
        f" ({100 * row['perf/mfu']:.1f}% MFU)" if "perf/mfu" in row else "",
        "  (best)" if improved else "",
        f"  ({skipped} steps skipped: non-finite loss)" if skipped else "",
    )
