"""Tiny trained runs for the tests of what comes after training (load, evaluate, predict, export, fine-tune), made
once per test module with the environment isolated as `tests/conftest.py` isolates each test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.conftest import CONF

SMOKE = ("experiment=cpu_smoke", "trainer.epochs=2")


@contextlib.contextmanager
def isolated(root: Path) -> Iterator[pytest.MonkeyPatch]:
    """Data caches, W&B files (artifact staging too) and credentials below `root`, for module-scoped fixtures
    that run before the per-test isolation applies."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PERCEIVER_DATA_ROOT", str(root / "data"))
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(root / name.lower()))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("NETRC", str(root / "netrc"))
        env.delenv("WANDB_API_KEY", raising=False)
        env.delenv("WANDB_MODE", raising=False)
        yield env


def compose_config(name: str, *overrides: str) -> DictConfig:
    """conf/<name>.yaml composed with overrides, as `python <name>.py OVERRIDES` would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def train_run(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """A tiny run trained in-process into `run_dir` (cpu_smoke for 2 epochs unless overridden); its metrics."""
    from perceiver.experiment.run import train

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config("train", *SMOKE, "logger=none", f"paths.output_dir={run_dir.parent}", *overrides)
    return train(cfg, run_dir=run_dir)
