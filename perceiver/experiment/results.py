"""The results page of finished sweeps (`sweep.py report`): per ablation axis a table of test top-1 (mean ± std
over seeds, seeds, parameters, time per run), a figure in the style of the paper's ablation plots, the W&B
summary runs, and a plain statement whether the points differ by more than the seeds do.

Reads only the summary files every sweep writes and that are committed with the results (`jobs.csv`,
`sweep.json`), never job directories or checkpoints. Sweeps of the same grid with the same other settings (run
on different days, or resumed) merge into one axis; a seed run again in a later sweep counts once, the later run.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from perceiver.experiment.summary import SEED_KEY, sort_key
from perceiver.experiment.sweeps import SweepError, parse_value, short_key, split_override

SUMMARY_FILES = ("jobs.csv", "sweep.json")  # what `sweep.py summarize` writes and the report reads
UNMERGED = (
    "ablation",
    "seed",
    "skip_finished",
    "logger",
    "paths",
    "hydra",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
)  # the grid's name, and what no result depends on (a group, or one field)
INTERVAL_SE = 2  # a point's interval is its mean ± 2 standard errors
SPREAD_CRITERION = (
    "Whether the points of an axis differ by more than its seeds do: the best and the worst point (by mean) each "
    f"get the interval mean ± {INTERVAL_SE} standard errors, s/√n, with s the seeds' standard deviation pooled over "
    "all points of that line (s² = Σ(nᵢ − 1)sᵢ² / Σ(nᵢ − 1)) and n the point's seeds; the difference counts as "
    "larger than the seed-to-seed spread when the two intervals do not overlap. A rule of thumb, not a "
    "significance test: with 3 seeds a real but small difference can stay inside the spread."
)


@dataclass
class JobResult:
    """One row of a sweep's jobs.csv."""

    sweep: str  # the sweep directory, as given
    job: int
    point: tuple[str, ...]  # the values of the axis' keys
    seed: str
    status: str  # finished | failed | incomplete
    top1: float | None  # test top-1 in %
    num_parameters: int | None
    train_seconds: float | None
    overrides: str
    error: str


@dataclass
class SweepRecord:
    """What one sweep directory's summary files say."""

    label: str  # the directory as given on the command line
    ablation: str | None
    keys: list[str]  # the grid's axis (also where this sweep fixed it), then the other swept keys but the seed
    axis: str | None  # the key on the x axis
    overrides: list[str] | None  # the command line that ran it (and runs it again), without its program
    fixed: tuple[str, ...]  # the other settings of its command line: sweeps merge only when they agree
    summary_run: dict[str, Any] | None
    jobs: list[JobResult]

    def count(self, status: str) -> int:
        return sum(job.status == status for job in self.jobs)


@dataclass
class Point:
    """One grid point of an axis, its seeds pooled over the axis' sweeps."""

    values: tuple[str, ...]
    label: str = ""  # key=value of every swept key
    seeds: list[JobResult] = field(default_factory=list)  # finished, one per seed
    left_out: list[JobResult] = field(default_factory=list)  # failed or not finished

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def top1(self) -> list[float]:
        return [job.top1 for job in self.seeds if job.top1 is not None]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def std(self) -> float:
        """The sample standard deviation (n − 1); 0 for a single seed."""
        return statistics.stdev(self.top1) if self.n > 1 else 0.0


@dataclass
class Axis:
    """One ablation axis: the sweeps of one grid with the same other settings, and its points in plot order."""

    name: str
    keys: list[str]
    axis: str | None
    fixed: tuple[str, ...]
    sweeps: list[SweepRecord]
    points: list[Point] = field(default_factory=list)
    repeated: list[tuple[JobResult, JobResult]] = field(default_factory=list)  # (replaced, kept)

    def line_of(self, point: Point) -> str:
        """The point's values of the keys other than the x axis (the first key): one line of the figure each."""
        pairs = zip(self.keys[1:], point.values[1:], strict=True)
        return ",".join(f"{short_key(k, self.keys)}={v}" for k, v in pairs)

    def lines(self) -> dict[str, list[Point]]:
        lines: dict[str, list[Point]] = {}
        for point in self.points:
            lines.setdefault(self.line_of(point), []).append(point)
        return lines

    def x_value(self, point: Point) -> str:
        return point.values[0] if self.keys else ""


# ----------------------------------------------------------------------------- reading the summary files


def _number(text: str | None, kind: type = float) -> Any:
    return kind(float(text)) if text not in (None, "") else None


def read_sweep(directory: Path, program: str) -> SweepRecord:
    """A sweep's record from its summary files; SweepError with what to do (with `program`, the sweep command
    that called, e.g. `python sweep.py`) when they are missing or empty."""
    if not directory.is_dir():
        raise SweepError(f"{directory} is not a directory: give finished sweep directories (outputs/sweeps/NAME_...)")
    missing = [name for name in SUMMARY_FILES if not (directory / name).is_file()]
    if missing:
        if (directory / "multirun.yaml").is_file() or any(directory.glob("*/.hydra/overrides.yaml")):
            raise SweepError(
                f"{directory} lacks {', '.join(missing)}: write them with `{program} summarize {directory}`"
            )
        raise SweepError(
            f"{directory} is not a sweep directory (no {', '.join(SUMMARY_FILES)}): give one made by `{program}`"
        )
    try:
        record = json.loads((directory / "sweep.json").read_text())
        with (directory / "jobs.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise SweepError(
            f"{directory}'s summary files are unreadable ({error}): run `{program} summarize {directory}`"
        ) from error
    axis = record.get("axis")
    keys = ([axis] if axis else []) + [key for key in record.get("keys") or [] if key != axis]  # the x axis first
    absent = sorted({"job", "status", "top1", "overrides"} - set(rows[0] if rows else []))
    if not rows or absent:
        lacking = ", ".join(absent) or "jobs"
        raise SweepError(f"{directory}/jobs.csv lacks {lacking}: rewrite it with `{program} summarize {directory}`")
    jobs = [job_result(str(directory), row, keys) for row in rows]
    if not any(job.status == "finished" for job in jobs):
        statuses = ", ".join(f"{sum(j.status == s for j in jobs)} {s}" for s in ("failed", "incomplete"))
        raise SweepError(
            f"{directory} has no finished job ({statuses}): resume it with `{program} resume {directory}`, "
            "or leave it out of the report"
        )
    return SweepRecord(
        label=str(directory),
        ablation=record.get("ablation"),
        keys=keys,
        axis=axis,
        overrides=record.get("overrides"),
        fixed=fixed_settings(record.get("overrides") or [], keys),
        summary_run=record.get("wandb_summary_run"),
        jobs=jobs,
    )


def job_result(sweep: str, row: dict[str, str], keys: Sequence[str]) -> JobResult:
    top1 = _number(row.get("top1"))
    overrides = dict(split_override(o) for o in shlex.split(row["overrides"]))
    return JobResult(
        sweep=sweep,
        job=int(row["job"]),
        point=tuple(row[key] if key in row else overrides.get(key, "") for key in keys),
        seed=row.get(SEED_KEY, ""),
        status=row["status"],
        top1=100 * top1 if top1 is not None else None,
        num_parameters=_number(row.get("num_parameters"), int),
        train_seconds=_number(row.get("train_seconds")),
        overrides=row.get("overrides", ""),
        error=row.get("error", ""),
    )


def fixed_settings(overrides: Sequence[str], keys: Sequence[str]) -> tuple[str, ...]:
    """The command line's settings other than the swept keys, the seed and those that do not change a result."""
    fixed = []
    for override in overrides:
        key = split_override(override)[0]
        if key not in keys and key not in UNMERGED and key.split(".")[0].split("/")[0] not in UNMERGED:
            fixed.append(override)
    return tuple(sorted(fixed))


# ----------------------------------------------------------------------------- axes and their statistics


def group_axes(sweeps: Sequence[SweepRecord]) -> list[Axis]:
    """Sweeps of the same grid (ablation, swept keys) and other settings merge; axes in the order first given."""
    axes: dict[tuple[Any, ...], Axis] = {}
    for record in sweeps:
        identity = (record.ablation, tuple(record.keys), record.fixed)
        name = record.ablation or ", ".join(record.keys) or "no swept key"
        axes.setdefault(identity, Axis(name, record.keys, record.axis, record.fixed, [])).sweeps.append(record)
    for axis in axes.values():
        merge_points(axis)
    names = [axis.name for axis in axes.values()]
    for axis in axes.values():
        if names.count(axis.name) > 1:
            axis.name += f" ({' '.join(axis.fixed) or 'defaults'})"
    return list(axes.values())


def merge_points(axis: Axis) -> None:
    """Pool the seeds of every point over the sweeps; a seed finished twice counts once (the later sweep's)."""
    finished: dict[tuple[tuple[str, ...], str], JobResult] = {}
    points: dict[tuple[str, ...], Point] = {}
    for record in axis.sweeps:
        for job in record.jobs:
            point = points.setdefault(job.point, Point(job.point, point_label(axis, job)))
            if job.status != "finished":
                point.left_out.append(job)
                continue
            earlier = finished.get((job.point, job.seed))
            if earlier is not None:
                axis.repeated.append((earlier, job))
            finished[(job.point, job.seed)] = job
    for (values, _), job in finished.items():
        points[values].seeds.append(job)
    axis.points = sorted(points.values(), key=plot_order(axis, list(points)))


def plot_order(axis: Axis, grid: list[tuple[str, ...]]) -> Any:
    """Numeric x values by size, others in grid order; then the lines in grid order."""
    x_values = list(dict.fromkeys(axis.x_value(Point(values)) for values in grid))
    numeric = bool(x_values) and all(sort_key(v)[0] == 0 for v in x_values)
    rank = {v: (parse_value(v) if numeric else position) for position, v in enumerate(x_values)}
    lines = list(dict.fromkeys(axis.line_of(Point(values)) for values in grid))
    return lambda point: (lines.index(axis.line_of(point)), rank.get(axis.x_value(point), 0))


def is_numeric(axis: Axis) -> bool:
    values = [axis.x_value(point) for point in axis.points]
    return bool(values) and all(sort_key(v)[0] == 0 for v in values)


def interval(point: Point, pooled_std: float) -> tuple[float, float]:
    """The point's mean ± INTERVAL_SE standard errors, from the pooled seed standard deviation."""
    half = INTERVAL_SE * pooled_std / math.sqrt(point.n)
    return point.mean - half, point.mean + half


def spread_statement(points: Sequence[Point]) -> str:
    """Whether the best and the worst point differ by more than the seeds do (SPREAD_CRITERION), in words."""
    measured = [point for point in points if point.n]
    if len(measured) < 2:
        return "fewer than two points have finished seeds: nothing to compare."
    freedom = sum(point.n - 1 for point in measured)
    if freedom == 0:
        return "cannot tell: no point has two seeds, so there is no seed-to-seed spread to compare with."
    pooled = math.sqrt(sum((point.n - 1) * point.std**2 for point in measured) / freedom)
    best, worst = max(measured, key=lambda p: p.mean), min(measured, key=lambda p: p.mean)
    high, low = interval(best, pooled), interval(worst, pooled)
    larger = high[0] > low[1]
    verdict = "**larger than the seed-to-seed spread**" if larger else "**not larger than the seed-to-seed spread**"
    return (
        f"{verdict}: the best point ({best.label}, {best.mean:.2f} %) and the worst ({worst.label}, "
        f"{worst.mean:.2f} %) differ by {best.mean - worst.mean:.2f} points; their mean ± {INTERVAL_SE} SE intervals "
        f"[{high[0]:.2f}, {high[1]:.2f}] and [{low[0]:.2f}, {low[1]:.2f}] {'do not overlap' if larger else 'overlap'} "
        f"(pooled seed std {pooled:.2f} points)."
    )


# ----------------------------------------------------------------------------- the figure and the page


def axis_figure(axis: Axis) -> Any:
    """Test top-1 against the axis as the paper plots its ablations: per line the mean with ± std error bars,
    and every seed as a dot. Points without a finished seed are left out."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.add_subplot()
    numeric = is_numeric(axis)
    x_values = list(dict.fromkeys(axis.x_value(point) for point in axis.points if point.n))
    position = {v: (parse_value(v) if numeric else i) for i, v in enumerate(x_values)}
    lines = axis.lines()
    for number, (label, points) in enumerate(lines.items()):
        measured = [point for point in points if point.n]
        if not measured:
            continue
        shift = 0.0 if numeric else 0.08 * (number - (len(lines) - 1) / 2)  # categories: lines side by side
        xs = [position[axis.x_value(point)] + shift for point in measured]
        bars = ax.errorbar(
            xs,
            [point.mean for point in measured],
            yerr=[point.std for point in measured],
            marker="o",
            linestyle="-" if numeric else "none",
            capsize=4,
            label=label or None,
        )
        colour = bars.lines[0].get_color()
        dots = [(x, value) for x, point in zip(xs, measured, strict=True) for value in point.top1]
        ax.scatter(*zip(*dots, strict=True), s=14, color=colour, alpha=0.55, zorder=3)
    positions = [float(x) for x in position.values()]
    if numeric and min(positions) > 0 and max(positions) / min(positions) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(position.values()), x_values)
    ax.set_xlabel(short_key(axis.axis, axis.keys) if axis.axis else "")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{axis.name}: mean ± std over seeds, dots = seeds", fontsize="medium")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    return figure


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "axis"


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def parameters(point: Point) -> str:
    counts = sorted({job.num_parameters for job in point.seeds if job.num_parameters is not None})
    return "–" if not counts else f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"


def axis_table(axis: Axis) -> list[str]:
    headers = [short_key(key, axis.keys) for key in axis.keys] + ["top-1 (%)", "seeds", "parameters", "time / run"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for point in axis.points:
        failed = sum(job.status == "failed" for job in point.left_out)
        unfinished = len(point.left_out) - failed
        n = (
            str(point.n)
            + (f" ({failed} failed)" if failed else "")
            + (f" ({unfinished} unfinished)" if unfinished else "")
        )
        top1 = f"{point.mean:.2f}" + (f" ± {point.std:.2f}" if point.n > 1 else "") if point.n else "–"  # no std of one
        times = [job.train_seconds for job in point.seeds if job.train_seconds is not None]
        time = seconds(statistics.fmean(times) if times else None)
        lines.append("| " + " | ".join([*point.values, top1, n, parameters(point), time]) + " |")
    return lines


def left_out_table(axis: Axis) -> list[str]:
    jobs = [job for point in axis.points for job in point.left_out]
    if not jobs:
        return []
    lines = ["Not averaged in:", "", "| sweep | job | overrides | status | error |", "|---|---|---|---|---|"]
    for job in jobs:
        error = job.error.replace("|", "\\|") or "–"
        lines.append(f"| `{job.sweep}` | {job.job} | `{job.overrides}` | {job.status} | {error} |")
    return [*lines, ""]


def sweep_line(record: SweepRecord, program: str) -> str:
    counts = ", ".join(f"{record.count(s)} {s}" for s in ("finished", "failed", "incomplete"))
    ran = f"`{program} {shlex.join(record.overrides)}`" if record.overrides is not None else "no recorded command"
    run = record.summary_run
    if not run:
        where = "no W&B summary run recorded"
    elif run.get("url"):
        where = f"W&B summary run [{run['run_id']}]({run['url']}) in group `{run.get('group')}`"
    else:
        where = f"W&B summary run `{run['run_id']}` ({run.get('mode')}: `wandb sync` uploads it)"
        where += f" in group `{run.get('group')}`"
    return f"- `{record.label}` ({counts}): {ran}; {where}"


def point_label(axis: Axis, job: JobResult) -> str:
    return ",".join(f"{short_key(k, axis.keys)}={v}" for k, v in zip(axis.keys, job.point, strict=True))


def axis_section(axis: Axis, figure: str | None, paper: str | None, finding: str | None, program: str) -> list[str]:
    settings = " ".join(axis.fixed) or "the defaults"
    lines = [f"## {axis.name}", "", f"x axis `{axis.axis or '-'}`; other settings: `{settings}`.", ""]
    if paper:
        lines += [f"**The paper:** {paper}", ""]
    if finding:
        lines += [f"**This reproduction:** {finding}", ""]
    lines += [*axis_table(axis), ""]
    if figure:
        lines += [f"![{axis.name}: test top-1, mean ± std over seeds, every seed a dot]({figure})", ""]
    lines.append("**Points against seeds:**" + ("" if len(axis.lines()) > 1 else f" {spread_statement(axis.points)}"))
    if len(axis.lines()) > 1:
        lines += [""] + [f"- {label}: {spread_statement(points)}" for label, points in axis.lines().items()]
    lines.append("")
    lines += left_out_table(axis)
    for replaced, kept in axis.repeated:
        lines.append(
            f"Seed {kept.seed} of {point_label(axis, kept)} ran twice: job {replaced.job} of `{replaced.sweep}` "
            f"({replaced.top1:.2f} %) is replaced by job {kept.job} of `{kept.sweep}` ({kept.top1:.2f} %)."
        )
    if axis.repeated:
        lines.append("")
    lines += ["Sweeps:", "", *[sweep_line(record, program) for record in axis.sweeps], ""]
    return lines


def page_text(
    axes: Sequence[Axis],
    figures: dict[str, str],
    papers: dict[str, str],
    findings: dict[str, str],
    program: str,
    command: str,
) -> str:
    lines = [
        "# Ablation results",
        "",
        f"Made by `{command}` from the sweeps' summary files ({', '.join(SUMMARY_FILES)}).",
        "Top-1 is test accuracy in %, mean ± sample standard deviation (n − 1) over seeds; seeds counts the finished "
        "runs averaged; time / run is the mean training time (`train_seconds`). Failed and unfinished jobs are listed, "
        "not averaged in.",
        "",
        f"**Spread criterion.** {SPREAD_CRITERION}",
        "",
    ]
    for axis in axes:
        name = axis.sweeps[0].ablation or ""
        lines += axis_section(axis, figures.get(axis.name), papers.get(name), findings.get(name), program)
    return "\n".join(lines).rstrip() + "\n"


def paper_findings(conf_dir: Path) -> dict[str, str]:
    """Each named grid's `ablation.paper`: what the paper found on that axis, printed beside the result."""
    findings = {}
    for path in sorted((Path(conf_dir) / "ablation").glob("*.yaml")):
        ablation = (yaml.safe_load(path.read_text()) or {}).get("ablation") or {}
        if ablation.get("paper"):
            findings[path.stem] = str(ablation["paper"])
    return findings


def read_findings(path: Path | None, ablations: Sequence[str]) -> dict[str, str]:
    """What the reproduction finds per ablation, in the author's words (a YAML mapping of ablation name to text),
    set beside the paper's finding; a name that no given sweep ran is refused, as a likely typo."""
    if path is None:
        return {}
    try:
        findings = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SweepError(f"cannot read the findings file {path}: {error}") from error
    if not isinstance(findings, dict) or not all(isinstance(text, str) for text in findings.values()):
        raise SweepError(f"{path} must map ablation names to text, e.g. `num_latents: More latents ...`")
    unknown = sorted(set(findings) - set(ablations))
    if unknown:
        raise SweepError(f"{path} names {', '.join(unknown)}, which none of the sweeps ran: {', '.join(ablations)}")
    return findings


def write_page(
    directories: Sequence[str], page: Path, conf_dir: Path, program: str, findings: Path | None = None
) -> int:
    """The page of the sweeps in `directories` and one figure per axis beside it (PAGE-STEM_AXIS.png). `program`
    is the sweep command that called (`python sweep.py`): the page names it with the sweeps' own command lines.
    `findings` (YAML, ablation name -> text) adds what the reproduction finds beside each axis' paper finding."""
    if not directories:
        raise SweepError(f"usage: {program} report SWEEP_DIR [SWEEP_DIR ...] [--out PAGE.md] [--findings FILE]")
    records = [read_sweep(Path(directory), program) for directory in directories]
    notes = read_findings(findings, sorted({record.ablation for record in records if record.ablation}))
    axes = group_axes(records)
    options = ["--out", str(page), *(["--findings", str(findings)] if findings else [])]
    command = f"{program} report {shlex.join([*directories, *options])}"
    page.parent.mkdir(parents=True, exist_ok=True)
    figures, written = {}, []
    for axis in axes:
        path = page.with_name(f"{page.stem}_{slug(axis.name)}.png")
        axis_figure(axis).savefig(path, dpi=120)
        figures[axis.name] = path.name
        written.append(path)
    page.write_text(page_text(axes, figures, paper_findings(conf_dir), notes, program, command))
    print("\n".join(f"wrote {path}" for path in [page, *written]))
    return 0
