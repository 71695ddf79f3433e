"""One training run from a composed config: resolve where and how it runs, build the parts, fit, test, write
`metrics.json`.

`train(cfg, run_dir)` is what `python train.py` calls inside Hydra, and what tests and other programs call
with a config from Hydra's compose API. It continues a run from its checkpoint (`resume`) and returns a
finished job's metrics without running it again (`skip_finished`).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from perceiver.experiment.build import (
    Parts,
    build,
    build_parts,
    configured_device,
    load_data,
    make_loaders,
    shared_cache_dir,
    with_measured_peak,
)
from perceiver.experiment.dashboards import RunDashboards
from perceiver.experiment.job import finished_job, in_hydra, job_number, job_overrides, run_directory, tracking_identity
from perceiver.experiment.resume import carried_overrides, resumed_config
from perceiver.experiment.tracking import NullTracker, Tracker
from perceiver.files import write_text_atomic
from perceiver.training import FitResult, RunRecord, TrainingInterrupted, TrainState, distributed, evaluate, fit
from perceiver.training.checkpoint import locate
from perceiver.training.device import configure_determinism, keep_freed_memory, objects_so_far_frozen

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """What a run resolves once, before anything is built, and passes down."""

    cfg: DictConfig  # what runs: a resumed run's config is the checkpoint's, with this command's changes
    run_dir: Path  # rank 0's, shared by every rank
    context: distributed.Context  # this process's rank among the run's processes
    device: torch.device  # this rank's device, from the config it runs
    overrides: list[str]  # the command's (a resumed run's: the original run's, then these)
    resume: TrainState | None = None
    finished: dict[str, Any] | None = None  # the metrics of a run that has finished already: nothing to do


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Build, fit, test; returns what it writes to metrics.json. With `resume` (a run dir or checkpoint, or
    `auto` for one in this run dir) it continues that run in its directory; a finished run is only reported."""
    setup = resolve_setup(cfg, run_dir)
    if setup.finished is not None:
        return setup.finished
    cfg, is_main = setup.cfg, setup.context.is_main
    parts = prepare(setup)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if is_main:
        (setup.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        "model: %s trainable parameters; device %s; run dir %s",
        f"{parts.num_parameters:,}",
        parts.device,
        setup.run_dir,
    )
    init_from = cfg.get("init_from") if setup.resume is None else None  # a resumed run has its own weights
    if init_from:
        from perceiver.experiment.finetune import is_artifact, start_from  # only when used (it loads inference)
    if init_from and not is_artifact(init_from):
        start_from(init_from, parts.model, parts.model_config)  # before the data: a bad path costs seconds
    if not is_main:
        distributed.barrier()  # rank 0 downloads and caches the statistics first
    splits = load_data(cfg, parts)
    if is_main:
        distributed.barrier()
    loaders = make_loaders(splits, parts, cfg.seed, setup.context)  # train, validation, test
    tracker = start_tracker(setup, resolved, parts.num_parameters)
    exit_code = 1
    try:
        if init_from and is_artifact(init_from):
            start_from(init_from, parts.model, parts.model_config, tracker)  # recorded as the run's input
        record = RunRecord(resolved, setup.overrides, tracker.run_id, model_card(cfg, parts))
        shown = dashboards(setup, parts, splits.val, tracker)
        callbacks = shown.callbacks() if shown is not None else []
        settings, run_dir = parts.settings, setup.run_dir
        with objects_so_far_frozen():  # the start-up's objects are not walked by every full GC pass
            result = fit(parts, *loaders[:2], settings, run_dir, setup.resume, tracker.log, record, callbacks)
        if shown is not None:
            shown.at_end(parts.model, result.global_step, result.best_epoch)
        augment, test_loader = parts.augment, loaders[2]
        test = evaluate(
            parts.model,
            augment.preprocess,
            test_loader,
            parts.device,
            settings.precision,
            parts.num_classes,
            mirror=augment.test_hflip,
        )
        metrics = finish(setup, parts, resolved, result, test, tracker)
        exit_code = 0
        return metrics
    except TrainingInterrupted as stopped:
        exit_code = stopped.exit_code
        if stopped.signum == signal.SIGTERM:  # a scheduler's preemption: W&B expects the run to resume
            tracker.mark_preempting()
        raise
    finally:
        tracker.finish(exit_code=exit_code)


def resolve_setup(cfg: DictConfig, run_dir: Path | None) -> RunSetup:
    """The rank and device (joining the process group under torchrun), the shared run directory, and what this
    run continues from: nothing, a checkpoint, or a run that has finished."""
    run_dir = Path(run_dir) if run_dir is not None else run_directory(cfg)
    context = join_process_group(cfg, configured_device(cfg))
    run_dir = shared_run_directory(run_dir, context)
    setup = RunSetup(cfg, run_dir, context, torch.device("cpu"), job_overrides())
    setup.finished = finished_job(cfg, run_dir)
    if setup.finished is not None:
        return setup
    resume = locate(cfg.get("resume"), run_dir)
    if resume is not None and resume.finished is not None:
        log.info(
            "%s has finished already (test top1 %s); nothing to resume: start a new run with resume=null",
            resume.run_dir,
            resume.finished.get("test", {}).get("top1"),
        )
        setup.finished = resume.finished
    elif resume is not None:
        setup.resume = state = TrainState.from_dict(resume.state, resume.path)
        command = setup.overrides if in_hydra() else None
        setup.cfg = resumed_config(state.run.config, cfg, command, state.run.overrides)
        setup.overrides = carried_overrides(state.run.overrides, setup.overrides)  # the original run's, then these
        setup.run_dir = resume.run_dir
        log.info("resuming the run in %s from %s", resume.run_dir, resume.path)
    setup.device = distributed.rank_device(configured_device(setup.cfg), context)  # a resumed run's device setting
    return setup


def join_process_group(cfg: DictConfig, device: torch.device) -> distributed.Context:
    """Under torchrun: join the process group (Gloo on CPU, NCCL on CUDA); otherwise a single process."""
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


def prepare(setup: RunSetup) -> Parts:
    """Seeds, parts and process-wide settings, in the order that keeps runs reproducible."""
    parts = build_parts(setup.cfg, setup.device)  # seeded with `seed` first
    if parts.settings.keep_freed_memory:
        keep_freed_memory()
    if setup.context.rank:  # same initial weights everywhere (DDP broadcasts rank 0's); own dropout and augmentation
        torch.manual_seed(setup.cfg.seed + setup.context.rank)
    configure_determinism(parts.settings.deterministic)
    parts.settings = with_measured_peak(parts.settings, parts.model, parts.device, shared_cache_dir(setup.cfg))
    return parts


def dashboards(setup: RunSetup, parts: Parts, val: Any, tracker: Tracker) -> RunDashboards | None:
    """Attention figures and the predictions table of a fixed validation batch: rank 0's."""
    if not setup.context.is_main:
        return None
    classes = getattr(parts.source, "classes", None)
    return RunDashboards(parts.model, parts.augment, val, parts.settings, setup.run_dir, tracker, classes)


def model_card(cfg: DictConfig, parts: Parts) -> dict[str, Any]:
    """What best.pt records so the model can be used outside this run (`perceiver.load_run`): how it was built,
    its class names (the data set's; CIFAR's are known once loaded), the side its images come in, the data.
    The loop adds the normalisation its input pipeline applied."""
    source = parts.source
    classes = getattr(source, "classes", None) or [f"class_{label}" for label in range(parts.num_classes)]
    return {
        "model_config": parts.model_config,
        "classes": list(classes),
        "data_image_size": getattr(source, "image_size", None),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }


def start_tracker(setup: RunSetup, resolved: dict[str, Any], num_parameters: int) -> Tracker:
    """One W&B run per training run: rank 0's, continued under its id when resuming."""
    if not setup.context.is_main:
        return NullTracker()
    config = {**resolved, "num_parameters": num_parameters, "overrides": setup.overrides, "job_num": job_number()}
    run_id = setup.resume.run.wandb_run_id if setup.resume is not None else None
    identity = tracking_identity(setup.cfg)
    return build("logger", setup.cfg.logger)(config=config, run_dir=setup.run_dir, run_id=run_id, **identity)


def finish(
    setup: RunSetup, parts: Parts, resolved: dict[str, Any], result: FitResult, test: dict[str, float], tracker: Tracker
) -> dict[str, Any]:
    """The W&B summary and artifact, then metrics.json last: a job is complete once that file exists."""
    metrics = {
        "test": test,
        "best_epoch": result.best_epoch,
        "best_val": result.best_val,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "images_per_second": result.images_per_second,
        "train_seconds": result.train_seconds,
        "num_parameters": parts.num_parameters,
        "device": str(parts.device),
        "wandb_run_id": tracker.run_id,
        "wandb_group": tracking_identity(setup.cfg)["group"],
        "job_num": job_number(),
        "overrides": setup.overrides,
        "settings": resolved,
        "history": result.history,
    }
    tracker.summarize(
        {f"test/{k}": v for k, v in test.items()}
        | {"best_epoch": result.best_epoch, "images_per_second": result.images_per_second}
    )
    if parts.settings.save_checkpoints:
        tracker.log_artifact(setup.run_dir / "best.pt", name=f"model-{tracker.run_id}")
    tracker.finish(exit_code=0)
    if setup.context.is_main:
        write_text_atomic(setup.run_dir / "metrics.json", json.dumps(metrics, indent=2))
    log.info(
        "test: top1 %.4f top5 %.4f loss %.4f (best epoch %d) -> %s",
        test["top1"],
        test["top5"],
        test["loss"],
        result.best_epoch,
        setup.run_dir / "metrics.json",
    )
    return metrics
