"""Sweeps end to end: named grids, one W&B run per job (read back from W&B's own files), failed jobs,
resuming a killed sweep, the joblib launcher, and sweep.py's summary against a recomputation."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import sweep
from perceiver.experiment.config import ConfigError
from perceiver.experiment.run import train
from perceiver.experiment.summary import (
    Summary,
    log_to_wandb,
    markdown_table,
    plot_data,
    summarize,
    write_summary,
)
from perceiver.experiment.sweeps import grid, run_name, run_tags, wandb_sweep_config
from perceiver.experiment.tracking import WandbTracker
from perceiver.training.device import configure_determinism
from tests.helpers import CONF, REPO, job_dirs, offline_runs, run_script

TINY_JOBS = ["experiment=cpu_smoke", "logger.mode=offline", "trainer.epochs=2", "data.source.num_train=600"]
ABLATIONS = sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))


python = run_script


# --- the grid and the names, without running anything ---------------------------------------------


def test_command_line_values_replace_a_grids_own_and_add_axes() -> None:
    axes = grid(["model.latent_dim=32,64,128", "experiment=cpu_smoke", "model.latent_dim=8,16", "seed=range(3)"])
    assert axes == {"model.latent_dim": ["8", "16"], "experiment": ["cpu_smoke"], "seed": ["0", "1", "2"]}


def test_run_names_use_the_swept_overrides_with_short_keys() -> None:
    overrides = ["experiment=cpu_smoke", "model.latent_dim=512", "seed=1"]
    assert run_name(overrides, swept=["model.latent_dim", "seed"]) == "latent_dim=512,seed=1"
    assert run_name(overrides, swept=None) == "experiment=cpu_smoke,latent_dim=512,seed=1"
    assert run_name(["model.dropout_rate=0.1", "augment.dropout_rate=0.2"], None) == (
        "model.dropout_rate=0.1,augment.dropout_rate=0.2"
    )
    assert run_name([], None) is None
    tags = run_tags(["x=" + "a" * 100, "seed=1", "seed=1"], extra=["num_latents"])
    assert tags == ["num_latents", "x=" + "a" * 62, "seed=1"]


def test_wandb_sweep_config_has_the_same_grid_and_a_hydra_command() -> None:
    config = wandb_sweep_config(
        ["model.latent_dim=32,64", "ablation=num_latents", "seed=0,1", "+trainer.note=x"], name="num_latents"
    )
    assert config["method"] == "grid" and config["program"] == "train.py"
    assert config["parameters"] == {"model.latent_dim": {"values": [32, 64]}, "seed": {"values": [0, 1]}}
    assert config["command"][3:] == ["ablation=num_latents", "+trainer.note=x", "${args_no_hyphens}"]


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_grid_point_of_every_ablation_composes_and_builds(
    name: str, compose_config: Callable[..., DictConfig]
) -> None:
    cfg = compose_config(f"ablation={name}")
    assert cfg.ablation.name == name
    params = OmegaConf.load(CONF / "ablation" / f"{name}.yaml").hydra.sweeper.params
    axes = grid([f"{key}={value}" for key, value in params.items()])
    assert cfg.ablation.axis in axes, f"{name}: its plot axis is not one of its swept keys"
    assert sum(len(v) > 1 for v in axes.values()) >= 1
    points = [[]]
    for key, values in axes.items():
        points = [[*point, f"{key}={value}"] for point in points for value in values]
    for point in points:
        model = instantiate(compose_config(f"ablation={name}", *point).model, num_classes=10, in_channels=3)
        assert sum(p.numel() for p in model.parameters()) > 0, point


def test_the_weight_sharing_grid_separates_its_three_options(compose_config: Callable[..., DictConfig]) -> None:
    counts = {
        sharing: sum(
            p.numel()
            for p in instantiate(
                compose_config("ablation=weight_sharing", f"model.weight_sharing={sharing}").model,
                num_classes=10,
                in_channels=3,
            ).parameters()
        )
        for sharing in ("all", "all_but_first", "none")
    }
    assert counts["all"] < counts["all_but_first"] < counts["none"]


def write_job(sweep_dir: Path, number: int, overrides: list[str], top1: float | None) -> None:
    """A job directory as train.py leaves it: Hydra's overrides.yaml, and metrics.json once finished."""
    job = sweep_dir / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if top1 is not None:
        test = {"top1": top1, "top5": min(1.0, top1 + 0.2), "loss": 1.0 - top1}
        metrics = {"test": test, "images_per_second": 100.0 + number, "num_parameters": 1000, "overrides": overrides}
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_summary_groups_seeds_per_point_and_plots_categories_in_grid_order(tmp_path: Path) -> None:
    top1 = {("none", "1"): [0.5, 0.7], ("learned", "1"): [0.6, 0.64], ("none", "2"): [0.2], ("learned", "2"): [0.3]}
    number = 0
    for (encoding, iterations), values in top1.items():
        for seed, value in enumerate(values):
            overrides = [f"model.position_encoding={encoding}", f"model.num_iterations={iterations}", f"seed={seed}"]
            write_job(tmp_path, number, overrides, value)
            number += 1
    write_job(tmp_path, number, ["model.position_encoding=none", "model.num_iterations=2", "seed=1"], None)

    summary = summarize(tmp_path)  # no multirun.yaml: the keys are the ones that vary
    assert summary.keys == ["model.position_encoding", "model.num_iterations"]
    assert summary.axis == "model.position_encoding"
    assert [job.status for job in summary.jobs] == ["finished"] * 6 + ["incomplete"]
    for row in summary.rows:
        values = top1[(row["model.position_encoding"], row["model.num_iterations"])]
        assert row["n"] == len(values)
        assert row["top1_mean"] == pytest.approx(statistics.mean(values))
        assert row["top1_std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
        assert row["loss_mean"] == pytest.approx(statistics.mean(1.0 - v for v in values))

    data = plot_data(summary)
    assert data.ticks == {"none": 0, "learned": 1} and not data.numeric
    assert data.lines["num_iterations=1"] == [
        (0, pytest.approx(0.6), pytest.approx(0.1414, abs=1e-4)),
        (1, 0.62, pytest.approx(0.0283, abs=1e-4)),
    ]
    assert [x for x, _, _ in data.lines["num_iterations=2"]] == [0, 1]
    table = markdown_table(summary).splitlines()
    assert table[0] == "| position_encoding | num_iterations | n | top-1 | top-5 | loss | params |"
    assert table[2].startswith("| none | 1 | 2 | 0.6000 ± 0.1414 |")
    files = write_summary(summary)
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("key", "values", "chart", "x"),
    [
        ("model.latent_dim", ["64", "32"], "wandb/line/v0", "latent_dim"),
        ("model.position_encoding", ["none", "learned"], "wandb/bar/v0", "label"),
    ],
    ids=["numeric-line", "categorical-bar"],
)
def test_the_summary_run_holds_the_plot_as_a_native_wandb_chart(
    tmp_path: Path, key: str, values: list[str], chart: str, x: str
) -> None:
    """Beside the PNG: a line chart over the plot's points on a numeric axis, a bar chart on a categorical one;
    its table holds the same means as the grid (top-1 of seeds 0 and 1 here: 0.1 * job number + 0.1, 0.2, ...)."""
    number = 0
    for value in values:
        for seed in (0, 1):
            write_job(tmp_path, number, [f"{key}={value}", f"seed={seed}"], 0.1 * (number + 1))
            number += 1
    summary = summarize(tmp_path)
    log_to_wandb(summary, write_summary(summary), lambda **kwargs: WandbTracker(mode="offline", **kwargs))
    (run,) = offline_runs(tmp_path)
    panel = run.charts["top1_chart"]
    assert panel["panelDefId"] == chart
    assert panel["fieldSettings"]["x" if chart.endswith("line/v0") else "label"] == x
    assert panel["fieldSettings"]["y" if chart.endswith("line/v0") else "value"] == "top1_mean"
    assert (
        run.history[0]["top1_chart_table/_type"] == "table-file" and run.history[0]["top1_plot/_type"] == "image-file"
    )
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/top1_chart_table_*.table.json")
    table = json.loads(table_file.read_text())
    means = {row[0]: row[table["columns"].index("top1_mean")] for row in table["data"]}
    expected = {values[0]: 0.15, values[1]: 0.35}
    if chart.endswith("line/v0"):
        expected = {int(value): mean for value, mean in expected.items()}
        assert list(means) == sorted(means)  # along the axis
    assert means == pytest.approx(expected)


def test_numeric_axes_are_sorted_by_value() -> None:
    rows = [{"model.latent_dim": v, "n": 1, "top1_mean": 0.1, "top1_std": 0.0} for v in ("512", "32", "128")]
    summary = Summary(Path("sweep"), [], ["model.latent_dim"], "model.latent_dim", rows)
    data = plot_data(summary)
    assert data.numeric and list(data.ticks) == ["32", "128", "512"]
    assert [x for x, _, _ in data.lines[""]] == [32, 128, 512]


# --- skipping finished jobs --------------------------------------------------------------------------


def test_a_finished_job_is_returned_not_rerun_and_a_different_one_is_refused(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config("experiment=cpu_smoke", "logger=none")
    stored = {"test": {"top1": 0.25, "top5": 0.5, "loss": 2.0}, "overrides": []}
    (tmp_path / "metrics.json").write_text(json.dumps(stored))
    assert train(cfg, run_dir=tmp_path) == stored
    assert not (tmp_path / "config.yaml").exists(), "a skipped job must not start again"
    (tmp_path / "metrics.json").write_text(json.dumps({**stored, "overrides": ["model.latent_dim=8"]}))
    with pytest.raises(ConfigError, match="already holds a finished job with other overrides"):
        train(cfg, run_dir=tmp_path)


def test_determinism_does_not_leak_from_one_job_into_the_next() -> None:
    configure_determinism(True)
    assert torch.are_deterministic_algorithms_enabled()
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()


# --- real sweeps ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_runs_a_2x2_grid_logs_every_job_and_summarises_it(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "num_iterations_sweep"
    result = python(
        "sweep.py",
        "ablation=num_iterations",
        "model.num_iterations=1,2",  # replaces the grid's own 1,2,4,8
        "seed=0,1",
        *TINY_JOBS,
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]

    runs = [offline_runs(job) for job in jobs]
    assert [len(r) for r in runs] == [1, 1, 1, 1], "one W&B run per job"
    runs = [r[0] for r in runs]
    assert {run.group for run in runs} == {sweep_dir.name}
    assert {run.job_type for run in runs} == {"num_iterations"}
    assert [run.name for run in runs] == [
        "num_iterations=1,seed=0",
        "num_iterations=1,seed=1",
        "num_iterations=2,seed=0",
        "num_iterations=2,seed=1",
    ]
    assert len({run.run_id for run in runs}) == 4
    for number, (job, run) in enumerate(zip(jobs, runs, strict=True)):
        metrics = json.loads((job / "metrics.json").read_text())
        assert run.run_id == metrics["wandb_run_id"] and run.exit_code == 0
        assert run.config["model"]["num_iterations"] == [1, 1, 2, 2][number]
        assert run.config["seed"] == [0, 1, 0, 1][number] and run.config["job_num"] == number
        assert "model.num_iterations=" + str(run.config["model"]["num_iterations"]) in run.config["overrides"]
        assert "num_iterations" in run.tags and f"seed={run.config['seed']}" in run.tags
        assert [row["epoch"] for row in run.history] == [1, 2]
        assert [row["val/loss"] for row in run.history] == pytest.approx([r["val/loss"] for r in metrics["history"]])
        assert run.summary["test/top1"] == pytest.approx(metrics["test"]["top1"])

    # The summary, recomputed from the jobs' own metrics.json.
    with (sweep_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model.num_iterations"] for row in rows] == ["1", "2"]
    for row in rows:
        members = [job for job in jobs if f"model.num_iterations={row['model.num_iterations']}" in _overrides(job)]
        top1 = [json.loads((job / "metrics.json").read_text())["test"]["top1"] for job in members]
        assert int(row["n"]) == len(top1) == 2
        assert float(row["top1_mean"]) == pytest.approx(statistics.mean(top1))
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(top1))
    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.splitlines()[0].startswith("| num_iterations | n | top-1")
    assert len(markdown.splitlines()) == 2 + 2
    with (sweep_dir / "jobs.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["finished"] * 4
    assert (sweep_dir / "top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (summary_run,) = offline_runs(sweep_dir)
    assert summary_run.group == sweep_dir.name and summary_run.job_type == "summary"
    logged = summary_run.history[0]
    assert logged["grid/_type"] == "table-file" and logged["grid/nrows"] == 2
    assert logged["jobs/nrows"] == 4 and logged["top1_plot/_type"] == "image-file"
    table = json.loads(next(sweep_dir.glob("wandb/offline-run-*/files/media/table/grid_*.table.json")).read_text())
    column = table["columns"].index("top1_mean")
    means = {r[0]: r[column] for r in table["data"]}
    assert means == {row["model.num_iterations"]: pytest.approx(float(row["top1_mean"])) for row in rows}


def _overrides(job: Path) -> list[str]:
    return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.slow
def test_a_failing_job_is_marked_failed_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = python("train.py", "--multirun", *TINY_JOBS, "optimizer.lr=1e30,1e-3", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode != 0, "a sweep with a failed job must not exit 0"
    failed, finished = job_dirs(sweep_dir)
    assert "NonFiniteLossError" in (failed / "error.txt").read_text()
    assert not (failed / "metrics.json").exists()
    assert (finished / "metrics.json").is_file(), "the job after the failed one did not run"
    (failed_run,), (finished_run,) = offline_runs(failed), offline_runs(finished)
    assert failed_run.exit_code != 0 and finished_run.exit_code == 0
    assert failed_run.group == finished_run.group == sweep_dir.name
    assert result.stderr.splitlines()[-1].startswith("error: a job of the sweep failed: NonFiniteLossError")

    # The sweep's own summary run, made at its end although Hydra ended the multirun with the failed job.
    (summary_run,) = offline_runs(sweep_dir)
    assert summary_run.group == sweep_dir.name and summary_run.job_type == "summary" and summary_run.exit_code == 0
    assert summary_run.config["sweep_dir"] == str(sweep_dir) and summary_run.config["keys"] == ["optimizer.lr"]
    assert summary_run.history[0]["jobs/nrows"] == 2
    (jobs_file,) = sweep_dir.glob("wandb/offline-run-*/files/media/table/jobs_*.table.json")
    jobs_table = json.loads(jobs_file.read_text())
    rows = [dict(zip(jobs_table["columns"], row, strict=True)) for row in jobs_table["data"]]
    top1 = json.loads((finished / "metrics.json").read_text())["test"]["top1"]
    assert [(row["job"], row["status"], row["top1"]) for row in rows] == [(0, "failed", None), (1, "finished", top1)]
    assert "NonFiniteLossError" in rows[0]["error"] and rows[1]["wandb_run_id"] == finished_run.run_id
    recorded = json.loads((sweep_dir / "sweep.json").read_text())["wandb_summary_run"]
    assert recorded["run_id"] == summary_run.run_id and recorded["mode"] == "offline"

    assert sweep.main(["summarize", str(sweep_dir), "--no-wandb"]) == 1  # not every job finished
    summary = summarize(sweep_dir)
    assert [job.status for job in summary.jobs] == ["failed", "finished"]
    assert "the training loss became nan at epoch 1" in summary.jobs[0].error
    points = [(row["optimizer.lr"], row["n"], row["failed"]) for row in summary.rows]
    assert points == [("1e+30", 0, 1), ("0.001", 1, 0)]


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_only_the_missing_jobs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "sweep.py", "ablation=num_iterations", "model.num_iterations=1,2,3", *TINY_JOBS]
    process = subprocess.Popen(
        [*command, f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = sweep_dir / "0" / "metrics.json"
    try:
        deadline = time.monotonic() + 240
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert first.exists(), "the first job never finished"
    assert not (sweep_dir / "2" / "metrics.json").exists(), "killed too late to test resuming"
    kept = first.read_bytes(), first.stat().st_mtime_ns

    result = python("sweep.py", "resume", str(sweep_dir), "--no-wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept, "the finished job ran again"
    assert len(offline_runs(sweep_dir / "0")) == 1
    for number, iterations in enumerate((1, 2, 3)):
        metrics = json.loads((sweep_dir / str(number) / "metrics.json").read_text())
        assert metrics["settings"]["model"]["num_iterations"] == iterations
        assert metrics["wandb_group"] == sweep_dir.name
    assert "| num_iterations | n | top-1" in result.stdout


@pytest.mark.slow
def test_jobs_run_in_parallel_with_the_joblib_launcher(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = python(
        "train.py",
        "--multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY_JOBS,
        "model.num_iterations=1,2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [offline_runs(job) for job in job_dirs(sweep_dir)]
    assert [len(r) for r in runs] == [1, 1]
    assert {r[0].group for r in runs} == {sweep_dir.name}
    assert [r[0].name for r in runs] == ["num_iterations=1", "num_iterations=2"]
    assert [r[0].config["model"]["num_iterations"] for r in runs] == [1, 2]


# --- sweep.py's other commands and its errors --------------------------------------------------------


def test_wandb_sweep_writes_a_config_without_credentials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = sweep.main(["ablation=num_latents", "seed=0,1", f"paths.output_dir={tmp_path}", "--wandb-sweep"])
    assert code == 0
    (path,) = tmp_path.glob("sweeps/num_latents_*/wandb_sweep.yaml")
    config = yaml.safe_load(path.read_text())
    assert config["parameters"]["model.latent_dim"]["values"] == [32, 64, 128, 256, 512]
    assert config["parameters"]["seed"]["values"] == [0, 1]
    assert "ablation=num_latents" in config["command"]
    assert "no W&B credentials" in capsys.readouterr().out


def test_list_names_every_ablation(capsys: pytest.CaptureFixture) -> None:
    assert sweep.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ABLATIONS:
        assert name in out
    assert "paper Table 2" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ablation=no_such_grid"], "named grids: "),
        (["summarize", "/no/such/sweep"], "is not a directory"),
        (["summarize"], "usage: python sweep.py summarize SWEEP_DIR"),
        (["resume", "{tmp}"], "multirun.yaml not found"),
        (["summarize", "{tmp}"], "holds no job directories"),
    ],
)
def test_sweep_errors_are_one_clear_line(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert sweep.main([a.format(tmp=tmp_path) for a in arguments]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_grid_name_is_one_line_naming_the_grids() -> None:
    result = python("sweep.py", "ablation=nope", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: In 'train': Could not find 'ablation/nope': named grids: ")
    assert lines[0].count("num_latents") == 1 and all(name in lines[0] for name in ABLATIONS)


def test_a_sweeps_recorded_logger_naming_other_code_is_refused_and_runs_none_of_it(tmp_path: Path) -> None:
    """`sweep.py summarize DIR` builds the summary run's logger from DIR's multirun.yaml: a file, so data only."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0" / ".hydra").mkdir(parents=True)
    (sweep_dir / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    logger = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    recorded = {"hydra": {"overrides": {"task": ["seed=0"]}, "sweeper": {"params": None}}, "logger": logger}
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(recorded))
    result = python("sweep.py", "summarize", str(sweep_dir), timeout=120)
    assert victim.read_text() == "precious", result.stderr[-3000:]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "logger._target_='builtins.open' is refused" in result.stderr and "Traceback" not in result.stderr
