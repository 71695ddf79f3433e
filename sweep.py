"""Run a named ablation grid and summarise it: tables, a plot and a W&B summary run in the sweep's group.

    python sweep.py ablation=num_latents seed=0,1,2 [overrides...]   run the grid (Hydra --multirun), summarise
    python sweep.py ablation=num_latents --wandb-sweep                write (and create) a native W&B sweep
    python sweep.py resume DIR                                        run the jobs of DIR that did not finish
    python sweep.py summarize DIR                                     summarise DIR again
    python sweep.py list                                              the named grids (conf/ablation/)

The grid runs through train.py's own Hydra multirun (any launcher: `hydra/launcher=joblib` runs jobs in
parallel); a job whose directory already holds its metrics.json is skipped, which is what makes resuming work.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from perceiver.summary import Summary, log_to_wandb, markdown_table, summarize, write_summary
from perceiver.sweeps import grid_arguments, wandb_sweep_config
from perceiver.tracking import WandbTracker, has_wandb_credentials

CONF = Path(__file__).resolve().parent / "conf"
COMMANDS = ("resume", "summarize", "list")
log = logging.getLogger("sweep")


class SweepError(Exception):
    """A bad command line or sweep directory: one message, no traceback."""


def ablations() -> dict[str, str]:
    """Named grids and the one-line comment that says what each reproduces."""
    named = {}
    for path in sorted((CONF / "ablation").glob("*.yaml")):
        comments = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("# ")]
        named[path.stem] = next((c for c in comments if not c.startswith("@package")), "")
    return named


def compose_sweep(overrides: Sequence[str]) -> DictConfig:
    """The sweep's config with its Hydra node, composed from the non-sweep overrides (fails fast on typos)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=fixed, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        hint = f"; named grids: {', '.join(ablations())}" if "ablation" in str(error) else ""
        raise SweepError(f"{error}{hint}") from error


@contextlib.contextmanager
def argv(arguments: Sequence[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = [str(Path(__file__).with_name("train.py")), *arguments]
    try:
        yield
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()


def run_multirun(overrides: Sequence[str], sweep_dir: Path) -> int:
    """train.py's Hydra multirun in this process; returns its exit code (non-zero when a job failed)."""
    import train

    with argv(["--multirun", *overrides, f"hydra.sweep.dir={sweep_dir}"]):
        try:
            train.main()
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 1
    return 0


def tracker_factory(summary: Summary) -> Any:
    """The sweep's own logger settings (mode, project, entity) for the summary run."""
    logger = summary.settings.get("logger")
    if logger is None:
        return lambda **kwargs: WandbTracker(mode="auto", **kwargs)
    return instantiate(OmegaConf.create(logger))


def report(sweep_dir: Path, use_wandb: bool = True) -> int:
    """Write the tables and the plot, print the table, log the W&B summary run; 1 if any job is not finished."""
    try:
        summary = summarize(sweep_dir)
    except FileNotFoundError as error:
        raise SweepError(str(error)) from error
    files = write_summary(summary)
    print(markdown_table(summary) if summary.rows else "no finished jobs")
    statuses = [job.status for job in summary.jobs]
    counts = {status: statuses.count(status) for status in ("finished", "failed", "incomplete")}
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f" of {len(summary.jobs)} jobs")
    for name, path in files.items():
        print(f"{name}: {path}")
    if use_wandb:
        run_id = log_to_wandb(summary, files, tracker_factory(summary))
        if run_id:
            print(f"W&B summary run {run_id} in group {summary.sweep_dir.name}")
    if any(sweep_dir.glob("**/wandb/offline-run-*")):
        runs = f"{sweep_dir}/*/wandb/offline-run-* {sweep_dir}/wandb/offline-run-*"
        print(f"offline W&B runs: upload them all with `wandb sync {runs}`")
    for job in summary.jobs:
        if job.status == "failed":
            print(f"job {job.number} failed: {job.error} (see {job.directory / 'error.txt'})")
    return 0 if counts["finished"] == len(summary.jobs) else 1


def run_grid(overrides: Sequence[str], use_wandb: bool) -> int:
    config = compose_sweep(overrides)
    sweep_dir = Path(config.hydra.sweep.dir)
    if not config.ablation.name:
        log.warning("no ablation=NAME given: running the command line's own grid (named grids: sweep.py list)")
    print(f"sweep dir: {sweep_dir}  (resume with: python sweep.py resume {sweep_dir})", flush=True)
    code = run_multirun([o for o in overrides if not o.startswith("hydra.sweep.dir=")], sweep_dir)
    return max(code, report(sweep_dir, use_wandb))


def resume(sweep_dir: Path, use_wandb: bool) -> int:
    """Replay the sweep's recorded command line in its directory; finished jobs are skipped by train.py."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise SweepError(f"{path} not found: resume needs a sweep directory made by train.py --multirun or sweep.py")
    recorded = OmegaConf.load(path).hydra.overrides
    launcher = [o for o in recorded.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    code = run_multirun([*recorded.task, *launcher, "skip_finished=true"], sweep_dir)
    return max(code, report(sweep_dir, use_wandb))


def write_wandb_sweep(overrides: Sequence[str]) -> int:
    """A native W&B grid sweep over the same grid; created on the server when credentials exist."""
    config = compose_sweep(overrides)
    arguments = grid_arguments(config.hydra.sweeper.get("params"), overrides)
    name = config.ablation.name or "sweep"
    sweep = wandb_sweep_config(arguments, name=name, project=config.logger.get("project"))
    out = Path(config.hydra.sweep.dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "wandb_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    print(f"W&B sweep config: {path}")
    if not has_wandb_credentials():
        print(f"no W&B credentials: create it later with `wandb sweep {path}`, then run `wandb agent SWEEP_ID`")
        return 0
    import wandb

    sweep_id = wandb.sweep(sweep, project=config.logger.get("project"), entity=config.logger.get("entity"))
    print(f"created W&B sweep {sweep_id}: run agents with `wandb agent {sweep_id}`")
    return 0


def parse_arguments(args: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("words", nargs="*", metavar="overrides | resume DIR | summarize DIR | list")
    parser.add_argument("--wandb-sweep", action="store_true", help="write a native W&B sweep config instead of running")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the summary run to W&B")
    return parser.parse_args(args)


def dispatch(options: argparse.Namespace) -> int:
    words, use_wandb = options.words, not options.no_wandb
    command = words[0] if words and words[0] in COMMANDS else None
    if command == "list":
        for name, comment in ablations().items():
            print(f"{name:24s} {comment}")
        return 0
    if command in ("resume", "summarize"):
        if len(words) != 2:
            raise SweepError(f"usage: python sweep.py {command} SWEEP_DIR")
        sweep_dir = Path(words[1])
        if not sweep_dir.is_dir():
            raise SweepError(f"{sweep_dir} is not a directory: give the sweep directory that holds the job dirs")
        return resume(sweep_dir, use_wandb) if command == "resume" else report(sweep_dir, use_wandb)
    if options.wandb_sweep:
        return write_wandb_sweep(words)
    return run_grid(words, use_wandb)


def main(args: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        return dispatch(parse_arguments(args))
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
