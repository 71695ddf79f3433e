"""Train and test one Perceiver: `python train.py [group=option ...] [field=value ...]`.

The only place that reads the config: it builds every part with `hydra.utils.instantiate`, hands them
to `perceiver.engine.fit`, evaluates the best weights on the test set once, and writes
`metrics.json`, `config.yaml` and the checkpoints into the Hydra run directory.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from perceiver import distributed, runtime
from perceiver.checkpoint import CheckpointError, TrainingInterrupted, carried_overrides, locate, resumed_config
from perceiver.data import DataError, DataSource, Shard, Splits, make_loader, prepare_splits
from perceiver.engine import TrainSettings, configure_determinism, evaluate, fit, resolve_device
from perceiver.flops import matmul_peak, training_flops
from perceiver.sweeps import run_name, run_tags, swept_keys
from perceiver.tracking import NullTracker, resolve_mode

log = logging.getLogger("train")


class ConfigError(Exception):
    """A bad setting or missing data: reported as one message, without a traceback."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe(group: str, error: BaseException) -> str:
    """Prefix an error with its config group: `model.image_size=63 ...` or `optimizer: Invalid lr`."""
    message = str(error)
    if message.startswith(f"{group}.") or isinstance(error, DataError):
        return message
    return f"{group}.{message}" if re.match(r"^\w+=", message) else f"{group}: {message}"


def build(group: str, node: DictConfig, *call_args: Any, **kwargs: Any) -> Any:
    """`instantiate` (then call a `_partial_` with `call_args`), with errors that name the config group."""
    try:
        made = instantiate(node, **kwargs)
        return made(*call_args) if call_args else made
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ValueError | TypeError | DataError):
            raise ConfigError(describe(group, cause)) from error
        raise
    except (ValueError, TypeError, OmegaConfBaseException) as error:
        raise ConfigError(describe(group, error)) from error


def check_run_settings(cfg: DictConfig) -> None:
    """Top-level fields that no constructor checks."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} is invalid: it must be an integer")
    fraction = cfg.data.val_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction={fraction!r} is invalid: it must be a number in (0, 1)")


def check_num_classes(configured: int | None, actual: int) -> int:
    if configured is None:
        return actual
    if configured != actual:
        raise ConfigError(
            f"model.num_classes={configured} disagrees with the data set, which has {actual} classes; "
            f"drop the override or set model.num_classes={actual}"
        )
    return configured


@dataclass
class Parts:
    settings: TrainSettings
    device: torch.device
    source: DataSource
    model: torch.nn.Module
    augment: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_classes: int


def build_parts(cfg: DictConfig) -> Parts:
    """Everything cheap, in the order that fails fastest, so a bad setting costs seconds, not a data download."""
    check_run_settings(cfg)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    known = [f.name for f in fields(TrainSettings)]
    unknown = sorted(set(trainer) - set(known))
    if unknown:
        raise ConfigError(f"unknown trainer setting(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    try:
        settings = TrainSettings(**trainer)
        device = distributed.rank_device(resolve_device(settings.device), distributed.current())
        resolve_mode(cfg.logger.get("mode", "disabled"))
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    source = build("data.source", cfg.data.source)
    try:
        source.check()
    except DataError as error:
        raise ConfigError(str(error)) from error
    num_classes = check_num_classes(cfg.model.get("num_classes"), source.num_classes)
    model = build("model", cfg.model, num_classes=num_classes).to(device)
    augment = build("augmentation", cfg.augmentation, num_classes=num_classes).to(device)
    optimizer = build("optimizer", cfg.optimizer, model)
    scheduler = build("scheduler", cfg.scheduler, optimizer)
    return Parts(settings, device, source, model, augment, optimizer, scheduler, num_classes)


def join_process_group(cfg: DictConfig) -> distributed.Context:
    """Under torchrun: join the process group (Gloo on CPU, NCCL on CUDA); otherwise a single process."""
    try:
        device = resolve_device(cfg.trainer.device)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    context = distributed.join(device)
    if context.enabled:
        if not context.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports; the others only warn
        log.info(
            "distributed: %d ranks (%s); global batch = trainer.batch_size x %d = %d",
            context.world_size,
            "nccl" if device.type == "cuda" else "gloo",
            context.world_size,
            cfg.trainer.batch_size * context.world_size,
        )
    return context


def shared_run_directory(run_dir: Path, context: distributed.Context) -> Path:
    """Every rank works in rank 0's run dir; another rank's own Hydra dir (if its clock gave it another
    name) holds nothing but Hydra's files and is removed."""
    shared = Path(distributed.broadcast_object(str(run_dir)))
    elsewhere = not context.is_main and shared.resolve() != run_dir.resolve()
    if elsewhere and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
    return shared


def run_directory(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.paths.output_dir) / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def tracking_identity(cfg: DictConfig) -> dict[str, Any]:
    """W&B group / job_type / name / tags: the logger config where set, else derived from the sweep and job.

    group = the sweep directory's name (shared by all its jobs, kept on resume), job_type = the ablation,
    name = the job's swept overrides, tags = all its overrides; explicit `logger.*` values win.
    """
    overrides, logger, ablation = job_overrides(), cfg.logger, cfg.get("ablation") or {}
    sweep_dir = Path(HydraConfig.get().sweep.dir) if in_sweep() else None
    derived = {
        "group": sweep_dir.name if sweep_dir else None,
        "job_type": ablation.get("name") or "train",
        "name": run_name(overrides, swept_keys(sweep_dir) if sweep_dir else None),
    }
    identity = {key: logger.get(key) or value for key, value in derived.items()}
    identity["tags"] = run_tags(overrides, [*(logger.get("tags") or []), *filter(None, [ablation.get("name")])])
    return identity


def without_skip(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+").startswith("skip_finished=")]


def finished_metrics(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The metrics of this very job when its run dir says it already finished (a resumed sweep)."""
    path = run_dir / "metrics.json"
    if not cfg.get("skip_finished") or not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if without_skip(metrics.get("overrides", [])) != without_skip(job_overrides()):
        raise ConfigError(
            f"{run_dir} already holds a finished job with other overrides ({metrics.get('overrides')}); "
            "give this sweep a new hydra.sweep.dir, or set skip_finished=false to overwrite it"
        )
    log.info("already finished (%s): skipped; test top1 %.4f", path, metrics["test"]["top1"])
    return metrics


def load_data(cfg: DictConfig, parts: Parts) -> Splits:
    """Load, split and measure the data; the first step that can take long (a download)."""
    cache_dir = Path(cfg.paths.data_root).expanduser() / ".cache"
    try:
        splits = prepare_splits(parts.source, cfg.data.val_fraction, cfg.seed, cache_dir)
    except (DataError, ValueError) as error:
        raise ConfigError(str(error)) from error
    sizes = (len(splits.train), len(splits.val), len(splits.test), splits.num_classes)
    log.info("data: %d train / %d val / %d test images, %d classes", *sizes)
    parts.augment.set_statistics(splits.mean, splits.std)
    return splits


def make_loaders(
    splits: Splits, parts: Parts, seed: int, context: distributed.Context | None = None
) -> tuple[Any, Any, Any]:
    """Each rank gets its shard of every epoch: equal shares for training, all images for evaluation."""
    settings, device, context = parts.settings, parts.device, context or distributed.Context()
    train_loader = make_loader(
        splits.train,
        settings.batch_size,
        device,
        shuffle=True,
        drop_last=parts.augment.mixes_batches,
        seed=seed,
        num_workers=settings.num_workers,
        sample_transform=parts.augment.sample_transform(),
        shard=Shard(context.rank, context.world_size, even=True),
    )
    val_loader, test_loader = (
        make_loader(
            split,
            settings.batch_size,
            device,
            num_workers=settings.num_workers,
            shard=Shard(context.rank, context.world_size, even=False),
        )
        for split in (splits.val, splits.test)
    )
    return train_loader, val_loader, test_loader


def model_flops(
    model: torch.nn.Module, settings: TrainSettings, device: torch.device
) -> tuple[float | None, float | None]:
    """A training step's FLOPs per image (analytic) and the device's matmul peak in the run's precision
    (`trainer.peak_tflops`: measured, given, or none): what perf/tflops and perf/mfu are made of."""
    try:
        per_image = training_flops(model, settings.batch_size) / settings.batch_size
    except TypeError as error:  # a model without an analytic count: no utilisation figures
        log.warning("%s; perf/tflops and perf/mfu are not logged", error)
        return None, None
    peak = settings.peak_tflops
    if peak == "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision, torch.float32)
        peak = matmul_peak(device, dtype) / 1e12
        log.info("%s matmul peak of %s: %.2f TFLOP/s (the reference of perf/mfu)", dtype, device, peak)
    log.info("model: %.4g GFLOP per training image (forward and backward)", per_image / 1e9)
    return per_image, peak * 1e12 if peak is not None else None


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Build, fit, test; returns what it writes to metrics.json. With `resume` (a run dir or checkpoint, or
    `auto` for one in this run dir) it continues that run in its directory; a finished run is only reported."""
    run_dir = Path(run_dir) if run_dir is not None else run_directory(cfg)
    context = join_process_group(cfg)
    run_dir = shared_run_directory(run_dir, context)
    if (finished := finished_metrics(cfg, run_dir)) is not None:
        return finished
    resume = locate(cfg.get("resume"), run_dir)
    if resume is not None and resume.finished is not None:
        log.info(
            "%s has finished already (test top1 %s); nothing to resume: start a new run with resume=null",
            resume.run_dir,
            resume.finished.get("test", {}).get("top1"),
        )
        return resume.finished
    overrides = job_overrides()
    if resume is not None:
        command = overrides if HydraConfig.initialized() else None
        cfg = resumed_config(resume.state["config"], cfg, command, resume.state["overrides"])
        overrides = carried_overrides(resume.state["overrides"], overrides)  # the original run's, then these
        run_dir = resume.run_dir
        log.info("resuming the run in %s from %s", run_dir, resume.path)
    check_run_settings(cfg)  # the seed is used next
    seed_everything(cfg.seed)
    parts = build_parts(cfg)
    settings, device, model, augment = parts.settings, parts.device, parts.model, parts.augment
    if settings.keep_freed_memory:
        runtime.keep_freed_memory()
    if context.rank:  # same initial weights everywhere (DDP broadcasts rank 0's); own dropout and augmentation
        torch.manual_seed(cfg.seed + context.rank)
    configure_determinism(settings.deterministic)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if context.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s trainable parameters; device %s; run dir %s", f"{num_parameters:,}", device, run_dir)
    flops_per_image, peak = model_flops(model, settings, device)

    if not context.is_main:
        distributed.barrier()  # rank 0 downloads and caches the statistics first
    splits = load_data(cfg, parts)
    if context.is_main:
        distributed.barrier()
    train_loader, val_loader, test_loader = make_loaders(splits, parts, cfg.seed, context)
    identity = tracking_identity(cfg)
    job_number = HydraConfig.get().job.num if in_sweep() else None
    wandb_config = {**resolved, "num_parameters": num_parameters, "overrides": overrides, "job_num": job_number}
    run_id = resume.state["wandb_run_id"] if resume is not None else None
    tracker = (
        build("logger", cfg.logger)(config=wandb_config, run_dir=run_dir, run_id=run_id, **identity)
        if context.is_main
        else NullTracker()  # one W&B run per training run: rank 0's
    )
    exit_code = 1
    try:
        result = fit(
            model,
            augment,
            train_loader,
            val_loader,
            parts.optimizer,
            parts.scheduler,
            settings,
            run_dir,
            splits.num_classes,
            tracker=tracker,
            config=resolved,
            resume=resume.state if resume is not None else None,
            overrides=overrides,
            flops_per_image=flops_per_image,
            peak_flops=peak,
        )
        test = evaluate(model, augment, test_loader, device, settings.precision, splits.num_classes)
        metrics = {
            "test": test,
            "best_epoch": result.best_epoch,
            "best_val": result.best_val,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "images_per_second": result.images_per_second,
            "train_seconds": result.train_seconds,
            "num_parameters": num_parameters,
            "device": str(device),
            "wandb_run_id": tracker.run_id,
            "wandb_group": identity["group"],
            "job_num": job_number,
            "overrides": overrides,
            "settings": resolved,
            "history": result.history,
        }
        tracker.summarize(
            {f"test/{k}": v for k, v in test.items()}
            | {"best_epoch": result.best_epoch, "images_per_second": result.images_per_second}
        )
        if settings.save_checkpoints:
            tracker.log_artifact(run_dir / "best.pt", name=f"model-{tracker.run_id}")
        tracker.finish(exit_code=0)
        if context.is_main:
            write_atomically(run_dir / "metrics.json", json.dumps(metrics, indent=2))  # last: the job is complete
        log.info(
            "test: top1 %.4f top5 %.4f loss %.4f (best epoch %d) -> %s",
            test["top1"],
            test["top5"],
            test["loss"],
            result.best_epoch,
            run_dir / "metrics.json",
        )
        exit_code = 0
        return metrics
    except TrainingInterrupted as stopped:
        exit_code = stopped.exit_code
        raise
    finally:
        tracker.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the test top-1, so Hydra sweepers can optimise it.

    A failing job leaves `error.txt` in its run dir. In a sweep it re-raises, so Hydra marks the job
    failed and goes on with the others; a single run reports a bad setting in one line and exits 2.
    """
    try:
        return train(cfg)["test"]["top1"]
    except TrainingInterrupted as stopped:  # SIGTERM/SIGINT: a checkpoint was saved; stop (the whole sweep too)
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except Exception as error:
        record_failure(run_directory(cfg), error)
        if in_sweep():
            log.error("job failed: %s: %s (the sweep goes on; see error.txt)", type(error).__name__, error)
            raise
        if isinstance(error, ConfigError | CheckpointError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if isinstance(error, FloatingPointError):  # a non-finite loss, after saving the last good state
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        distributed.leave()


def write_atomically(path: Path, text: str) -> None:
    """A reader (a resumed sweep, the summary) sees the whole file or none of it."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)


def record_failure(run_dir: Path, error: BaseException) -> None:
    """`error.txt` in the run dir: the traceback, for the sweep summary and for whoever reads it later."""
    if run_dir.is_dir():  # another rank's Hydra dir may be gone (shared_run_directory)
        (run_dir / "error.txt").write_text("".join(traceback.format_exception(error)))


if __name__ == "__main__":
    main()
