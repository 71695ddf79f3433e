"""What the dashboards show: W&B's metric definitions (curves against `epoch` and `global_step`, best-value
summaries), step rows, epoch-end callbacks, images, tables, the model artifact and preemption, and console
output that stays readable when it goes to a file rather than a terminal."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from perceiver.experiment.tracking import WandbTracker
from perceiver.training import EpochEnd, TrainingInterrupted, distributed, loop
from perceiver.training.settings import TrainSettings
from tests.conftest import REPO
from tests.helpers import run_script
from tests.wandb_files import MetricDefinition, media, read_metric_definitions, read_offline_run

EPOCH_KEYS = ("train/*", "val/*", "perf/*", "lr", "images_per_second", "epoch_seconds")


def assert_epoch_metrics_defined(definitions: dict[str, MetricDefinition]) -> None:
    assert definitions["epoch"] == MetricDefinition("epoch", "", (), False)
    for name in EPOCH_KEYS:
        assert definitions[name].step_metric == "epoch", name
        assert definitions[name].is_glob == name.endswith("*"), name
    assert definitions["val/loss"] == MetricDefinition("val/loss", "epoch", ("min",), False)
    assert definitions["val/top1"] == MetricDefinition("val/top1", "epoch", ("max",), False)


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


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_is_drawn_only_on_rank_zero_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not loop.draws_progress_bar(True)  # redirected to a file
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert loop.draws_progress_bar(True) and not loop.draws_progress_bar(False)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=1, world_size=2))
    assert not loop.draws_progress_bar(True)


class CountingStep:
    """Stands in for `TrainStep`: counts its calls and the host reads of the loss it returns (each
    `item()` of a real loss is a device sync)."""

    def __init__(self, settings: TrainSettings) -> None:
        self.model, self.settings = torch.nn.Identity(), settings
        self.calls = self.reads = 0

    def __call__(self, *args: object) -> CountingStep:
        self.calls += 1
        return self  # the "loss"

    def item(self) -> float:
        self.reads += 1
        return 0.25


@pytest.mark.parametrize(("batches", "lines"), [(250, 5), (200, 0)])
def test_without_a_bar_a_long_epoch_logs_its_loss_every_n_steps(
    batches: int, lines: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Five intervals of 50 in 250 batches; 200 batches (4 intervals) is short: the epoch-end line is enough.
    Under pytest stderr is no terminal, so `progress_bar=true` draws no bar."""
    step = CountingStep(TrainSettings(progress_bar=True, log_every_n_steps=50, device="cpu"))
    caplog.set_level(logging.INFO, logger=loop.__name__)
    loader = [(torch.zeros(1), torch.zeros(1))] * batches
    loop.train_one_epoch(step, loader, metrics=None, description="epoch 1/1")
    logged = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert step.calls == batches and step.reads == lines == len(logged)
    if lines:
        assert logged[0] == "epoch 1/1  batch 50/250  loss 0.2500"


@pytest.mark.slow
def test_a_progress_bar_redirected_to_a_file_writes_no_carriage_returns(tmp_path: Path) -> None:
    """A cluster job's log is a file: tqdm would fill it with a `\\r` per redraw."""
    epochs, output = 2, tmp_path / "output.txt"
    command = [sys.executable, "train.py", "experiment=cpu_smoke", "logger=none", "trainer.progress_bar=true"]
    command += [f"trainer.epochs={epochs}", f"hydra.run.dir={tmp_path / 'run'}"]
    with output.open("w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = output.read_text()
    assert result.returncode == 0, text[-3000:]
    assert text.count("\r") <= 2 * epochs, repr(text[-2000:])
    assert text.count("train loss") == epochs  # each epoch is still reported, by its epoch-end line


# ----------------------------------------------------------------------------- step rows, epoch-end callbacks


class RecordingTracker:
    """Keeps what `fit` logs, as (row, step); `on_log(row, step)` may act on it (send a signal)."""

    run_id = None

    def __init__(self, on_log: Any = None) -> None:
        self.logged: list[tuple[dict[str, Any], int | None]] = []
        self.on_log = on_log

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))
        if self.on_log is not None:
            self.on_log(metrics, step)

    def step_rows(self) -> list[tuple[dict[str, Any], int | None]]:
        return [(row, step) for row, step in self.logged if "global_step" in row]

    def epoch_rows(self) -> list[tuple[dict[str, Any], int | None]]:
        return [(row, step) for row, step in self.logged if "epoch" in row]


def small_fit(run_dir: Path, tracker: Any, resume: Any = None, callbacks: Any = (), **settings: Any) -> Any:
    """3 batches per epoch (tests/test_engine.py's tiny problem), 3 epochs, a step row every 2 global steps."""
    from perceiver import BatchAugment, Perceiver, fit
    from perceiver.training import TrainingParts, TrainState
    from tests.test_engine import tiny_problem

    torch.manual_seed(0)
    model = Perceiver(image_size=8, patch_size=4, num_classes=2, latent_dim=4, projection_dim=8, num_heads=1)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    options = {"epochs": 3, "progress_bar": False, "device": "cpu", "log_every_n_steps": 2, **settings}
    state = TrainState.from_dict(resume) if resume is not None else None
    parts = TrainingParts(model, augment, optimizer, None, num_classes=2)
    train, val = tiny_problem()
    return fit(parts, train, val, TrainSettings(**options), run_dir, state, tracker, callbacks=callbacks)


def test_step_rows_come_every_n_global_steps_across_epochs_with_the_steps_own_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """9 steps: step rows at 2, 4, 6, 8 (epoch boundaries do not restart the count), epoch rows at 3, 6, 9; W&B's
    step is the global step for both and never goes down. The loss is the one of that very step, recorded here
    by a spy on the loss function (the loop itself reads it only at those steps)."""
    losses: list[float] = []
    real_loss = loop.classification_loss

    def spy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        loss = real_loss(logits, targets, smoothing)
        if torch.is_grad_enabled():  # training steps; evaluation runs without gradients
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "classification_loss", spy)
    tracker = RecordingTracker()
    result = small_fit(tmp_path, tracker)
    steps = [step for _, step in tracker.logged]
    assert steps == [2, 3, 4, 6, 6, 8, 9] and steps == sorted(steps)
    assert [(row["epoch"], step) for row, step in tracker.epoch_rows()] == [(1, 3), (2, 6), (3, 9)]
    assert [row for row, _ in tracker.epoch_rows()] == result.history and result.global_step == 9
    for row, step in tracker.step_rows():
        assert set(row) == {"global_step", "train_step/loss", "train_step/lr"} and row["global_step"] == step
        assert row["train_step/loss"] == pytest.approx(losses[step - 1], rel=1e-6)
        assert row["train_step/lr"] == 1e-2


def test_step_rows_reuse_the_one_loss_read_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """A long epoch (250 batches, 30 global steps before it): log lines and step rows share one read each at
    global steps 50, 100, ..., 250 (batches 20, 70, ...)."""
    step = CountingStep(TrainSettings(progress_bar=False, log_every_n_steps=50, device="cpu"))
    caplog.set_level(logging.INFO, logger=loop.__name__)
    reported: list[tuple[int, float]] = []
    loader = [(torch.zeros(1), torch.zeros(1))] * 250
    loop.train_one_epoch(
        step, loader, None, "epoch 2/2", report_loss=lambda s, v: reported.append((s, v)), steps_before=30
    )
    assert reported == [(50, 0.25), (100, 0.25), (150, 0.25), (200, 0.25), (250, 0.25)]
    assert step.reads == 5 and step.calls == 250
    lines = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert len(lines) == 5 and lines[0] == "epoch 2/2  batch 20/250  loss 0.2500"
    short = CountingStep(TrainSettings(progress_bar=False, log_every_n_steps=50, device="cpu"))
    loop.train_one_epoch(short, [(torch.zeros(1), torch.zeros(1))] * 120, None, "", report_loss=lambda s, v: None)
    assert short.reads == 2  # a short epoch logs no lines, but its step rows are still read


def sigterm_at(step: int) -> Any:
    def send(row: dict[str, Any], logged_step: int | None) -> None:
        if "train_step/loss" in row and logged_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return send


def test_a_run_stopped_by_sigterm_and_resumed_logs_every_step_once(tmp_path: Path) -> None:
    """SIGTERM right after step 4 (epoch 2, batch 1): it saves there and stops; the resumed fit logs steps 6 and
    8 and the epochs 2 and 3, exactly what the uninterrupted fit logged after step 4."""
    whole = RecordingTracker()
    small_fit(tmp_path / "whole", whole)
    first = RecordingTracker(on_log=sigterm_at(4))
    with pytest.raises(TrainingInterrupted):
        small_fit(tmp_path / "part", first)
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert state["global_step"] == 4
    second = RecordingTracker()
    small_fit(tmp_path / "part", second, resume=state)
    steps = [step for _, step in first.logged + second.logged]
    assert steps == [step for _, step in whole.logged] == sorted(steps)
    resumed_rows = [row["global_step"] for row, _ in first.step_rows() + second.step_rows()]
    assert resumed_rows == [2, 4, 6, 8]  # none twice, none lost
    timing = ("images_per_second", "epoch_seconds", "perf/tflops")
    untimed = [({k: v for k, v in row.items() if k not in timing}, s) for row, s in first.logged + second.logged]
    assert untimed == [({k: v for k, v in row.items() if k not in timing}, s) for row, s in whole.logged]


def test_epoch_end_callbacks_see_each_epoch_after_its_checkpoint_and_not_when_stopping(tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []

    def callback(end: EpochEnd) -> None:
        saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
        seen.append((end.epoch, end.global_step, saved["next_epoch"]))
        assert end.row["epoch"] == end.epoch and isinstance(end.model, torch.nn.Module)

    result = small_fit(tmp_path / "run", RecordingTracker(), callbacks=[callback])
    assert seen == [(1, 3, 2), (2, 6, 3), (3, 9, 4)] and [row["epoch"] for row in result.history] == [1, 2, 3]

    seen.clear()

    def stop_after_epoch_1(row: dict[str, Any], step: int | None) -> None:
        if row.get("epoch") == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        small_fit(tmp_path / "run", RecordingTracker(on_log=stop_after_epoch_1), callbacks=[callback])
    assert seen == []  # stopping: the checkpoint is saved, nothing else is done


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
