"""Train and test one Perceiver: `python train.py [group=option ...] [field=value ...]`.

A thin Hydra entry point: `perceiver.experiment.run.train` builds the parts from the composed config, fits,
tests and writes `metrics.json`, `config.yaml` and the checkpoints into the Hydra run directory. This file
adds what only a command line knows: how to run it again.
"""

from __future__ import annotations

import gc

gc.disable()  # the start-up makes objects that live as long as the run: collecting meanwhile only walks them again
# (~0.5 s of full passes); the run turns the collector back on for training (training.device.objects_so_far_frozen)

from pathlib import Path

import hydra
from omegaconf import DictConfig

from perceiver.experiment import cli
from perceiver.experiment.run import train
from perceiver.training import distributed

CONF = Path(__file__).resolve().parent / "conf"


def resume_command(run_dir: Path) -> str:
    return f"python train.py resume={run_dir}"


def skip_command(run_dir: Path) -> str:
    return f"python train.py resume={run_dir} trainer.nonfinite_loss=skip"


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the test top-1, so Hydra sweepers can optimise it. A failing job leaves `error.txt` in its
    run dir; a sweep goes on with its other jobs, a single run reports the problem in one line."""
    try:
        return train(cfg)["test"]["top1"]
    except Exception as error:
        cli.exit_on_failure(error, cfg, resume_command, skip_command)
    finally:
        distributed.leave()


if __name__ == "__main__":
    cli.run_hydra_app(main)
    cli.exit_without_teardown()
