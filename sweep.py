"""Run a named ablation grid and summarise it: tables, a plot and a W&B summary run in the sweep's group.

    python sweep.py ablation=num_latents seed=0,1,2 [overrides...]   run the grid (train.py --multirun)
    python sweep.py ablation=num_latents --wandb-sweep                write (and create) a native W&B sweep
    python sweep.py resume DIR                                        run the jobs of DIR that did not finish
    python sweep.py summarize DIR                                     summarise DIR again
    python sweep.py report DIR [DIR ...] [--out PAGE.md] [--findings F]  one results page from finished sweeps
    python sweep.py list                                              the named grids (conf/ablation/)

A grid is `python train.py --multirun` (any launcher); its summary callback writes the tables, plot and sweep.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from perceiver.experiment.config import ConfigError
from perceiver.experiment.results import write_page
from perceiver.experiment.summary import report
from perceiver.experiment.sweeps import SweepError, ablations, compose_sweep, recorded_command, write_wandb_sweep

TRAIN = Path(__file__).resolve().with_name("train.py")
CONF = TRAIN.with_name("conf")
COMMANDS = ("resume", "summarize", "list", "report")


def exec_multirun(overrides: Sequence[str], sweep_dir: Path, use_wandb: bool) -> None:
    """Become `python train.py --multirun ...`: the grid runs, and is stopped, as that one process."""
    print(f"sweep dir: {sweep_dir}  (resume with: python sweep.py resume {sweep_dir})", flush=True)
    no_wandb = [] if use_wandb else ["hydra.callbacks.sweep_summary.log_to_wandb=false"]
    arguments = ["--multirun", *overrides, f"hydra.sweep.dir={sweep_dir}", *no_wandb]
    os.execv(sys.executable, [sys.executable, str(TRAIN), *arguments])


def run_grid(overrides: Sequence[str], use_wandb: bool) -> None:
    config = compose_sweep(CONF, overrides)
    if not config.ablation.name:
        logging.warning("no ablation=NAME given: running the command line's own grid (named grids: sweep.py list)")
    own = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    exec_multirun(own, Path(config.hydra.sweep.dir), use_wandb)


def parse_arguments(args: Sequence[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__, formatter_class=formatter)
    parser.add_argument("words", nargs="*", metavar="overrides | resume DIR | summarize DIR | report DIR... | list")
    parser.add_argument("--wandb-sweep", action="store_true", help="write a native W&B sweep config instead of running")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the summary run to W&B")
    parser.add_argument("--out", default="results.md", help="report: the page to write (its figures go beside it)")
    parser.add_argument("--findings", type=Path, help="report: YAML, ablation name -> what this reproduction finds")
    return parser.parse_args(args)


def sweep_directory(words: Sequence[str]) -> Path:
    if len(words) != 2:
        raise SweepError(f"usage: python sweep.py {words[0]} SWEEP_DIR")
    if not (sweep_dir := Path(words[1])).is_dir():
        raise SweepError(f"{sweep_dir} is not a directory: give the sweep directory that holds the job dirs")
    return sweep_dir


def dispatch(options: argparse.Namespace) -> int:
    words, use_wandb = options.words, not options.no_wandb
    command = words[0] if words and words[0] in COMMANDS else None
    if command == "list":
        print("\n".join(f"{name:24s} {comment}" for name, comment in ablations(CONF).items()))
        return 0
    if command == "report":  # the page names this command, and the one that ran each sweep
        return write_page(words[1:], Path(options.out), CONF, "python sweep.py", options.findings)
    if command == "summarize":
        sweep_dir = sweep_directory(words)
        try:
            return report(sweep_dir, use_wandb)
        except (FileNotFoundError, ConfigError) as error:
            raise SweepError(str(error)) from error
    if command == "resume":
        sweep_dir = sweep_directory(words)
        exec_multirun([*recorded_command(sweep_dir), "skip_finished=true"], sweep_dir, use_wandb)
    if options.wandb_sweep:
        return write_wandb_sweep(CONF, words)
    run_grid(words, use_wandb)
    return 0


def main(args: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        return dispatch(parse_arguments(args))
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
