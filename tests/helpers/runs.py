"""Tiny trained runs for the tests of what comes after training (load, evaluate, predict, export, fine-tune), made
once per test module with the environment isolated (`tests.helpers.isolated`) below a root of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import compose_config, isolated

__all__ = ["compose_config", "isolated", "train_run"]

SMOKE = ("experiment=cpu_smoke", "trainer.epochs=2")


def train_run(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """A tiny run trained in-process into `run_dir` (cpu_smoke for 2 epochs unless overridden); its metrics."""
    from perceiver.experiment.run import train

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config("train", *SMOKE, "logger=none", f"paths.output_dir={run_dir.parent}", *overrides)
    return train(cfg, run_dir=run_dir)
