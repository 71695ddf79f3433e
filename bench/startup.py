"""What a run spends before its first training step, stage by stage: `python -m bench startup [train.py overrides]`.

Runs `train.py`'s own `main` in this process with a timer around each stage: the interpreter's start, the imports,
Hydra (composing the config, the run directory, logging), the parts (`build_parts`: the data source's folder scan,
the model, the augmentation, the optimizer, the scheduler), the FLOP count and matmul-peak timing, the data
(decoding, caches, statistics), the loaders, the W&B start, and the fit loop up to the model's first forward pass.
There it stops the run and prints the table with the command. Each stage's imports count in that stage.

    python -m bench startup data=imagefolder data.source.path=DIR logger.mode=offline

The stages are found by name in perceiver.experiment (build_parts, load_data, ...): a renamed one fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

START = time.perf_counter()


def process_age() -> float:
    """Seconds since this process was created (Linux /proc); 0 where unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class FirstStep(BaseException):
    """Raised at the first training forward pass: the run stops there (not an Exception, so nothing catches it)."""


class Stages:
    """Exclusive wall time per named stage (a stage's time without the stages inside it), in order of first run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start, time spent in inner stages]
        self.first_step: float | None = None

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timed(self, name: str | Callable[..., str], function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.stack.append([name(*args) if callable(name) else name, time.perf_counter(), 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                label, start, inner = self.stack.pop()
                elapsed = (self.first_step or time.perf_counter()) - start
                self.add(label, elapsed - inner)
                if self.stack:
                    self.stack[-1][2] += elapsed

        return wrapper


def instrument(stages: Stages) -> None:
    """Wrap the stages of a run where perceiver.experiment.run and .build look them up."""
    from perceiver.experiment import build, run

    build.build = stages.timed(lambda group, *_: f"build_parts: {group}", build.build)
    for name in ("build_parts", "with_measured_peak", "load_data", "make_loaders"):
        setattr(run, name, stages.timed(name, getattr(run, name)))
    run.start_tracker = stages.timed("W&B start (logger)", run.start_tracker)
    fit = run.fit

    def fit_until_first_step(parts, *args, **kwargs):
        def stop(*_):
            stages.first_step = time.perf_counter()
            raise FirstStep

        parts.model.register_forward_pre_hook(stop)
        return fit(parts, *args, **kwargs)

    run.fit = stages.timed("fit: set-up until the first forward pass", fit_until_first_step)


def report(stages: Stages, total: float, command: str) -> str:
    rows = {**stages.seconds, "the rest (Run set-up, config checks, ...)": total - sum(stages.seconds.values())}
    lines = [f"command: `{command}`", "", "| stage | seconds | share |", "|---|---|---|"]
    # milliseconds: rows rounded to 0.01 s could miss their total by 0.005 s each (tests/e2e/test_startup.py sums them)
    lines += [f"| {name} | {seconds:.3f} | {100 * seconds / total:.0f}% |" for name, seconds in rows.items()]
    lines.append(f"| **until the first training step** | **{total:.3f}** | 100% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    stages = Stages()
    before_script = process_age() - (time.perf_counter() - START)
    stages.add("interpreter start", before_script)
    mark = START
    import torch  # noqa: F401 - timed on its own: every run pays it

    stages.add("import torch", time.perf_counter() - mark)
    mark = time.perf_counter()
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401

    stages.add("import hydra, omegaconf", time.perf_counter() - mark)
    mark = time.perf_counter()
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    import train

    stages.add("import train.py and perceiver", time.perf_counter() - mark)
    instrument(stages)
    from perceiver.experiment import run

    hydra_started = time.perf_counter()

    def train_after_hydra(cfg):
        stages.add("Hydra: compose, run dir, logging", time.perf_counter() - hydra_started)
        return run.train(cfg)

    train.train = train_after_hydra
    sys.argv = [str(repo / "train.py"), *overrides]
    with contextlib.suppress(FirstStep):
        train.cli.run_hydra_app(train.main)
    if stages.first_step is None:
        raise SystemExit("the run ended before its first training step (trainer.epochs=0? a finished run?)")
    total = before_script + stages.first_step - START
    print(report(stages, total, " ".join(["python -m bench startup", *overrides])))


if __name__ == "__main__":
    main()
