"""The training loop: `fit`, with validation each epoch, Keras-style early stopping, checkpoints, and the best
weights loaded back at the end.

`fit` is one function: the epoch loop, the batch loop and the whole training step are written out in it, top to
bottom; what it calls are small helpers with one job each. Metrics are accumulated on the device and read once
per epoch, and the non-finite check is a device flag (perceiver/training/deferred.py), so a step never waits on
the host; `trainer.sync_free` only decides how often those flags are read. The loop knows nothing of configs or
command lines: it takes built parts and a `TrainSettings`.
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
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from perceiver.data.augment import BatchAugment, Preprocess
from perceiver.training import distributed
from perceiver.training.checkpoint import Checkpointer, save_atomic
from perceiver.training.deferred import DeferredChecks, NonFiniteReport, masked_update
from perceiver.training.device import autocast
from perceiver.training.ema import WeightEMA
from perceiver.training.metrics import (
    RunningMetrics,
    classification_loss,
    steady_throughput,
    training_flops,
    utilisation,
)
from perceiver.training.schedules import StepSchedule
from perceiver.training.settings import TrainSettings
from perceiver.training.signals import StopSignals, TrainingInterrupted
from perceiver.training.state import BestModel, CheckpointError, RunRecord, TrainState, restore_rng
from perceiver.training.stopping import (
    EarlyStopping,
    NonFiniteLossError,
    check_epoch_trained,
    check_some_epoch_was_finite,
    divergence_advice,
    warn_skipped,
)

log = logging.getLogger(__name__)

LogRow = Callable[[dict[str, Any], int], None]  # (row, global step): where epoch and step rows go (the tracker)


@dataclass
class TrainingParts:
    """What is trained, and how: the model (on its device), its input pipeline, the optimizer and an
    epoch-wise scheduler."""

    model: nn.Module
    augment: BatchAugment
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    num_classes: int | None = None  # None = model.num_classes

    def __post_init__(self) -> None:
        if self.num_classes is None:
            self.num_classes = self.model.num_classes

    @property
    def device(self) -> torch.device:
        """Where training runs: where the model was put (one GPU per rank under torchrun)."""
        return next(self.model.parameters()).device


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
    log_row: LogRow | None = None,
    record: RunRecord | None = None,
    callbacks: Sequence[EpochCallback] = (),
) -> FitResult:
    """Train for up to `settings.epochs`; the weights with the lowest validation loss end in `parts.model`.

    A resumable checkpoint is saved every epoch (and every `checkpoint_every_n_steps`); `resume` continues exactly
    where it was taken. SIGTERM/SIGINT save one at the next step boundary and raise TrainingInterrupted; a
    non-finite loss saves the last good state and raises NonFiniteLossError (unless `nonfinite_loss=skip`).
    With `ema_decay` an EMA of the weights is validated beside them, and the lower loss's weights are the candidate.
    `record` (the run's config, overrides, tracker run id, model card) goes into every checkpoint and best.pt;
    `log_row(row, global_step)` gets each epoch row and (rank 0) a step row every `log_every_n_steps` steps;
    `callbacks` run at every epoch end after the checkpoint and the row (not when stopping), on every rank.
    """
    model, augment, optimizer, scheduler = parts.model, parts.augment, parts.optimizer, parts.scheduler
    device, run_dir, record, is_main = parts.device, Path(run_dir), record or RunRecord(), distributed.current().is_main
    train_model, eval_model = training_and_evaluation_models(model, device, settings.compile)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    checks = DeferredChecks(device, halt_after_bad=settings.nonfinite_loss == "error")
    read_every = settings.log_every_n_steps if settings.checks_on_device(device) else 1  # flags: host reads
    checkpointer = Checkpointer(run_dir, settings.keep_checkpoints) if settings.save_checkpoints and is_main else None
    batches_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    every, draw_bar = settings.log_every_n_steps, draws_progress_bar(settings.progress_bar)
    log_lines = not draw_bar and is_main and (batches_per_epoch is None or batches_per_epoch > 4 * every)
    reads_loss = draw_bar or log_lines or (is_main and log_row is not None)  # the loss, every `every` steps
    per_image, peak = flops_per_image(model, settings.batch_size), peak_flops(settings.peak_tflops)
    stopper = EarlyStopping(settings.early_stopping_patience)
    best_state, history = copy.deepcopy(model.state_dict()), []
    start_epoch, start_batch = (resume.next_epoch, resume.next_batch) if resume else (1, 0)
    global_step = resume.global_step if resume else 0  # optimisation steps taken; it only grows, also across resumes
    if resume is not None:
        best_state, history = load_training_state(resume, parts, scaler, stopper)
    elif checkpointer is not None:
        checkpointer.clear()
    ema = weight_ema(model, settings.ema_decay, resume)  # after the resume: it may start from the resumed weights

    def checkpoint(next_epoch: int, next_batch: int, progress: dict | None, step: int) -> Path | None:
        """Everything needed to continue at (next_epoch, next_batch) as if nothing had happened."""
        if checkpointer is None:
            return None
        state = TrainState(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            scaler=scaler.state_dict(),
            early_stopping=stopper.state_dict(),
            best_model=best_state,
            history=history,
            next_epoch=next_epoch,
            next_batch=next_batch,
            global_step=step,
            epoch_progress=progress,
            ema=ema.state_dict() if ema is not None else None,
            run=record,
        )
        return checkpointer.save(state.to_dict(), step)

    with StopSignals() as stop:
        for epoch in range(start_epoch, settings.epochs + 1):
            if stopper.should_stop:  # resumed after the epoch that stopped training
                break
            first_batch = start_batch if epoch == start_epoch else 0
            current = EpochProgress(epoch, RunningMetrics(device, parts.num_classes))
            if first_batch and resume is not None and resume.epoch_progress is not None:
                current.load_state_dict(resume.epoch_progress)
            where, of = f"epoch {epoch}/{settings.epochs}", f"/{batches_per_epoch}" if batches_per_epoch else ""
            batches = epoch_batches(train_loader, epoch, first_batch)
            if draw_bar:
                batches = progress_bar(batches, where, batches_per_epoch, first_batch)
            train_model.train()
            for batch, (images, labels) in enumerate(batches, start=first_batch + 1):
                # ---- the training step: set the rate, augment, forward, loss, backward, clip, update
                if isinstance(scheduler, StepSchedule):  # a per-step schedule: this step's rate
                    scheduler.set_step(global_step + 1, batches_per_epoch)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                inputs, targets = augment(images, labels)  # (B, C, H, W) normalised; targets soft under Mixup
                with autocast(device, settings.precision):
                    logits = train_model(inputs)  # (B, num_classes)
                loss = classification_loss(logits, targets, augment.loss_label_smoothing)
                finite = checks.observe(loss, batch)  # a device flag: a non-finite loss leaves the weights alone
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if settings.grad_clip_norm:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
                masked_update(optimizer, scaler, finite)
                if ema is not None:
                    ema.update(model)
                current.metrics.update(loss, logits, labels, keep=finite)
                global_step += 1

                # ---- at the step boundary: the non-finite policy, logging, checkpoints, stop requests
                due = settings.checkpoint_every_n_steps is not None and batch != batches_per_epoch
                due = due and global_step % settings.checkpoint_every_n_steps == 0
                read = due or batch % read_every == 0 or batch == batches_per_epoch
                if read and (bad := read_nonfinite(checks, settings.nonfinite_loss, current.metrics, where)):
                    raise diverged(bad, current, global_step, settings, batches_per_epoch, checkpoint, run_dir)
                if reads_loss and global_step % every == 0:
                    value = loss.item()  # the one host sync per log interval, never per step
                    if draw_bar:
                        batches.set_postfix(loss=f"{value:.3f}")
                    elif log_lines:
                        log.info("%s  batch %d%s  loss %.4f", where, batch, of, value)
                    if is_main and log_row is not None:
                        log_row(step_row(global_step, value, optimizer), global_step)
                stopping = read and distributed.any_rank(stop.signum is not None, device)  # all ranks together
                if due or stopping:
                    path = checkpoint(epoch, batch, current.state_dict(), global_step)
                    if stopping:
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, epoch, global_step, path, run_dir)

            # ---- the epoch's end: validate, step the scheduler, keep the best weights, save, log
            if bad := read_nonfinite(checks, settings.nonfinite_loss, current.metrics, where):  # last steps' flags
                raise diverged(bad, current, global_step, settings, batches_per_epoch, checkpoint, run_dir)
            check_epoch_trained(epoch, current.metrics.count, current.metrics.skipped, settings.precision)
            seconds, lr, train = current.seconds(), optimizer.param_groups[0]["lr"], current.metrics.compute()
            val = validate(eval_model, ema, parts, val_loader, settings.precision)
            improved = stopper.update(val.kept["loss"], epoch)  # the trained weights' or the EMA's, the lower
            step_scheduler(scheduler, epoch, val.trained["loss"])  # the training's own progress
            row = epoch_row(epoch, train, val, current.metrics, lr, seconds, per_image, peak)
            history.append(row)
            log_epoch(row, improved, current.metrics.skipped)
            if improved:
                best_state = copy.deepcopy((ema.module if val.ema_kept else model).state_dict())
                if checkpointer is not None:
                    best = BestModel(best_state, epoch, val.kept, record.config, **model_card(record, augment))
                    save_atomic(run_dir / "best.pt", best.to_dict())
            path = checkpoint(epoch + 1, 0, None, global_step)
            if log_row is not None:
                log_row(row, global_step)  # after the checkpoint: a resumed run never logs an epoch twice
            if distributed.any_rank(stop.signum is not None, device):
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, epoch, global_step, path, run_dir)
            for callback in callbacks:
                callback(EpochEnd(epoch, global_step, row, model))
            if stopper.should_stop:
                log.info("early stopping: no lower validation loss for %d epochs", stopper.patience)
                break

    check_some_epoch_was_finite(stopper.best_epoch, history, settings.precision)
    model.load_state_dict(best_state)
    return fit_result(stopper, history, global_step)


# ----------------------------------------------------------------------------- what fit calls


def training_and_evaluation_models(model: nn.Module, device: torch.device, compile: bool) -> tuple[nn.Module, ...]:
    """The model as a training step runs it (DistributedDataParallel under torchrun, compiled on request), and as
    evaluation runs it: on each rank's shard without gradient syncs, so never through DDP's wrapper."""
    wrapped = distributed.wrap(model, device)
    train_model = torch.compile(wrapped) if compile else wrapped
    eval_model = train_model if wrapped is model else (torch.compile(model) if compile else model)
    return train_model, eval_model


def weight_ema(model: nn.Module, decay: float | None, resume: TrainState | None) -> WeightEMA | None:
    """The EMA of the weights `trainer.ema_decay` asks for, continued from a resumed checkpoint's. A checkpoint
    written without one starts it from the resumed weights (the EMA only adds a candidate; it never steers training)."""
    if decay is None:
        if resume is not None and resume.ema is not None:
            log.warning("the checkpoint's EMA of the weights is not continued: trainer.ema_decay is null")
        return None
    ema = WeightEMA(model, decay)
    if resume is not None and resume.ema is not None:
        ema.load_state_dict(resume.ema)
    elif resume is not None:
        log.warning(
            "the checkpoint holds no EMA of the weights: trainer.ema_decay=%s starts one from its weights (step %d)",
            decay,
            resume.global_step,
        )
    return ema


def progress_bar(batches: Iterable, where: str, total: int | None, first_batch: int) -> Iterable:
    """A tqdm bar over an epoch's batches that starts at `first_batch` (a resumed epoch) and clears when done."""
    return tqdm(batches, where, total=total, leave=False, dynamic_ncols=True, initial=first_batch)


def read_nonfinite(checks: DeferredChecks, policy: str, metrics: RunningMetrics, where: str) -> NonFiniteReport | None:
    """The non-finite policy, applied to what the device flags recorded since the last read (one host sync):
    skipped steps are counted (`skip`); with `error` the report of the first bad step is returned, for the caller
    to save the last good state and stop."""
    report = checks.read()
    if report is None or policy == "error":
        return report
    if metrics.skipped == 0:
        warn_skipped(where, report.batch, report.value)
    metrics.skipped += report.count
    return None


def diverged(
    bad: NonFiniteReport,
    current: EpochProgress,
    global_step: int,
    settings: TrainSettings,
    batches_per_epoch: int | None,
    checkpoint: Callable[[int, int, dict | None, int], Path | None],
    run_dir: Path,
) -> NonFiniteLossError:
    """Save the last good state (the updates from the bad step on were halted) and say where the loss diverged."""
    epoch, good_step = current.epoch, global_step - bad.steps_since
    path = checkpoint(epoch, bad.batch - 1, current.state_dict(), good_step)
    where = f"saved in {path}" if path else "not saved (trainer.save_checkpoints=false)"
    of = f" of {batches_per_epoch}" if batches_per_epoch else ""
    advice = divergence_advice(settings.precision)
    advice = advice[0].upper() + advice[1:]
    return NonFiniteLossError(
        f"the training loss became {bad.value} at epoch {epoch}, step {good_step + 1} "
        f"(batch {bad.batch}{of}); the last good state is {where}. {advice} and start again, "
        "or resume it with trainer.nonfinite_loss=skip to skip such steps",
        bad.batch,
        bad.value,
        checkpoint=path,
        run_dir=run_dir,
    )


def step_scheduler(scheduler: Any, epochs_done: int, val_loss: float) -> None:
    """Advance an epoch-wise scheduler: torch's ReduceLROnPlateau reads the validation loss, timm's
    schedulers take the epoch count, other torch schedulers step plainly."""
    if scheduler is None or isinstance(scheduler, StepSchedule):  # that one is set at every step
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


def draws_progress_bar(enabled: bool) -> bool:
    """A bar only where someone watches it: on rank 0 and in a terminal. Redirected to a file (a cluster
    job's log) every redraw is a line of `\r` noise, and one bar per rank would overwrite each other."""
    isatty = getattr(sys.stderr, "isatty", None)
    return enabled and distributed.current().is_main and callable(isatty) and isatty()


def flops_per_image(model: nn.Module, batch_size: int) -> float | None:
    """A training step's FLOPs per image, from the model's own count; None for a model without one."""
    try:
        return training_flops(model, batch_size) / batch_size
    except TypeError:
        return None


def peak_flops(peak_tflops: Any) -> float | None:
    """`trainer.peak_tflops` in FLOP/s, once measured (a number); None for no utilisation figures."""
    return peak_tflops * 1e12 if isinstance(peak_tflops, int | float) and not isinstance(peak_tflops, bool) else None


def mirror_averaged(logits: torch.Tensor, mirrored_logits: torch.Tensor) -> torch.Tensor:
    """Test-time flip averaging: the log of the mean of the two views' class probabilities, so that the loss is the
    averaged prediction's cross-entropy and top-k ranks the averaged probabilities."""
    views = torch.stack([logits.float().log_softmax(-1), mirrored_logits.float().log_softmax(-1)])
    return torch.logsumexp(views, dim=0) - torch.log(torch.tensor(2.0, device=logits.device))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    preprocess: Preprocess,
    loader: Iterable,
    device: torch.device,
    precision: str,
    num_classes: int,
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    mirror: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (fractions) over a whole loader, with a trained model's preprocessing. `observe(images,
    labels, logits)` sees every batch (evaluate.py's confusion matrix and mistakes: the same numbers, one pass).
    `mirror`: classify each image and its left-right mirror (`mirror_averaged`)."""
    model.eval()
    metrics = RunningMetrics(device, num_classes)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            inputs = preprocess(images)
            logits = mirror_averaged(model(inputs), model(inputs.flip(-1))) if mirror else model(inputs)
        metrics.update(classification_loss(logits, labels), logits, labels)
        if observe is not None:
            observe(images, labels, logits)
    return metrics.compute()


@dataclass(frozen=True)
class Validation:
    """An epoch's validation numbers: the trained weights', the EMA's (None without one), and which of the two is
    the epoch's candidate for the best model: the EMA when its loss is lower."""

    trained: dict[str, float]
    ema: dict[str, float] | None = None

    @property
    def ema_kept(self) -> bool:
        return self.ema is not None and self.ema["loss"] < self.trained["loss"]

    @property
    def kept(self) -> dict[str, float]:
        return self.ema if self.ema is not None and self.ema_kept else self.trained

    def row(self) -> dict[str, float]:
        """The epoch row's keys: `val/*` (the trained weights), `val_ema/*` and `val_ema/kept` (0 or 1)."""
        row = {f"val/{k}": v for k, v in self.trained.items()}
        if self.ema is not None:
            row.update({f"val_ema/{k}": v for k, v in self.ema.items()})
            row["val_ema/kept"] = int(self.ema_kept)
        return row

    @classmethod
    def from_row(cls, row: dict[str, float]) -> Validation:
        trained = {k.removeprefix("val/"): v for k, v in row.items() if k.startswith("val/")}
        return cls(trained, {k: row[f"val_ema/{k}"] for k in trained} if "val_ema/loss" in row else None)


def validate(
    eval_model: nn.Module, ema: WeightEMA | None, parts: TrainingParts, loader: Iterable, precision: str
) -> Validation:
    """`evaluate` the trained weights and the EMA's. The EMA's module is plain (never DDP-wrapped or compiled) and
    the same on every rank, as the weights it averages are."""

    def numbers(module: nn.Module) -> dict[str, float]:
        return evaluate(module, parts.augment.preprocess, loader, parts.device, precision, parts.num_classes)

    return Validation(numbers(eval_model), numbers(ema.module) if ema is not None else None)


def model_card(record: RunRecord, augment: BatchAugment) -> dict[str, Any]:
    """best.pt's description of the model: the run's (how it was built, its classes and data), and the
    normalisation and input side read from the input pipeline itself, so they are what training applied."""
    return {
        **(record.model_card or {}),
        "mean": augment.preprocess.mean.flatten().tolist(),
        "std": augment.preprocess.std.flatten().tolist(),
        "image_size": augment.image_size,
    }


def step_row(global_step: int, loss: float, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {"global_step": global_step, "train_step/loss": loss, "train_step/lr": optimizer.param_groups[0]["lr"]}


def epoch_row(
    epoch: int,
    train: dict[str, float],
    val: Validation,
    running: RunningMetrics,
    lr: float,
    seconds: float,
    flops_per_image: float | None,
    peak_flops: float | None,
) -> dict[str, float]:
    throughput = running.total_count / seconds  # all ranks together
    return {
        "epoch": epoch,
        **{f"train/{k}": v for k, v in train.items()},
        "train/skipped_steps": running.skipped,
        **val.row(),
        "lr": lr,
        "images_per_second": throughput,
        "epoch_seconds": seconds,
        **utilisation(throughput, flops_per_image, peak_flops),
    }


def fit_result(stopper: EarlyStopping, history: list[dict[str, float]], global_step: int) -> FitResult:
    best = next(row for row in history if row["epoch"] == stopper.best_epoch)
    return FitResult(
        best_epoch=stopper.best_epoch,
        best_val=Validation.from_row(best).kept,  # the numbers of the weights kept (best.pt)
        epochs_run=history[-1]["epoch"],
        stopped_early=stopper.should_stop,
        images_per_second=steady_throughput(history),
        train_seconds=sum(row["epoch_seconds"] for row in history),
        history=history,
        global_step=global_step,
    )


def load_training_state(
    state: TrainState, parts: TrainingParts, scaler: torch.amp.GradScaler, stopper: EarlyStopping
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """A checkpoint into the live objects (model, optimizer, scheduler, loss scaler, early stopping, and last the
    random generators, so that nothing here draws from them); the best weights and the history so far."""
    try:
        parts.model.load_state_dict(state.model)
        parts.optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())[:400]
        raise CheckpointError(f"the checkpoint does not fit this model or optimizer: {detail}") from error
    if parts.scheduler is not None and state.scheduler is not None:
        parts.scheduler.load_state_dict(state.scheduler)
    if state.scaler:  # empty when saved without fp16 loss scaling
        scaler.load_state_dict(state.scaler)
    stopper.load_state_dict(state.early_stopping)
    log.info("resuming at epoch %d, batch %d (step %d)", state.next_epoch, state.next_batch, state.global_step)
    restore_rng(state.rng)
    return state.best_model, list(state.history)


def log_epoch(row: dict[str, float], improved: bool, skipped: int) -> None:
    ema = f"  EMA val loss {row['val_ema/loss']:.4f} top1 {row['val_ema/top1']:.4f}" if "val_ema/loss" in row else ""
    log.info(
        "epoch %3d  train loss %.4f top1 %.4f  val loss %.4f top1 %.4f top5 %.4f%s  lr %.2e  %.0f img/s%s%s%s",
        row["epoch"],
        row["train/loss"],
        row["train/top1"],
        row["val/loss"],
        row["val/top1"],
        row["val/top5"],
        ema,
        row["lr"],
        row["images_per_second"],
        f" ({100 * row['perf/mfu']:.1f}% MFU)" if "perf/mfu" in row else "",
        ("  (best: the EMA's weights)" if row.get("val_ema/kept") else "  (best)") if improved else "",
        f"  ({skipped} steps skipped: non-finite loss)" if skipped else "",
    )
