"""`sweep.py report`: the results page of finished sweeps, from their summary files only. Its table against a
recomputation from the jobs' own metrics.json, its figure, the spread statement on both sides of its criterion,
merged sweeps, failed jobs, the W&B summary run, and bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from PIL import Image

import sweep
from perceiver.experiment.results import axis_figure, group_axes, read_sweep, spread_statement
from perceiver.experiment.summary import report
from tests.helpers import job_dirs, offline_runs, run_script
from tests.helpers.runs import isolated

TINY = [
    "experiment=cpu_smoke",
    "logger=none",
    "trainer.epochs=2",
    "data.source.num_train=600",
    "trainer.save_checkpoints=false",
    "trainer.attention_images=0",
]
SUMMARY_FILES = ("jobs.csv", "sweep.json", "summary.csv", "summary.md", "top1.png")  # what would be committed


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-point x 2-seed num_latents sweep through sweep.py, whose third point (latent_dim=-4) fails."""
    root = tmp_path_factory.mktemp("real_sweep")
    sweep_dir = root / "num_latents_sweep"
    with isolated(root):
        result = run_script(
            "sweep.py",
            "ablation=num_latents",
            "model.latent_dim=8,16,-4",
            "seed=0,1",
            *TINY,
            f"hydra.sweep.dir={sweep_dir}",
            timeout=1200,  # a safety net only: six tiny jobs, but on a machine that may be busy
        )
    assert result.returncode != 0, "a sweep with failed jobs must not exit 0"
    assert [p.name for p in job_dirs(sweep_dir)] == ["0", "1", "2", "3", "4", "5"], result.stderr[-3000:]
    return sweep_dir


def table_rows(page: str, first_header: str) -> list[list[str]]:
    """The cells of the markdown table whose header starts with `first_header`."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def make_report(tmp_path: Path, *directories: Path, name: str = "results.md") -> str:
    page = tmp_path / "page" / name
    assert sweep.main(["report", *map(str, directories), "--out", str(page)]) == 0
    return page.read_text()


@pytest.mark.slow
def test_the_page_of_a_real_sweep_matches_a_recomputation_from_its_jobs(real_sweep: Path, tmp_path: Path) -> None:
    # Only the committed summary files: no job directories, no checkpoints.
    committed = tmp_path / "docs" / real_sweep.name
    committed.mkdir(parents=True)
    for name in SUMMARY_FILES:
        shutil.copy(real_sweep / name, committed / name)
    page = make_report(tmp_path, committed)

    metrics = {}
    for job in job_dirs(real_sweep):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        if (job / "metrics.json").is_file():
            metrics[job.name] = (overrides, json.loads((job / "metrics.json").read_text()))
    assert len(metrics) == 4
    rows = {row[0]: row for row in table_rows(page, "latent_dim")}
    assert list(rows) == ["-4", "8", "16"]
    for latent_dim in ("8", "16"):
        members = [m for overrides, m in metrics.values() if f"model.latent_dim={latent_dim}" in overrides]
        top1 = [100 * m["test"]["top1"] for m in members]
        seconds = statistics.mean(m["train_seconds"] for m in members)
        assert rows[latent_dim] == [
            latent_dim,
            f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f}",
            "2",
            f"{members[0]['num_parameters']:,}",
            f"{seconds:.1f} s",
        ]
    assert rows["-4"] == ["-4", "–", "0 (2 failed)", "–", "–"]

    failed = table_rows(page, "sweep")
    assert [row[1] for row in failed] == ["4", "5"]
    for row in failed:
        assert "model.latent_dim=-4" in row[2] and row[3] == "failed"
        assert "model.latent_dim=-4 is invalid" in row[4]

    recorded = yaml.safe_load((real_sweep / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
    assert f"`python sweep.py {' '.join(recorded)}`" in page  # the sweep's own command line, which runs it again
    assert f"`python sweep.py report {committed} --out {tmp_path / 'page' / 'results.md'}`" in page
    assert "(4 finished, 2 failed, 0 incomplete)" in page and "no W&B summary run recorded" in page
    assert "**The paper:** On ImageNet more latents are better" in page
    assert "**Points against seeds:**" in page and "mean ± 2 standard errors" in page

    figure = tmp_path / "page" / "results_num_latents.png"
    assert "](results_num_latents.png)" in page
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.size == (768, 504)  # 6.4 x 4.2 in at 120 dpi


@pytest.mark.slow
def test_the_figure_has_one_error_bar_per_point_and_a_dot_per_seed(real_sweep: Path) -> None:
    (axis,) = group_axes([read_sweep(real_sweep, "python sweep.py")])
    ax = axis_figure(axis).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    xs, means = bars.lines[0].get_data()
    assert list(xs) == [8, 16]  # the failed point has no bar
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in dots) == 4
    seeds = [
        (
            int(overrides_of(job)["model.latent_dim"]),
            100 * json.loads((job / "metrics.json").read_text())["test"]["top1"],
        )
        for job in job_dirs(real_sweep)
        if (job / "metrics.json").is_file()
    ]
    drawn = sorted(tuple(o) for c in dots for o in c.get_offsets())
    assert [x for x, _ in drawn] == [x for x, _ in sorted(seeds)]
    assert [t for _, t in drawn] == pytest.approx([t for _, t in sorted(seeds)])
    assert list(means) == pytest.approx([statistics.mean(t for x, t in seeds if x == point) for point in (8, 16)])


def overrides_of(job: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


@pytest.mark.slow
def test_the_sweeps_wandb_summary_run_is_recorded_and_kept(real_sweep: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / real_sweep.name
    shutil.copytree(real_sweep, sweep_dir)
    logger = {"_target_": "perceiver.experiment.tracking.WandbTracker", "_partial_": True, "mode": "offline"}
    assert report(sweep_dir, use_wandb=True, logger=logger) == 1  # not every job finished
    (summary_run,) = offline_runs(sweep_dir)
    recorded = json.loads((sweep_dir / "sweep.json").read_text())["wandb_summary_run"]
    assert recorded == {"run_id": summary_run.run_id, "mode": "offline", "url": None, "group": sweep_dir.name}
    assert sweep.main(["summarize", str(sweep_dir), "--no-wandb"]) == 1  # makes no run: the recorded one stays
    assert json.loads((sweep_dir / "sweep.json").read_text())["wandb_summary_run"] == recorded
    page = make_report(tmp_path, sweep_dir)
    assert f"W&B summary run `{summary_run.run_id}` (offline" in page and f"in group `{sweep_dir.name}`" in page


# --- made job by job, summarised by the real summary code ------------------------------------------------


def write_sweep(
    sweep_dir: Path, points: dict[str, Sequence[float]], key: str = "model.latent_dim", settings: Sequence[str] = ()
) -> Path:
    """A sweep directory as train.py --multirun leaves it (multirun.yaml, job dirs with overrides.yaml and
    metrics.json; top-1 given in %), then summarised by `sweep.py summarize`. Seeds count from 0 per point."""
    values = ",".join(points)
    task = ["ablation=num_latents", *settings, f"{key}={values}", "seed=0,1,2"]
    recorded = {
        "ablation": {"name": "num_latents", "axis": key},
        "hydra": {"overrides": {"task": task, "hydra": []}, "sweeper": {"params": None}},
    }
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(recorded))
    number = 0
    for value, top1 in points.items():
        for seed, accuracy in enumerate(top1):
            job = sweep_dir / str(number)
            (job / ".hydra").mkdir(parents=True)
            overrides = [*settings, f"{key}={value}", f"seed={seed}"]
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            test = {"top1": accuracy / 100, "top5": 1.0, "loss": 1.0}
            metrics = {"test": test, "images_per_second": 10.0, "num_parameters": 1000, "train_seconds": 60.0 + seed}
            (job / "metrics.json").write_text(json.dumps({**metrics, "overrides": overrides}))
            number += 1
    assert sweep.main(["summarize", str(sweep_dir), "--no-wandb"]) == 0
    return sweep_dir


def statement(tmp_path: Path, points: dict[str, Sequence[float]]) -> str:
    (axis,) = group_axes([read_sweep(write_sweep(tmp_path / "sweep", points), "python sweep.py")])
    return spread_statement(axis.points)


@pytest.mark.parametrize(
    ("difference", "larger"),
    [(20.0, True), (2.4, True), (2.2, False), (0.5, False)],
)
def test_the_spread_statement_flips_where_the_two_standard_error_intervals_meet(
    tmp_path: Path, difference: float, larger: bool
) -> None:
    """Seeds m-1, m, m+1 at both points: pooled std 1, so the mean ± 2 SE intervals (half-width 2/sqrt(3) =
    1.155) touch at a difference of 2.309."""
    text = statement(
        tmp_path, {"32": [49.0, 50.0, 51.0], "64": [49.0 + difference, 50.0 + difference, 51.0 + difference]}
    )
    half = 2 / math.sqrt(3)
    assert text.startswith("**larger" if larger else "**not larger"), text
    assert f"differ by {difference:.2f} points" in text and "pooled seed std 1.00 points" in text
    assert (
        f"[{50 + difference - half:.2f}, {50 + difference + half:.2f}] and [{50 - half:.2f}, {50 + half:.2f}]" in text
    )


def test_points_far_apart_in_mean_but_with_wide_seeds_are_within_the_spread(tmp_path: Path) -> None:
    assert statement(tmp_path, {"32": [40.0, 50.0, 60.0], "64": [45.0, 55.0, 65.0]}).startswith("**not larger")


def test_a_single_seed_per_point_cannot_be_judged(tmp_path: Path) -> None:
    assert statement(tmp_path, {"32": [40.0], "64": [45.0]}).startswith("cannot tell")


def test_sweeps_of_one_grid_merge_and_other_settings_make_another_axis(tmp_path: Path) -> None:
    first = write_sweep(tmp_path / "first", {"32": [50.0, 52.0], "64": [60.0, 61.0]})
    second = write_sweep(tmp_path / "second", {"32": [54.0, 56.0, 51.0]})  # seeds 0 and 1 again, and seed 2
    other = write_sweep(tmp_path / "other", {"32": [10.0], "64": [20.0]}, settings=["trainer.epochs=1"])
    page = make_report(tmp_path, first, second, other)

    assert page.count("\n## num_latents") == 2
    merged, separate = page.split("\n## num_latents")[1:]
    rows = {row[0]: row for row in table_rows(merged, "latent_dim")}
    seeds = [54.0, 56.0, 51.0]  # the later sweep's seeds 0 and 1 replace the first's
    assert rows["32"][1:3] == [f"{statistics.mean(seeds):.2f} ± {statistics.stdev(seeds):.2f}", "3"]
    assert rows["64"][1:3] == [f"{statistics.mean([60.0, 61.0]):.2f} ± {statistics.stdev([60.0, 61.0]):.2f}", "2"]
    assert rows["32"][4] == f"{statistics.mean([60.0, 61.0, 62.0]):.1f} s"
    assert len(re.findall(r"Seed \d of latent_dim=32 ran twice", merged)) == 2
    assert f"`{first}` (4 finished" in merged and f"`{second}` (3 finished" in merged and str(other) not in merged
    assert merged.startswith(" (defaults)") and separate.startswith(" (trainer.epochs=1)")
    assert "cannot tell" in separate
    assert (tmp_path / "page" / "results_num_latents_trainer_epochs_1.png").is_file()


def test_settings_no_result_depends_on_do_not_split_an_axis(tmp_path: Path) -> None:
    first = write_sweep(tmp_path / "first", {"32": [50.0, 52.0]})
    quiet = ["trainer.progress_bar=false", "trainer.log_every_n_steps=10", "logger.mode=offline"]
    second = write_sweep(tmp_path / "second", {"64": [60.0, 61.0]}, settings=quiet)
    page = make_report(tmp_path, first, second)
    assert page.count("\n## num_latents") == 1
    assert [row[0] for row in table_rows(page, "latent_dim")] == ["32", "64"]


def test_a_point_of_one_seed_shows_its_accuracy_without_a_spread(tmp_path: Path) -> None:
    page = make_report(tmp_path, write_sweep(tmp_path / "one", {"32": [81.63], "64": [84.26, 84.0]}))
    rows = {row[0]: row for row in table_rows(page, "latent_dim")}
    assert rows["32"][1:3] == ["81.63", "1"]  # one seed has no standard deviation (not ± 0.00)
    assert rows["64"][1:3] == [f"{statistics.mean([84.26, 84.0]):.2f} ± {statistics.stdev([84.26, 84.0]):.2f}", "2"]


def test_an_axis_with_two_swept_keys_has_a_line_and_a_statement_per_other_value(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "permutation"
    write_sweep(sweep_dir, {"false": [80.0, 81.0, 82.0], "true": [80.5, 81.5, 79.5]}, key="model.permute_inputs")
    for job in job_dirs(sweep_dir):  # the same jobs as a ViT, whose permuted inputs fall far behind
        vit = sweep_dir / str(int(job.name) + 6)
        shutil.copytree(job, vit)
        overrides = yaml.safe_load((vit / ".hydra" / "overrides.yaml").read_text())
        (vit / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=vit", *overrides]))
        metrics = json.loads((vit / "metrics.json").read_text())
        metrics["test"]["top1"] -= 0.3 if "model.permute_inputs=true" in overrides else 0.0
        (vit / "metrics.json").write_text(json.dumps(metrics))
    for job in job_dirs(sweep_dir)[:6]:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=perceiver", *overrides]))
    mlp = sweep_dir / "12"  # a line whose only job failed: listed, not drawn
    (mlp / ".hydra").mkdir(parents=True)
    (mlp / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["model=mlp", "model.permute_inputs=false", "seed=0"])
    )
    (mlp / "error.txt").write_text("Traceback ...\nConfigError: no model mlp\n")
    recorded = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    recorded["hydra"]["overrides"]["task"].insert(1, "model=perceiver,vit,mlp")
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(recorded))
    assert sweep.main(["summarize", str(sweep_dir), "--no-wandb"]) == 1  # the mlp job failed

    (axis,) = group_axes([read_sweep(sweep_dir, "python sweep.py")])
    ax = axis_figure(axis).axes[0]
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 2
    assert sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)) == 12
    page = make_report(tmp_path, sweep_dir)
    assert "- model=perceiver: **not larger than the seed-to-seed spread**" in page
    assert "- model=vit: **larger than the seed-to-seed spread**" in page
    assert "- model=mlp: fewer than two points have finished seeds" in page
    assert "| 12 | `model=mlp model.permute_inputs=false seed=0` | failed | ConfigError: no model mlp |" in page


def test_findings_stand_beside_the_papers_and_a_typo_in_their_names_is_refused(
    real_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    findings = tmp_path / "findings.yaml"
    findings.write_text("num_latents: Eight and sixteen latents are within the seeds' spread.\n")
    page_path = tmp_path / "page.md"
    assert sweep.main(["report", str(real_sweep), "--out", str(page_path), "--findings", str(findings)]) == 0
    page = page_path.read_text()
    paper = page.index("**The paper:** On ImageNet more latents")
    ours = page.index("**This reproduction:** Eight and sixteen latents are within the seeds' spread.")
    assert paper < ours < page.index("| latent_dim |")
    assert f"--out {page_path} --findings {findings}`" in page  # the command that made the page, in full

    findings.write_text("num_latent: a typo\n")
    capsys.readouterr()
    assert (
        sweep.main(["report", str(real_sweep), "--out", str(tmp_path / "other.md"), "--findings", str(findings)]) == 2
    )
    error = capsys.readouterr().err
    assert "names num_latent, which none of the sweeps ran: num_latents" in error and error.count("\n") == 1
    assert not (tmp_path / "other.md").exists()


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: [], "usage: python sweep.py report SWEEP_DIR"),
        (lambda tmp: [tmp / "nowhere"], "is not a directory"),
        (lambda tmp: [tmp], "is not a sweep directory"),
        (lambda tmp: [unsummarised(tmp)], "lacks jobs.csv, sweep.json: write them with `python sweep.py summarize"),
        (lambda tmp: [nothing_finished(tmp)], "has no finished job (2 failed, 0 incomplete): resume it with"),
    ],
    ids=["no-dir", "missing", "not-a-sweep", "not-summarised", "nothing-finished"],
)
def test_bad_input_is_one_line_that_says_what_to_do(
    make, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directories = make(tmp_path)
    capsys.readouterr()
    assert sweep.main(["report", *map(str, directories), "--out", str(tmp_path / "page.md")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "page.md").exists()


def unsummarised(tmp: Path) -> Path:
    (tmp / "sweep" / "0" / ".hydra").mkdir(parents=True)
    (tmp / "sweep" / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    return tmp / "sweep"


def nothing_finished(tmp: Path) -> Path:
    sweep_dir = tmp / "sweep"
    for number in (0, 1):
        (sweep_dir / str(number) / ".hydra").mkdir(parents=True)
        (sweep_dir / str(number) / ".hydra" / "overrides.yaml").write_text(f"- model.latent_dim=-4\n- seed={number}\n")
        (sweep_dir / str(number) / "error.txt").write_text(
            "Traceback ...\nConfigError: model.latent_dim=-4 is invalid\n"
        )
    assert sweep.main(["summarize", str(sweep_dir), "--no-wandb"]) == 1
    return sweep_dir
