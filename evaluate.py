"""Evaluate a trained run, or classify image files with it: `python evaluate.py run=DIR [split=...] [data=...]
[predict=PATH_OR_GLOB]`.

A thin Hydra entry point over `perceiver.experiment.evaluation`: it prints the numbers (the test top-1 exactly as
the training run's metrics.json holds it) or each file's top-k classes, and where the outputs went.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from perceiver.experiment import cli
from perceiver.experiment.config import ConfigError
from perceiver.experiment.evaluation import evaluate_run, predict_files
from perceiver.training import CheckpointError

CONF = Path(__file__).resolve().parent / "conf"


def print_evaluation(metrics: dict, out_dir: Path) -> None:
    split, n, correct = metrics["split"], metrics["num_images"], metrics["correct"]
    print(
        f"{split}: top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f} loss {metrics['loss']:.4f} "
        f"({n} images; top1 = {correct}/{n} = {metrics['top1']!r}, loss {metrics['loss']!r})"
    )
    trained = metrics.get("training_metrics")
    if trained:
        same = "the same" if trained.get("top1") == metrics["top1"] else "DIFFERENT"
        print(f"training wrote test top1 {trained.get('top1')!r} for this split: {same}")
    for name in ("metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "mistakes.png"):
        print(f"  -> {out_dir / name}")


def print_predictions(rows: list[dict], out_dir: Path) -> None:
    for row in rows:
        top = ", ".join(f"{p['class']} {p['probability']:.4f}" for p in row["predictions"])
        print(f"{row['file']}: {top}")
    print(f"  -> {out_dir / 'predictions.csv'}\n  -> {out_dir / 'predictions.json'}")


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    cli.require(cfg, "run", "give run=DIR (a run directory, a sweep job directory or a best.pt)")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.predict:
            print_predictions(predict_files(cfg, out_dir), out_dir)
        else:
            print_evaluation(evaluate_run(cfg, out_dir), out_dir)
    except (ConfigError, CheckpointError) as error:
        cli.fail(str(error), 2)


if __name__ == "__main__":
    cli.run_hydra_app(main)
    cli.exit_without_teardown()
