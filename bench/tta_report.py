"""The report of `python -m bench tta`: what a curve of (seconds, test top-1) says (time to an accuracy, the
accuracy at a budget, the speed-up against the reference peer and whether it meets the issue's 10x), medians and
ranges over rounds, the table and the figure; and where inside the first epoch every peer saves a point. Pure
functions of the curves, tested against hand-made ones."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PEERS = {"a": "Keras example (Keras 3)", "b": "this project, the example's recipe", "c": "this project, fast recipe"}
REFERENCE = "a"  # whose best test top-1 within the budget is the target the others race to (the criterion)
CRITERION = 10.0  # the issue's: (c) reaches (a)'s best test top-1 at least this many times sooner

# (seconds since launch, test top-1) of each saved model, in time order: the points inside the first epoch
# (the row's `within_epoch_points` first ones), then one per epoch end
Curve = Sequence[tuple[float, float]]


def first_epoch_interval(steps_per_epoch: int, points: int) -> int | None:
    """Steps between the saves inside the first epoch for about `points` of them, evenly spaced, at least 1 step
    apart (a tiny epoch gets one per step); None for no points."""
    if points < 0 or steps_per_epoch < 1:
        raise ValueError(f"{points} points in an epoch of {steps_per_epoch} steps: both must be >= 0 and >= 1")
    return max(1, steps_per_epoch // points) if points else None


def time_to(curve: Curve, accuracy: float) -> float | None:
    """The first time the curve reaches `accuracy`; None when it never does."""
    return next((seconds for seconds, top1 in curve if top1 >= accuracy), None)


def accuracy_at(curve: Curve, seconds: float) -> float | None:
    """Test top-1 of the model a user holds at `seconds`: the last point saved by then; None before the first."""
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


def fmt_speedup(ratio: float) -> str:
    return f"{ratio:.2f}x"


def epoch_ends(row: dict) -> int:
    """The curve's points at an epoch's end: all but its first `within_epoch_points` (none in rows without it)."""
    return len(row["curve"]) - row.get("within_epoch_points", 0)


def speedup_verdict(rows: list[dict], peer: str) -> str:
    """`peer`'s speed-up against the reference, median (range) over rounds, and whether it is CRITERION or more:
    yes when every round's is, no when none is."""
    curves = {(r["peer"], r["round"]): r["curve"] for r in rows}
    mine = sorted(n for key, n in curves if key == peer)
    values = [speedup(curves.get((REFERENCE, n), []), curves[(peer, n)]) for n in mine]
    met = sum(value is not None and value >= CRITERION for value in values)
    found = spread(values)
    measured = found.text(fmt_speedup) if found else f"never reached ({REFERENCE})'s best"
    answer = "no" if met == 0 else "yes" if met == len(values) else f"in {met} of {len(values)} rounds only"
    return f"({peer}) {PEERS[peer]}: {measured}; {CRITERION:g}x or more: {answer}"


def summary_table(rows: list[dict], at_minutes: Sequence[float], accuracies: Sequence[float]) -> str:
    """Peers as columns, a measure per line; each cell the median over rounds (range), or how many got there."""
    rounds = sorted({r["round"] for r in rows})
    by_key = {(r["peer"], r["round"]): r for r in rows}

    def line(name: str, measure: Callable[[dict, Curve], float | None], fmt: Callable[[float], str], never: str) -> str:
        """A cell per peer: `measure(row, the reference's curve)` over its rounds."""
        cells = []
        for peer in PEERS:
            mine = [n for n in rounds if (peer, n) in by_key]
            reference = [by_key.get((REFERENCE, n), {}).get("curve", []) for n in mine]
            found = spread([measure(by_key[(peer, n)], a) for n, a in zip(mine, reference, strict=True)])
            cells.append(found.text(fmt) if found else never)
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = ["| | " + " | ".join(f"({key}) {label}" for key, label in PEERS.items()) + " |"]
    lines.append("|---" * (len(PEERS) + 1) + "|")
    lines.append("| rounds | " + " | ".join(str(sum((peer, n) in by_key for n in rounds)) for peer in PEERS) + " |")
    lines.append(line("epochs within the budget", lambda r, a: epoch_ends(r), lambda v: f"{v:g}", "0"))
    best = "best test top-1 within the budget"
    lines.append(line(best, lambda r, a: max((top1 for _, top1 in r["curve"]), default=None), fmt_top1, "-"))
    for accuracy in accuracies:
        name = f"time to {100 * accuracy:g}% test top-1"
        lines.append(line(name, lambda r, a, to=accuracy: time_to(r["curve"], to), fmt_seconds, "not reached"))
    for minutes in at_minutes:
        name = f"test top-1 at {minutes:g} min"
        lines.append(line(name, lambda r, a, at=60 * minutes: accuracy_at(r["curve"], at), fmt_top1, "no epoch ended"))
    name = f"({REFERENCE})'s time to its best test top-1 / this peer's time to reach it"
    lines.append(line(name, lambda r, a: speedup(a, r["curve"]), fmt_speedup, "not reached"))
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
    axes.set_ylabel("test top-1 (best so far by val loss; first epoch: current)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.savefig(path, dpi=120)


def report(rows: list[dict], budget_s: float, at_minutes: Sequence[float], accuracies: Sequence[float]) -> str:
    """summary.md: the table, each round's race to the reference's best, the commands."""
    table = summary_table(rows, [m for m in at_minutes if 60 * m <= budget_s], accuracies)
    lines = [f"# python -m bench tta: {len({r['round'] for r in rows})} round(s), {budget_s:g} s each", "", table]
    lines += ["", f"Speed-up against ({REFERENCE}): its time to its best test top-1 within the budget over the peer's"]
    lines += [f"time to reach that test top-1, median (range) over rounds; the issue asks {CRITERION:g}x or more:", ""]
    lines += [f"- {speedup_verdict(rows, peer)}" for peer in PEERS if peer != REFERENCE]
    lines += ["", f"Per round, ({REFERENCE})'s best test top-1 within the budget and when each peer reached it:", ""]
    for round_ in sorted({r["round"] for r in rows}):
        curves = {r["peer"]: r["curve"] for r in rows if r["round"] == round_}
        if not curves.get(REFERENCE):
            lines.append(f"- round {round_}: ({REFERENCE}) saved no model within the budget")
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
    lines.append(
        "- (b), (c): evaluated afterwards in the bench process (`evaluate_classifier` on each point's model: the best"
        " so far, inside the first epoch the current weights)"
    )
    return "\n".join(lines)
