"""What the dashboards show: W&B's metric definitions (curves against `epoch`, best-value summaries), and
console output that stays readable when it goes to a file rather than a terminal."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from perceiver.experiment.tracking import WandbTracker
from perceiver.training import distributed, loop
from perceiver.training.settings import TrainSettings
from tests.conftest import REPO
from tests.wandb_files import MetricDefinition, read_metric_definitions, read_offline_run

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
