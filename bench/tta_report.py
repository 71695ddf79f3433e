"""The report of `python -m bench tta`: what a curve of (seconds, test top-1) says (time to an accuracy, the
accuracy at a budget, the speed-up against the reference peer), medians and ranges over rounds, the table and
the figure. Pure functions of the curves, tested against hand-made ones."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PEERS = {"a": "Keras example (Keras 3)", "b": "this project, the example's recipe", "c": "this project, fast recipe"}
REFERENCE = "a"  # whose best test top-1 within the budget is the target the others race to (the criterion)

Curve = Sequence[tuple[float, float]]  # (seconds since launch, test top-1) after each epoch, in time order


def time_to(curve: Curve, accuracy: float) -> float | None:
    """The first time the curve reaches `accuracy`; None when it never does."""
    return next((seconds for seconds, top1 in curve if top1 >= accuracy), None)


def accuracy_at(curve: Curve, seconds: float) -> float | None:
    """Test top-1 of the model a user holds at `seconds`: the last epoch ended by then; None before the first."""
    held = [top1 for at, top1 in curve if at <= seconds]
    return held[-1] if held else None


def best_so_far(val_losses: Sequence[float]) -> list[int | None]:
    """Per epoch, the index of the lowest validation loss up to it (the earliest on ties, as Keras' EarlyStopping
    and this project's compare with `<`); None while no loss was finite."""
    best: int | None = None
    chosen = []
    for index, loss in enumerate(val_losses):
        if math.isfinite(loss) and (best is None or loss < val_losses[best]):
            best = index
        chosen.append(best)
    return chosen


def speedup(reference: Curve, curve: Curve) -> float | None:
    """The reference's time to its best test top-1 over `curve`'s time to reach that top-1 (the issue's
    criterion: 10 or more); None when either never gets there."""
    if not reference:
        return None
    target = max(top1 for _, top1 in reference)
    mine = time_to(curve, target)
    return time_to(reference, target) / mine if mine is not None else None


@dataclass(frozen=True)
class Spread:
    """Median and range over the rounds that have a value (`count` of `rounds`)."""

    median: float
    low: float
    high: float
    count: int
    rounds: int

    def text(self, fmt: Callable[[float], str]) -> str:
        spread = f" ({fmt(self.low)}-{fmt(self.high)})" if self.count > 1 else ""
        missing = f", {self.count} of {self.rounds} rounds" if self.count < self.rounds else ""
        return f"{fmt(self.median)}{spread}{missing}"


def spread(values: Sequence[float | None]) -> Spread | None:
    """None when no round has a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(statistics.median(present), min(present), max(present), len(present), len(values))


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s"


def fmt_top1(top1: float) -> str:
    return f"{top1:.4f}"


def summary_table(rows: list[dict], at_minutes: Sequence[float], accuracies: Sequence[float]) -> str:
    """Peers as columns, a measure per line; each cell the median over rounds (range), or how many got there."""
    rounds = sorted({r["round"] for r in rows})
    curves = {(r["peer"], r["round"]): r["curve"] for r in rows}

    def line(
        name: str, measure: Callable[[Curve, Curve], float | None], fmt: Callable[[float], str], never: str
    ) -> str:
        cells = []
        for peer in PEERS:
            mine = [n for n in rounds if (peer, n) in curves]
            found = spread([measure(curves[(peer, n)], curves.get((REFERENCE, n), [])) for n in mine])
            cells.append(found.text(fmt) if found else never)
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = ["| | " + " | ".join(f"({key}) {label}" for key, label in PEERS.items()) + " |"]
    lines.append("|---" * (len(PEERS) + 1) + "|")
    lines.append("| rounds | " + " | ".join(str(sum((peer, n) in curves for n in rounds)) for peer in PEERS) + " |")
    lines.append(line("epochs within the budget", lambda c, a: len(c), lambda v: f"{v:g}", "0"))
    best = "best test top-1 within the budget"
    lines.append(line(best, lambda c, a: max((top1 for _, top1 in c), default=None), fmt_top1, "-"))
    for accuracy in accuracies:
        name = f"time to {100 * accuracy:g}% test top-1"
        lines.append(line(name, lambda c, a, target=accuracy: time_to(c, target), fmt_seconds, "not reached"))
    for minutes in at_minutes:
        name = f"test top-1 at {minutes:g} min"
        lines.append(line(name, lambda c, a, at=60 * minutes: accuracy_at(c, at), fmt_top1, "no epoch ended"))
    name = f"({REFERENCE})'s time to its best test top-1 / this peer's time to reach it"
    lines.append(line(name, lambda c, a: speedup(a, c), lambda v: f"{v:.2f}x", "not reached"))
    return "\n".join(lines)


def draw_curves(rows: list[dict], path: Path, title: str) -> None:
    """Test top-1 against minutes since launch, every round a thin line, a colour per peer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    for (peer, label), colour in zip(PEERS.items(), ("tab:red", "tab:blue", "tab:green"), strict=True):
        for index, row in enumerate(r for r in rows if r["peer"] == peer):
            minutes = [seconds / 60 for seconds, _ in row["curve"]]
            top1 = [accuracy for _, accuracy in row["curve"]]
            name = f"({peer}) {label}" if index == 0 else None
            axes.plot(minutes, top1, color=colour, linewidth=0.8, marker=".", markersize=4, label=name)
    axes.set_xlim(left=0)
    axes.set_xlabel("minutes since the process was launched (start-up included)")
    axes.set_ylabel("test top-1 (the best model so far by validation loss)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.savefig(path, dpi=120)


def report(rows: list[dict], budget_s: float, at_minutes: Sequence[float], accuracies: Sequence[float]) -> str:
    """summary.md: the table, each round's race to the reference's best, the commands."""
    table = summary_table(rows, [m for m in at_minutes if 60 * m <= budget_s], accuracies)
    lines = [f"# python -m bench tta: {len({r['round'] for r in rows})} round(s), {budget_s:g} s each", "", table]
    lines += ["", f"Per round, ({REFERENCE})'s best test top-1 within the budget and when each peer reached it:", ""]
    for round_ in sorted({r["round"] for r in rows}):
        curves = {r["peer"]: r["curve"] for r in rows if r["round"] == round_}
        if not curves.get(REFERENCE):
            lines.append(f"- round {round_}: ({REFERENCE}) ended no epoch within the budget")
            continue
        target = max(top1 for _, top1 in curves[REFERENCE])
        reached = "; ".join(
            f"({key}) {fmt_seconds(t) if (t := time_to(curves.get(key, []), target)) is not None else 'never'}"
            for key in curves
        )
        lines.append(f"- round {round_}: {fmt_top1(target)}: {reached}")
    lines += ["", "Commands (round 1; the runs of later rounds differ in their folder only):", ""]
    for r in rows:
        if r["round"] == 1:
            lines.append(f"- ({r['peer']}) `{r['command']}`")
            if r["evaluation_command"]:
                lines.append(f"  - its evaluation afterwards: `{r['evaluation_command']}`")
    lines.append("- (b), (c): evaluated afterwards in the bench process (`evaluate_classifier` on each best model)")
    return "\n".join(lines)
