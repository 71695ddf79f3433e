"""What the dashboards show: W&B's metric definitions (curves against `epoch` and `global_step`, best-value
summaries), step rows, epoch-end callbacks, images, tables, the model artifact and preemption, and console
output that stays readable when it goes to a file rather than a terminal."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from perceiver.experiment.tracking import WandbTracker
from perceiver.training import TrainingInterrupted
from perceiver.training.settings import TrainSettings
from tests.helpers import run_script
from tests.helpers.training import RecordingTracker
from tests.helpers.wandb_files import MetricDefinition, media, read_metric_definitions, read_offline_run

EPOCH_KEYS = ("train/*", "val/*", "val_ema/*", "perf/*", "lr", "images_per_second", "epoch_seconds")


def assert_epoch_metrics_defined(definitions: dict[str, MetricDefinition]) -> None:
    assert definitions["epoch"] == MetricDefinition("epoch", "", (), False)
    for name in EPOCH_KEYS:
        assert definitions[name].step_metric == "epoch", name
        assert definitions[name].is_glob == name.endswith("*"), name
    assert definitions["val/loss"] == MetricDefinition("val/loss", "epoch", ("min",), False)
    assert definitions["val/top1"] == MetricDefinition("val/top1", "epoch", ("max",), False)
    assert definitions["val_ema/loss"] == MetricDefinition("val_ema/loss", "epoch", ("min",), False)
    assert definitions["val_ema/top1"] == MetricDefinition("val_ema/top1", "epoch", ("max",), False)


def test_an_offline_run_plots_epoch_rows_against_epoch_and_keeps_the_best_validation(tmp_path: Path) -> None:
    tracker = WandbTracker(config={"seed": 1}, run_dir=tmp_path, mode="offline")
    rows = [{"epoch": 1, "val/loss": 0.5, "val/top1": 0.6}, {"epoch": 2, "val/loss": 0.8, "val/top1": 0.4}]
    for row in rows:
        tracker.log(row, step=row["epoch"])  # W&B's own step still passes through
    tracker.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert_epoch_metrics_defined(read_metric_definitions(run_file))
    run = read_offline_run(run_file)
    assert [(row["_step"], row["epoch"]) for row in run.history] == [(1, 1), (2, 2)]
    # The best epoch's values, not the last epoch's (0.8 and 0.4).
    assert run.summary["val/loss"] == {"min": 0.5} and run.summary["val/top1"] == {"max": 0.6}


class BrokenRun:
    id = "brokenrun2"

    def log(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("service unavailable")


def test_the_offline_run_a_failed_online_run_falls_back_to_defines_the_metrics_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = WandbTracker(config={}, run_dir=tmp_path, mode="disabled")
    tracker.mode, tracker.run_id, tracker.run = "online", "brokenrun2", BrokenRun()
    tracker._init_args = {"project": "perceiver", "config": {}, "dir": str(tmp_path)}
    tracker.log({"epoch": 1, "val/loss": 1.0}, step=1)  # fails, and is repeated in an offline run
    tracker.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*-brokenrun2/run-*.wandb")
    assert_epoch_metrics_defined(read_metric_definitions(run_file))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "service unavailable" in warnings[0]  # none about the metric definitions


class RunWithoutDefineMetric:
    """A run whose `define_metric` fails (an older or broken wandb) but which logs fine."""

    id, dir = "nodefine", "."

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def define_metric(self, *args: object, **kwargs: object) -> None:
        raise AttributeError("define_metric is not available")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.logged.append(metrics)

    def finish(self, exit_code: int = 0) -> None:
        pass


def test_a_failing_define_metric_only_warns_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    run = RunWithoutDefineMetric()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    tracker = WandbTracker(config={}, run_dir=tmp_path, mode="online")
    tracker.log({"epoch": 1, "val/loss": 1.0}, step=1)
    assert tracker.run is run and tracker.mode == "online" and run.logged == [{"epoch": 1, "val/loss": 1.0}]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "define_metric is not available" in warnings[0]


# ----------------------------------------------------------------------------- what the tracker sends to W&B


def test_images_predictions_model_artifact_and_preemption_reach_the_offline_run(tmp_path: Path) -> None:
    figure = tmp_path / "figure.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(figure)
    (tmp_path / "best.pt").write_bytes(b"weights")
    tracker = WandbTracker(config={}, run_dir=tmp_path, mode="offline", log_model=True, prediction_rows=2)
    tracker.log({"epoch": 1, "val/loss": 1.0}, step=7)
    tracker.log_images({"attention/maps": figure}, step=7)
    rows = [(np.full((4, 4, 3), 10 * i, dtype=np.uint8), f"c{i}", f"c{i % 2}", 0.5 + i / 10) for i in range(3)]
    tracker.log_predictions("predictions", rows, step=7)
    tracker.log_artifact(tmp_path / "best.pt", name=f"model-{tracker.run_id}")
    tracker.mark_preempting()
    tracker.finish(exit_code=143)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = read_offline_run(run_file)
    (row,) = run.history  # one W&B step: the epoch row with its media
    assert row["_step"] == 7 and media(row) == {"attention/maps": "image-file", "predictions": "table-file"}
    assert row["predictions/nrows"] == 2  # prediction_rows=2
    staged = next(a for a in run.artifacts if a.type == "run_table").files  # the table as W&B uploads it
    table = json.loads(Path(staged["predictions.table.json"]).read_text())
    assert table["columns"] == ["image", "label", "prediction", "confidence"]
    assert [r[1:] for r in table["data"]] == [["c0", "c0", 0.5], ["c1", "c1", 0.6]]
    for image, *_ in table["data"]:
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (4, 4)
        assert Path(staged[image["path"]]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = next(a for a in run.artifacts if a.type == "model")
    assert model.name == f"model-{tracker.run_id}" and set(model.aliases) >= {"best", "latest"}
    assert run.preempting and run.exit_code == 143
    step_metrics = read_metric_definitions(run_file)
    assert step_metrics["global_step"] == MetricDefinition("global_step", "", (), False)
    assert step_metrics["train_step/*"] == MetricDefinition("train_step/*", "global_step", (), True)
    assert step_metrics["attention/*"].step_metric == "epoch"


# ----------------------------------------------------------------------------- a whole run


@pytest.mark.slow
def test_the_cpu_smoke_run_leaves_attention_maps_and_a_dashboard_in_its_wandb_files(tmp_path: Path) -> None:
    """`python train.py experiment=cpu_smoke` with its defaults (offline: no credentials here): 6 epochs of 29
    steps, attention figures at epoch 5 (trainer.attention_every_n_epochs=5) and at the end, a step row every 50
    global steps, and the predictions table."""
    run_dir = tmp_path / "run"
    result = run_script("train.py", "experiment=cpu_smoke", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("epoch-0005.png", "final.png"):
        assert (run_dir / "attention" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    definitions = read_metric_definitions(run_file)
    assert_epoch_metrics_defined(definitions)
    assert definitions["train_step/*"].step_metric == "global_step" and "global_step" in definitions
    run = read_offline_run(run_file)
    assert [row["epoch"] for row in run.history] == [1, 2, 3, 4, 5, 6]
    assert [media(row) for row in run.history] == [{}] * 4 + [
        {"attention/maps": "image-file"},
        {"attention/final": "image-file", "predictions": "table-file"},
    ]
    assert run.history[-1]["predictions/nrows"] == 32  # logger.prediction_rows
    assert [row["global_step"] for row in run.step_history] == [50, 100, 150]
    assert [row["_step"] for row in run.step_history] == [50, 100, 150]  # W&B's step is the global step
    assert [row["_step"] for row in run.history] == [29 * epoch for epoch in range(1, 7)]
    for row in run.step_history:
        assert math.isfinite(row["train_step/loss"]) and row["train_step/loss"] > 0 and row["train_step/lr"] == 1e-3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4, 5, 6]  # metrics.json: epoch rows only


def test_sigterm_marks_the_wandb_run_preempting(
    compose_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real signal path, in-process: SIGTERM arrives at the end of epoch 1 (sent by an epoch-end callback);
    the loop saves at the next step and stops; the run tells W&B it was preempted, and exits 143."""
    from perceiver.experiment import dashboards
    from perceiver.experiment.run import train

    monkeypatch.setattr(
        dashboards.RunDashboards, "callbacks", lambda self: [lambda end: os.kill(os.getpid(), signal.SIGTERM)]
    )
    cfg = compose_config("experiment=cpu_smoke", "logger.mode=offline", "trainer.epochs=2", "data.source.num_train=200")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, run_dir=tmp_path)
    assert stopped.value.exit_code == 143
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = read_offline_run(run_file)
    assert run.preempting and run.exit_code == 143
    assert [row["epoch"] for row in run.history] == [1]


class NoMaps(torch.nn.Module):
    """A classifier without attention maps (as the ViT baseline)."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class TableTracker(RecordingTracker):
    prediction_rows = 3

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list, int | None]] = []
        self.images: list[tuple[dict, int | None]] = []

    def log_predictions(self, key: str, rows: list, step: int | None = None) -> None:
        self.tables.append((key, rows, step))

    def log_images(self, images: dict, step: int | None = None) -> None:
        self.images.append((images, step))


def test_predictions_are_the_models_on_the_fixed_validation_images_and_no_maps_means_no_figure(
    tmp_path: Path,
) -> None:
    from perceiver import BatchAugment
    from perceiver.data import ArrayDataset
    from perceiver.experiment.dashboards import RunDashboards

    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 10, 10), dtype=torch.uint8)
    val = ArrayDataset(images, torch.tensor([0, 1, 2, 0, 1]))
    augment = BatchAugment(image_size=8, num_classes=3)
    augment.set_statistics([120.0] * 3, [50.0] * 3)
    model, tracker = NoMaps(), TableTracker()
    shown = RunDashboards(model, augment, val, TrainSettings(device="cpu"), tmp_path, tracker, ["a", "b", "c"])
    assert shown.callbacks() == []  # no attention maps: nothing to draw at epoch ends
    shown.at_end(model, global_step=12, best_epoch=2)
    assert tracker.images == [] and not (tmp_path / "attention").exists()
    ((key, rows, step),) = tracker.tables
    assert key == "predictions" and step == 12 and len(rows) == 3  # prediction_rows images spread over the split
    chosen = [0, 2, 4]
    x = (images[chosen].double() - 120.0) / 50.0
    x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = torch.softmax(model.linear(x.mean(dim=(2, 3)).float()), dim=-1)
    for (picture, label, prediction, confidence), truth, p in zip(rows, "acb", expected, strict=True):
        assert picture.shape == (8, 8, 3) and picture.dtype == np.uint8
        assert label == truth and prediction == "abc"[int(p.argmax())]
        assert confidence == pytest.approx(float(p.max()), rel=1e-5)


def test_the_fixed_batch_is_spread_over_a_split_ordered_by_class() -> None:
    from perceiver.data import ArrayDataset
    from perceiver.experiment.dashboards import spread_images

    labels = torch.arange(10).repeat_interleave(3)  # an image folder's order: class by class
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 3, 2, 2).contiguous()
    picked, picked_labels = spread_images(ArrayDataset(images, labels), 4)
    assert picked[:, 0, 0, 0].tolist() == [0, 10, 19, 29] and picked_labels.tolist() == [0, 3, 6, 9]
    assert len(spread_images(ArrayDataset(images, labels), 50)[0]) == 30  # a small split: all of it
