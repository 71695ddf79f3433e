"""The Hydra job this process runs, when there is one: its run directory, its overrides, whether it is part of a
sweep, and what follows from them (the W&B identity, a finished job to skip, the failure file)."""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from perceiver.experiment.config import ConfigError
from perceiver.experiment.sweeps import run_name, run_tags, swept_keys

log = logging.getLogger(__name__)


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


def sweep_directory() -> Path | None:
    """The directory of the sweep this job is part of; None for a single run."""
    return Path(HydraConfig.get().sweep.dir) if in_sweep() else None


def job_number() -> int | None:
    """The job's number in its sweep; None for a single run."""
    return HydraConfig.get().job.num if in_sweep() else None


def tracking_identity(cfg: DictConfig) -> dict[str, Any]:
    """W&B group / job_type / name / tags: the logger config where set, else derived from the sweep and job.

    group = the sweep directory's name (shared by all its jobs, kept on resume), job_type = the ablation,
    name = the job's swept overrides, tags = all its overrides; explicit `logger.*` values win.
    """
    overrides, logger, ablation = job_overrides(), cfg.logger, cfg.get("ablation") or {}
    sweep_dir = sweep_directory()
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


def record_failure(run_dir: Path, error: BaseException) -> None:
    """`error.txt` in the run dir: the traceback, for the sweep summary and for whoever reads it later."""
    if run_dir.is_dir():  # another rank's Hydra dir may be gone (shared_run_directory)
        (run_dir / "error.txt").write_text("".join(traceback.format_exception(error)))
