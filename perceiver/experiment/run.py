"""One training run from a composed config: build the parts, fit, test, write `metrics.json`.

`train(cfg, run_dir)` is what `python train.py` calls inside Hydra, and what tests and other programs call
with a config from Hydra's compose API. It continues a run from its checkpoint (`resume`) and returns a
finished job's metrics without running it again (`skip_finished`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from perceiver.experiment.build import (
    Parts,
    build,
    build_parts,
    load_data,
    make_loaders,
    shared_cache_dir,
    with_measured_peak,
)
from perceiver.experiment.config import ConfigError, check_run_settings
from perceiver.experiment.dashboards import RunDashboards
from perceiver.experiment.resume import carried_overrides, resumed_config
from perceiver.experiment.sweeps import run_name, run_tags, swept_keys
from perceiver.experiment.tracking import NullTracker
from perceiver.files import write_text_atomic
from perceiver.training import FitResult, RunRecord, TrainingInterrupted, TrainState, distributed, evaluate, fit
from perceiver.training.checkpoint import locate
from perceiver.training.device import (
    configure_determinism,
    keep_freed_memory,
    objects_so_far_frozen,
    resolve_device,
)

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def in_hydra() -> bool:
    return HydraConfig.initialized()


def run_directory(cfg: DictConfig) -> Path:
    """Hydra's run dir inside `python train.py`; a new timestamped one below paths.output_dir otherwise."""
    if in_hydra():
        return Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.paths.output_dir) / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if in_hydra() else []


def in_sweep() -> bool:
    return in_hydra() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def _without_skip(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+").startswith("skip_finished=")]


def finished_job(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The metrics of this very job when its run dir says it already finished (a resumed sweep)."""
    path = run_dir / "metrics.json"
    if not cfg.get("skip_finished") or not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if _without_skip(metrics.get("overrides", [])) != _without_skip(job_overrides()):
        raise ConfigError(
            f"{run_dir} already holds a finished job with other overrides ({metrics.get('overrides')}); "
            "give this sweep a new hydra.sweep.dir, or set skip_finished=false to overwrite it"
        )
    log.info("already finished (%s): skipped; test top1 %.4f", path, metrics["test"]["top1"])
    return metrics


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


def record_failure(run_dir: Path, error: BaseException) -> None:
    """`error.txt` in the run dir: the traceback, for the sweep summary and for whoever reads it later."""
    if run_dir.is_dir():  # another rank's Hydra dir may be gone (shared_run_directory)
        (run_dir / "error.txt").write_text("".join(traceback.format_exception(error)))


def continue_from(state: TrainState, cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """The config and overrides of a resumed run: the checkpoint's, with this command's changes."""
    command = overrides if in_hydra() else None
    cfg = resumed_config(state.run.config, cfg, command, state.run.overrides)
    return cfg, carried_overrides(state.run.overrides, overrides)  # the original run's, then these


def model_card(cfg: DictConfig, parts: Parts) -> dict[str, Any]:
    """What best.pt records so the model can be used outside this run (`perceiver.load_run`): how it was built,
    its class names (the data set's; CIFAR's are known once loaded), the side its images come in, the data."""
    source = parts.source
    classes = getattr(source, "classes", None) or [f"class_{label}" for label in range(parts.num_classes)]
    return {
        "model_config": parts.model_config,
        "classes": list(classes),
        "data_image_size": getattr(source, "image_size", None),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }


def prepare(cfg: DictConfig, context: distributed.Context) -> Parts:
    """Seeds, parts and process-wide settings, in the order that keeps runs reproducible."""
    check_run_settings(cfg)  # the seed is used next
    seed_everything(cfg.seed)
    parts = build_parts(cfg)
    if parts.settings.keep_freed_memory:
        keep_freed_memory()
    if context.rank:  # same initial weights everywhere (DDP broadcasts rank 0's); own dropout and augmentation
        torch.manual_seed(cfg.seed + context.rank)
    configure_determinism(parts.settings.deterministic)
    parts.settings = with_measured_peak(parts.settings, parts.model, parts.device, shared_cache_dir(cfg))
    return parts


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Build, fit, test; returns what it writes to metrics.json. With `resume` (a run dir or checkpoint, or
    `auto` for one in this run dir) it continues that run in its directory; a finished run is only reported."""
    run_dir = Path(run_dir) if run_dir is not None else run_directory(cfg)
    context = join_process_group(cfg)
    run_dir = shared_run_directory(run_dir, context)
    if (finished := finished_job(cfg, run_dir)) is not None:
        return finished
    resume = locate(cfg.get("resume"), run_dir)
    if resume is not None and resume.finished is not None:
        log.info(
            "%s has finished already (test top1 %s); nothing to resume: start a new run with resume=null",
            resume.run_dir,
            resume.finished.get("test", {}).get("top1"),
        )
        return resume.finished
    overrides, state = job_overrides(), None
    if resume is not None:
        state = TrainState.from_dict(resume.state, resume.path)
        cfg, overrides = continue_from(state, cfg, overrides)
        run_dir = resume.run_dir
        log.info("resuming the run in %s from %s", run_dir, resume.path)
    return Run(cfg, run_dir, context, overrides).execute(state)


class Run:
    """A run being executed: its config, directory, rank and overrides, and what it writes."""

    def __init__(self, cfg: DictConfig, run_dir: Path, context: distributed.Context, overrides: list[str]) -> None:
        self.cfg, self.run_dir, self.context, self.overrides = cfg, run_dir, context, overrides
        self.parts = prepare(cfg, context)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.num_parameters = sum(p.numel() for p in self.parts.model.parameters() if p.requires_grad)
        self.identity = tracking_identity(cfg)
        self.job_number = HydraConfig.get().job.num if in_sweep() else None

    def execute(self, resume: TrainState | None) -> dict[str, Any]:
        parts, context = self.parts, self.context
        if context.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        log.info(
            "model: %s trainable parameters; device %s; run dir %s",
            f"{self.num_parameters:,}",
            parts.device,
            self.run_dir,
        )
        init_from = self.cfg.get("init_from") if resume is None else None  # a resumed run has its own weights
        if init_from:
            from perceiver.experiment.finetune import is_artifact, start_from  # only when used (it loads inference)
        if init_from and not is_artifact(init_from):
            start_from(init_from, parts.model, parts.model_config)  # before the data: a bad path costs seconds
        if not context.is_main:
            distributed.barrier()  # rank 0 downloads and caches the statistics first
        splits = load_data(self.cfg, parts)
        if context.is_main:
            distributed.barrier()
        train_loader, val_loader, test_loader = make_loaders(splits, parts, self.cfg.seed, context)
        tracker = self.start_tracker(resume.run.wandb_run_id if resume is not None else None)
        exit_code = 1
        try:
            if init_from and is_artifact(init_from):
                start_from(init_from, parts.model, parts.model_config, tracker)  # recorded as the run's input
            record = RunRecord(self.resolved, self.overrides, model_card=model_card(self.cfg, parts))
            loaders = (train_loader, val_loader)
            shown = self.dashboards(splits.val, tracker)
            callbacks = shown.callbacks() if shown is not None else []
            with objects_so_far_frozen():  # the start-up's objects are not walked by every full GC pass
                result = fit(
                    parts.training(), *loaders, parts.settings, self.run_dir, resume, tracker, record, callbacks
                )
            if shown is not None:
                shown.at_end(parts.model, result.global_step, result.best_epoch)
            test = evaluate(
                parts.model, parts.augment, test_loader, parts.device, parts.settings.precision, parts.num_classes
            )
            metrics = self.finish(result, test, tracker)
            exit_code = 0
            return metrics
        except TrainingInterrupted as stopped:
            exit_code = stopped.exit_code
            if stopped.signum == signal.SIGTERM:  # a scheduler's preemption: W&B expects the run to resume
                tracker.mark_preempting()
            raise
        finally:
            tracker.finish(exit_code=exit_code)

    def dashboards(self, val: Any, tracker: Any) -> RunDashboards | None:
        """Attention figures and the predictions table of a fixed validation batch: rank 0's."""
        if not self.context.is_main:
            return None
        classes = getattr(self.parts.source, "classes", None)
        parts = self.parts
        return RunDashboards(parts.model, parts.augment, val, parts.settings, self.run_dir, tracker, classes)

    def start_tracker(self, run_id: str | None) -> Any:
        """One W&B run per training run: rank 0's, continued under its id when resuming."""
        if not self.context.is_main:
            return NullTracker()
        config = {
            **self.resolved,
            "num_parameters": self.num_parameters,
            "overrides": self.overrides,
            "job_num": self.job_number,
        }
        return build("logger", self.cfg.logger)(config=config, run_dir=self.run_dir, run_id=run_id, **self.identity)

    def finish(self, result: FitResult, test: dict[str, float], tracker: Any) -> dict[str, Any]:
        """The W&B summary and artifact, then metrics.json last: a job is complete once that file exists."""
        metrics = {
            "test": test,
            "best_epoch": result.best_epoch,
            "best_val": result.best_val,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "images_per_second": result.images_per_second,
            "train_seconds": result.train_seconds,
            "num_parameters": self.num_parameters,
            "device": str(self.parts.device),
            "wandb_run_id": tracker.run_id,
            "wandb_group": self.identity["group"],
            "job_num": self.job_number,
            "overrides": self.overrides,
            "settings": self.resolved,
            "history": result.history,
        }
        tracker.summarize(
            {f"test/{k}": v for k, v in test.items()}
            | {"best_epoch": result.best_epoch, "images_per_second": result.images_per_second}
        )
        if self.parts.settings.save_checkpoints:
            tracker.log_artifact(self.run_dir / "best.pt", name=f"model-{tracker.run_id}")
        tracker.finish(exit_code=0)
        if self.context.is_main:
            write_text_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
        log.info(
            "test: top1 %.4f top5 %.4f loss %.4f (best epoch %d) -> %s",
            test["top1"],
            test["top5"],
            test["loss"],
            result.best_epoch,
            self.run_dir / "metrics.json",
        )
        return metrics
