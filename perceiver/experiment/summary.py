"""Summarise a sweep directory: one row per job, mean +- std over seeds per grid point, a plot of test
top-1 against the ablated axis, and the same tables and plot (as an image and a native W&B chart) as a W&B
run in the sweep's group; `sweep.json` records the grid, its command and that run for `sweep.py report`.

Reads only what the jobs wrote (`.hydra/overrides.yaml`, `metrics.json`, `error.txt`), so it works on
a finished, failed or half-done sweep, and again at any time later. `SweepSummary` is the Hydra callback
that does it at the end of every `--multirun`, under any launcher or sweeper (`summarize_failed_sweep` for one
that Hydra ended at a failed job).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from perceiver.experiment.config import check_targets
from perceiver.experiment.sweeps import (
    parse_value,
    recorded_command,
    recorded_sweep,
    short_key,
    split_override,
    swept_in,
)

log = logging.getLogger(__name__)

METRICS = ("top1", "top5", "loss")  # test metrics, aggregated over seeds
SEED_KEY = "seed"


@dataclass
class Job:
    """One job directory of a sweep and what it left behind."""

    number: int
    directory: Path
    overrides: dict[str, str]
    status: str  # finished | failed | incomplete
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    arguments: list[str] = field(default_factory=list)  # the overrides that made it, as given


@dataclass
class Summary:
    sweep_dir: Path
    jobs: list[Job]
    keys: list[str]  # the swept keys other than the seed: one grid point per combination
    axis: str | None  # the key on the plot's x axis
    rows: list[dict[str, Any]]  # one per grid point
    settings: dict[str, Any] = field(default_factory=dict)  # the sweep's multirun.yaml; empty without one

    @property
    def job_rows(self) -> list[dict[str, Any]]:
        return [job_row(job, self.keys) for job in self.jobs]


def read_job(directory: Path) -> Job:
    overrides_file = directory / ".hydra" / "overrides.yaml"
    arguments = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]
    job = Job(int(directory.name), directory, dict(map(split_override, arguments)), "incomplete", arguments=arguments)
    metrics_file, error_file = directory / "metrics.json", directory / "error.txt"
    if metrics_file.is_file():
        job.status, job.metrics = "finished", json.loads(metrics_file.read_text())
    elif error_file.is_file():
        job.status, job.error = "failed", error_file.read_text().strip().splitlines()[-1]
    return job


def collect_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory (named by its Hydra job number) in job order."""
    directories = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    return sorted((read_job(d) for d in directories if d.name.isdigit()), key=lambda job: job.number)


def varying_keys(jobs: Sequence[Job]) -> list[str]:
    """Keys whose value differs between jobs, in the order they first appear."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sort_key(value: str) -> tuple[int, Any]:
    """Numbers by size, then everything else in grid order."""
    parsed = parse_value(value)
    is_number = isinstance(parsed, int | float) and not isinstance(parsed, bool)
    return (0, parsed) if is_number else (1, 0)


def aggregate(jobs: Sequence[Job], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per grid point (combination of `keys`), with mean +- std of the finished jobs' metrics."""
    points: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        points.setdefault(tuple(job.overrides.get(key, "") for key in keys), []).append(job)
    rows = []
    for point, members in points.items():
        finished = [job for job in members if job.status == "finished"]
        row: dict[str, Any] = dict(zip(keys, point, strict=True))
        row |= {"n": len(finished), "failed": sum(job.status == "failed" for job in members)}
        for name in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([job.metrics["test"][name] for job in finished])
        row["images_per_second"] = mean_std([job.metrics["images_per_second"] for job in finished])[0]
        row["num_parameters"] = finished[0].metrics["num_parameters"] if finished else None
        rows.append(row)
    return rows


def job_row(job: Job, keys: Sequence[str]) -> dict[str, Any]:
    test = job.metrics.get("test", {})
    return {
        "job": job.number,
        **{key: job.overrides.get(key, "") for key in keys},
        # a failed job's seed, when not swept, is unknown: None, not "", so that a W&B table column keeps one type
        SEED_KEY: job.overrides.get(SEED_KEY, job.metrics.get("settings", {}).get(SEED_KEY)),
        "status": job.status,
        **{name: test.get(name) for name in METRICS},
        "best_epoch": job.metrics.get("best_epoch"),
        "epochs_run": job.metrics.get("epochs_run"),
        "images_per_second": job.metrics.get("images_per_second"),
        "wandb_run_id": job.metrics.get("wandb_run_id"),
        "num_parameters": job.metrics.get("num_parameters"),
        "train_seconds": job.metrics.get("train_seconds"),
        "overrides": shlex.join(job.arguments),
        "error": job.error,
    }


def summarize(sweep_dir: Path) -> Summary:
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (*/.hydra/overrides.yaml): is it a sweep dir?")
    settings = recorded_sweep(sweep_dir) or {}
    swept = swept_in(settings) if settings else varying_keys(jobs)
    keys = [key for key in swept if key != SEED_KEY]
    axis = (settings.get("ablation") or {}).get("axis")
    axis = axis if axis in keys else (keys[0] if keys else None)
    return Summary(sweep_dir, jobs, keys, axis, aggregate(jobs, keys), settings)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(summary: Summary) -> str:
    """Grid points with `mean ± std (n)` cells: readable in a terminal, a PR or a W&B report."""
    headers = [short_key(key, summary.keys) for key in summary.keys] + ["n", "top-1", "top-5", "loss", "params"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in summary.rows:
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        cells = [str(row[key]) for key in summary.keys] + [f"{row['n']}{failed}"]
        cells += [f"{row[f'{name}_mean']:.4f} ± {row[f'{name}_std']:.4f}" for name in METRICS]
        cells.append(f"{row['num_parameters']:,}" if row["num_parameters"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class PlotData:
    """What the plot shows: x positions and tick labels of the axis, and per line the points (x, mean, std)."""

    ticks: dict[str, float]  # axis value -> x position (the value itself when numeric, else its grid index)
    numeric: bool
    lines: dict[str, list[tuple[float, float, float]]]


def plot_data(summary: Summary) -> PlotData:
    """Test top-1 points of every grid point with finished jobs; one line per combination of the other keys."""
    axis = summary.axis
    others = [key for key in summary.keys if key != axis]
    values = list(dict.fromkeys(row[axis] for row in summary.rows)) if axis else [""]  # grid order
    numeric = axis is not None and all(sort_key(v)[0] == 0 for v in values)
    if numeric:
        values.sort(key=sort_key)
    ticks = {v: (parse_value(v) if numeric else i) for i, v in enumerate(values)}
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in summary.rows:
        label = ",".join(f"{short_key(k, summary.keys)}={row[k]}" for k in others)
        points = lines.setdefault(label, [])
        if row["n"]:
            points.append((ticks[row[axis]] if axis else 0, row["top1_mean"], row["top1_std"]))
    return PlotData(ticks, numeric, {label: sorted(points) for label, points in lines.items()})


def plot(summary: Summary, path: Path) -> Path:
    """Test top-1 (mean ± std over seeds) against the axis, error bars = std."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    data = plot_data(summary)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.add_subplot()
    style = "-" if data.numeric else "none"  # no lines between categories
    for label, points in data.lines.items():
        xs, means, stds = zip(*points, strict=True) if points else ((), (), ())
        ax.errorbar(xs, means, yerr=stds, marker="o", linestyle=style, capsize=3, label=label or None)
    positions = list(data.ticks.values())
    if data.numeric and min(positions) > 0 and max(positions) / min(positions) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(positions, list(data.ticks))
    ax.set_xlabel(summary.axis or "")
    ax.set_ylabel("test top-1 (mean ± std over seeds)")
    ax.set_title(summary.sweep_dir.name)
    ax.grid(alpha=0.3)
    if len(data.lines) > 1:
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def write_summary(summary: Summary) -> dict[str, Path]:
    """summary.csv / summary.md (grid points), jobs.csv (every job) and top1.png in the sweep dir."""
    out = summary.sweep_dir
    files = {"summary_csv": out / "summary.csv", "summary_md": out / "summary.md", "jobs_csv": out / "jobs.csv"}
    write_csv(files["jobs_csv"], summary.job_rows)
    if summary.rows:
        write_csv(files["summary_csv"], summary.rows)
        files["summary_md"].write_text(markdown_table(summary))
    if any(row["n"] for row in summary.rows):
        files["plot"] = plot(summary, out / "top1.png")
    return files


def wandb_group(summary: Summary) -> str:
    """The group the jobs logged to (recorded in their metrics.json), else the sweep dir's name."""
    groups = [job.metrics.get("wandb_group") for job in summary.jobs if job.metrics.get("wandb_group")]
    return groups[0] if groups else summary.sweep_dir.name


def log_to_wandb(summary: Summary, files: dict[str, Path], tracker_factory: Any) -> dict[str, Any] | None:
    """A `summary` run in the sweep's group with both tables and the plot; returns where it is (id, mode, URL
    when online, group), None when no run was made."""
    import wandb

    settings = summary.settings
    name = (settings.get("ablation") or {}).get("name") or summary.sweep_dir.name
    tracker = tracker_factory(
        config={"sweep_dir": str(summary.sweep_dir), "ablation": settings.get("ablation"), "keys": summary.keys},
        run_dir=summary.sweep_dir,
        group=wandb_group(summary),
        job_type="summary",
        name=f"{name}-summary",
        tags=["summary", name],
    )
    try:
        logged: dict[str, Any] = {"jobs": table(summary.job_rows)}
        if summary.rows:
            logged["grid"] = table(summary.rows)
        if "plot" in files:
            logged["top1_plot"] = wandb.Image(str(files["plot"]))
            logged["top1_chart"] = native_chart(summary)
        tracker.log(logged)
        best = max((row for row in summary.rows if row["n"]), key=lambda row: row["top1_mean"], default=None)
        if best is not None:
            tracker.summarize({"best/top1_mean": best["top1_mean"], **{f"best/{k}": best[k] for k in summary.keys}})
        url = getattr(tracker.run, "url", None) if tracker.mode == "online" else None
    finally:
        tracker.finish()
    if not tracker.run_id:
        return None
    return {"run_id": tracker.run_id, "mode": tracker.mode, "url": url, "group": wandb_group(summary)}


def chart_rows(summary: Summary) -> list[dict[str, Any]]:
    """The plot's points as table rows: the axis value (a number on a numeric axis), test top-1 mean and std,
    and the line (the other swept keys) the point belongs to."""
    data = plot_data(summary)
    labels = {position: value for value, position in data.ticks.items()}
    name = short_key(summary.axis, summary.keys) if summary.axis else "point"
    return [
        {name: x if data.numeric else labels[x], "top1_mean": mean, "top1_std": std, "line": line or "all"}
        for line, points in data.lines.items()
        for x, mean, std in points
    ]


def native_chart(summary: Summary) -> Any:
    """The plot as a W&B chart, interactive in the dashboard: a line chart (one line per other setting) on a
    numeric axis, a bar chart on a categorical one (lines between categories would mean nothing)."""
    import wandb

    rows = chart_rows(summary)
    name = next(iter(rows[0]))
    title = f"test top-1 against {name} ({summary.sweep_dir.name})"
    if plot_data(summary).numeric:
        stroke = "line" if len({row["line"] for row in rows}) > 1 else None
        return wandb.plot.line(table(rows), name, "top1_mean", stroke=stroke, title=title)
    for row in rows:
        row["label"] = row[name] if row["line"] == "all" else f"{row[name]} ({row['line']})"
    return wandb.plot.bar(table(rows), "label", "top1_mean", title=title)


def table(rows: Sequence[dict[str, Any]]) -> Any:
    import wandb

    columns = list(rows[0])
    return wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])


def report(sweep_dir: Path, use_wandb: bool = True, logger: Any = None) -> int:
    """Write the tables and the plot, print the table, log the W&B summary run with the `logger` settings
    (default: the sweep's own, from its multirun.yaml); 1 if any job is not finished."""
    summary = summarize(sweep_dir)
    tracker_factory = logger_factory(logger or summary.settings.get("logger")) if use_wandb else None
    files = write_summary(summary)
    print(markdown_table(summary) if summary.rows else "no finished jobs")
    statuses = [job.status for job in summary.jobs]
    counts = {status: statuses.count(status) for status in ("finished", "failed", "incomplete")}
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f" of {len(summary.jobs)} jobs")
    for name, path in files.items():
        print(f"{name}: {path}")
    summary_run = log_to_wandb(summary, files, tracker_factory) if tracker_factory is not None else None
    if summary_run:
        print(f"W&B summary run {summary_run['run_id']} in group {summary_run['group']}")
    files["sweep_json"] = write_record(summary, summary_run)
    print(f"sweep_json: {files['sweep_json']}")
    if any(sweep_dir.glob("**/wandb/offline-run-*")):
        runs = f"{sweep_dir}/*/wandb/offline-run-* {sweep_dir}/wandb/offline-run-*"
        print(f"offline W&B runs: upload them all with `wandb sync {runs}`")
    for job in summary.jobs:
        if job.status == "failed":
            print(f"job {job.number} failed: {job.error} (see {job.directory / 'error.txt'})")
    return 0 if counts["finished"] == len(summary.jobs) else 1


def write_record(summary: Summary, summary_run: dict[str, Any] | None) -> Path:
    """sweep.json: what `sweep.py report` needs beside jobs.csv, so that the committed summary files alone
    make the results page: the grid, the command that ran it and its W&B summary run (an earlier one is kept
    when this summary made none, e.g. `summarize --no-wandb`)."""
    path = summary.sweep_dir / "sweep.json"
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        earlier = {}  # a damaged record is written anew
    settings = summary.settings
    record = {
        "ablation": (settings.get("ablation") or {}).get("name"),
        "keys": summary.keys,
        "axis": (settings.get("ablation") or {}).get("axis") or summary.axis,  # the grid's, even when not swept
        "overrides": recorded_command(summary.sweep_dir) if settings else None,  # the sweep's command line
        "wandb_summary_run": summary_run or earlier.get("wandb_summary_run"),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def logger_factory(logger: Any) -> Any:
    """The sweep's own logger settings (mode, project, entity) for its summary run; W&B (auto) without any."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if logger is None:
        from perceiver.experiment.tracking import WandbTracker

        return lambda **kwargs: WandbTracker(mode="auto", **kwargs)
    check_targets({"logger": logger}, "the sweep's config (multirun.yaml)")
    return instantiate(OmegaConf.create(logger) if isinstance(logger, dict) else logger)


class SweepSummary(Callback):
    """At the end of a multirun, the sweep's summary: tables, plot, and a W&B run in the sweep's group.

    Hydra ends a multirun whose job failed before `on_multirun_end`; the entry point then makes the same summary
    with `summarize_failed_sweep` (perceiver.experiment.cli), while W&B's service is still up.
    """

    def __init__(self, log_to_wandb: bool = True) -> None:
        self.log_to_wandb = log_to_wandb

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write(Path(config.hydra.sweep.dir), config.get("logger"))

    def write(self, sweep_dir: Path, logger: Any = None) -> None:
        """A summary that cannot be made never hides the sweep's own outcome."""
        try:
            report(sweep_dir, self.log_to_wandb, logger)
        except Exception as error:
            log.warning("no sweep summary for %s: %s: %s", sweep_dir, type(error).__name__, error)


def summarize_failed_sweep(sweep_dir: Path) -> None:
    """The summary of a sweep that Hydra ended at a failed job, as its callback (configured in its multirun.yaml)
    would have made it; none for a sweep that ran without the callback."""
    callbacks = ((recorded_sweep(sweep_dir) or {}).get("hydra") or {}).get("callbacks") or {}
    target = f"{SweepSummary.__module__}.{SweepSummary.__qualname__}"
    for settings in callbacks.values():
        if settings.get("_target_") == target:
            SweepSummary(bool(settings.get("log_to_wandb", True))).write(sweep_dir)
