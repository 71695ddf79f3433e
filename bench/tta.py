"""Time to accuracy on Fashion-MNIST: whole processes, test top-1 against wall-clock time, each peer given a budget.

    python -m bench tta [--pairs 3] [--budget-minutes 20] [--out DIR] [--fast "experiment=fashion_mnist_fast"]
                        [--data DIR] [--first-epoch-points 10] [--tiny]

The peers, on the same idx files and machine, one process at a time in interleaved rounds (a b c, a b c, ...):
(a) the keras.io example's model trained by Keras 3 on the torch backend with the example's recipe
(bench/keras_tta.py); (b) this project's `python train.py` with the same model and recipe (optimizer=adamw,
scheduler=plateau, augmentation=keras, early stopping 15, 50 epochs); (c) this project's fast recipe, the
train.py overrides given by `--fast`. (a) and (b) run at the small size on 28x28 grayscale (bench/settings.py,
"fashion_mnist": patch 4 = 49 inputs, 64 latents x 128 channels, 4 heads of 32, 2 blocks, 2 iterations, batch 64).

How time and accuracy are measured, the same for every peer:
- Every process starts cold and gets the budget. At the budget the bench sends SIGTERM (train.py saves a
  checkpoint at the next step and exits; Keras ends at once); only points saved within the budget count.
- After every epoch the process saves its state (ours: the resumable checkpoint, all of them kept; Keras: the
  weights and the epoch's validation loss). The model a user gets when stopping after epoch e is the one with the
  lowest validation loss so far (ours: the checkpoint's best model, which fit loads at the end; Keras: the
  example's EarlyStopping(restore_best_weights)).
- Inside the first epoch, where no validation has happened yet, the process also saves its current weights every
  `--first-epoch-points`-th of its own epoch (steps per epoch // K steps, at least 1; none at the epoch's last step,
  whose save is the epoch's end): ours a mid-epoch checkpoint (`trainer.checkpoint_every_n_steps`, the interval
  computed by the bench from the composed config: the training images the validation split leaves over
  trainer.batch_size; the setting stays on in later epochs, whose mid-epoch checkpoints are skipped, as is a stop
  request's), Keras a weights file (its callback reads the steps of the epoch Keras runs). The model of such a
  point is those current weights: what a user stopping there holds. `--first-epoch-points 0` saves none.
- A point's time is its file's mtime minus the launch: the whole process's wall clock, start-up included, to the
  save (at an epoch's end: after its validation). Every peer pays for its own saves.
- Test top-1 of each point's model is measured after the process has ended, so no peer pays for it: ours with
  the project's own evaluation (as `python evaluate.py`), Keras with `model.evaluate` in a process of its own.

Written to --out: curves.jsonl (one line per peer and round: the commands, the points (`within_epoch` and `step`
mark those inside the first epoch), the curve of (seconds, test top-1)), summary.md (per peer the time to reach
given test accuracies and the test top-1 at fixed budgets, medians and ranges over rounds; (a)'s time to its best
test top-1 over each peer's time to reach it, and whether that is 10x; the commands), curves.png, and a log per
process. The data is Debian's copy (`apt-get install dataset-fashion-mnist`) or --data DIR; `--tiny` writes tiny
idx files itself and runs a tiny model for 2 epochs (the tests run it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

import perceiver.experiment.config  # noqa: F401 - registers the schemas conf/train.yaml names
from bench.compose import compose_train
from bench.measure import at_least
from bench.settings import SETTINGS
from bench.tta_report import PEERS as PEER_LABELS
from bench.tta_report import best_so_far, draw_curves, first_epoch_interval, report
from perceiver.data.dataset import split_indices
from perceiver.data.mnist import SPLITS, file_stems, idx_file, read_idx
from perceiver.experiment.evaluation import eval_device, evaluate_classifier, load_split
from perceiver.inference import read_model_file
from perceiver.inference.runs import classifier_from
from perceiver.training.checkpoint import read_checkpoint
from perceiver.training.state import TrainState

REPO = Path(__file__).resolve().parents[1]
DEBIAN_COPY = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
FAST = "experiment=fashion_mnist_fast"
ACCURACIES = (0.80, 0.85, 0.88, 0.90, 0.91, 0.92, 0.93)
KEEP_CHECKPOINTS = 100_000  # every epoch's checkpoint stays (trainer.keep_checkpoints)
STOP_GRACE_SECONDS = 120  # after SIGTERM, how long train.py may take to save and exit before it is killed
EXAMPLE_EPOCHS = 50  # the example's num_epochs
TINY_FAST = ("optimizer=adamw", "optimizer.lr=3e-3", "scheduler=none", "augmentation=none")
FIRST_EPOCH_POINTS = 10  # saves of the current weights inside every peer's first epoch (--first-epoch-points)


@dataclass(frozen=True)
class Peer:
    key: str  # a, b or c (bench/tta_report.py names them)
    keras: bool = False

    @property
    def label(self) -> str:
        return PEER_LABELS[self.key]


PEERS = (Peer("a", keras=True), Peer("b"), Peer("c"))


@dataclass(frozen=True)
class Plan:
    """One invocation: the data, where everything goes, the model size of (a) and (b), and the budget."""

    data: Path
    work: Path
    setting: str
    epochs: int  # of (a) and (b); (c)'s recipe chooses its own
    budget_s: float
    fast: tuple[str, ...]  # (c)'s train.py overrides
    first_epoch_points: int = FIRST_EPOCH_POINTS  # K: saves of the current weights inside the first epoch; 0 = none


# ----------------------------------------------------------------------------- the data


def check_data(folder: Path) -> Path:
    """The folder, when it holds the four idx files (.gz or not); else exit saying how to get them."""
    if not all(idx_file(folder, stem) for stem in file_stems()):
        raise SystemExit(
            f"Fashion-MNIST is not in {folder} (the four idx files {', '.join(file_stems())}, .gz or not): "
            "apt-get install dataset-fashion-mnist, or pass --data DIR"
        )
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array as a gzipped idx file: magic 0x00 0x00 0x08 <dims>, one big-endian int32 per dimension, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as file:
        file.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_tiny_data(folder: Path, train: int = 320, test: int = 100, seed: int = 0) -> Path:
    """A learnable stand-in for Fashion-MNIST in its own format: noise with a bright two-row bar whose height is
    the class."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in ((SPLITS["train"], train), (SPLITS["test"], test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 96, (count, 28, 28)).astype(np.uint8)
        rows = 3 + 2 * labels.astype(np.int64)[:, None] + np.arange(2)  # (N, 2): the bar's rows
        images[np.arange(count)[:, None], rows, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


# ----------------------------------------------------------------------------- the commands


def keras_command(plan: Plan, states: Path) -> list[str]:
    command = [sys.executable, "-m", "bench.keras_tta", "train", "--data", str(plan.data), "--states", str(states)]
    command += ["--setting", plan.setting, "--epochs", str(plan.epochs)]
    return [*command, "--first-epoch-points", str(plan.first_epoch_points)]


def example_recipe(plan: Plan) -> list[str]:
    """(b): the example's model, optimizer, scheduler, augmentation, early stopping and epochs."""
    recipe = ["optimizer=adamw", "scheduler=plateau", "augmentation=keras", *SETTINGS[plan.setting].train_overrides()]
    return [*recipe, "trainer.early_stopping_patience=15", f"trainer.epochs={plan.epochs}"]


def our_overrides(plan: Plan, recipe: Sequence[str]) -> list[str]:
    """The data, the recipe, and the bench's bookkeeping: no tracking, every checkpoint kept, caches in --out."""
    data = ["data=fashion_mnist", f"data.source.path={plan.data}", "data.source.download=false"]
    bookkeeping = ["logger=none", "trainer.save_checkpoints=true", f"trainer.keep_checkpoints={KEEP_CHECKPOINTS}"]
    return [*data, *recipe, *bookkeeping, f"paths.data_root={plan.work / 'data_root'}"]


def peer_command(plan: Plan, peer: Peer, place: Path, every: int | None = None) -> list[str]:
    """The process of `peer`, writing its states into `place`; ours with a mid-epoch checkpoint `every` steps."""
    if peer.keras:
        return keras_command(plan, place)
    recipe = example_recipe(plan) if peer.key == "b" else plan.fast
    mid_epoch = [f"trainer.checkpoint_every_n_steps={every}"] if every else []
    return [sys.executable, "train.py", *our_overrides(plan, recipe), *mid_epoch, f"hydra.run.dir={place}"]


def environment(peer: Peer) -> dict[str, str]:
    return {**os.environ, "KERAS_BACKEND": "torch"} if peer.keras else dict(os.environ)


def shell_line(command: Sequence[str], peer: Peer) -> str:
    return ("KERAS_BACKEND=torch " if peer.keras else "") + shlex.join(command)


def check_recipes(plan: Plan) -> dict[str, DictConfig]:
    """Compose (b)'s and (c)'s configs before any process runs: a missing preset or a bad override ends the bench
    here, not after the first peers' budgets."""
    recipes = {"b": ("(b)", example_recipe(plan)), "c": ("(c) (--fast)", plan.fast)}
    return {key: compose_train(our_overrides(plan, recipe), what) for key, (what, recipe) in recipes.items()}


def our_step_interval(plan: Plan, config: DictConfig) -> int | None:
    """Steps between (b)'s or (c)'s checkpoints inside the first epoch, from its composed config: the training
    images its validation split leaves (data.val_fraction, data.train_size, seed) over trainer.batch_size, a last
    partial batch counted (the loader's steps per epoch); None when --first-epoch-points is 0."""
    if not plan.first_epoch_points:
        return None
    images = len(read_idx(idx_file(plan.data, f"{SPLITS['train']}-labels-idx1-ubyte"), dims=1))
    train = config.data.get("train_size") or len(split_indices(images, config.data.val_fraction, config.seed)[0])
    return first_epoch_interval(math.ceil(train / config.trainer.batch_size), plan.first_epoch_points)


# ----------------------------------------------------------------------------- one process


@dataclass
class Launch:
    started: float  # time.time() just before the process was started
    seconds: float  # until it ended (or was stopped)
    returncode: int
    stopped: bool  # ended by the bench at the budget


def run_with_budget(command: Sequence[str], env: dict[str, str], log: Path, budget_s: float) -> Launch:
    """Run a process with its output in `log`; at `budget_s` SIGTERM it, and kill it if it has not ended
    `STOP_GRACE_SECONDS` later."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        started, clock = time.time(), time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            returncode, stopped = process.wait(timeout=budget_s), False
        except subprocess.TimeoutExpired:
            process.terminate()
            stopped = True
            try:
                returncode = process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
    return Launch(started, time.perf_counter() - clock, returncode, stopped)


@dataclass(frozen=True)
class Point:
    """A saved model a user stopping then would hold: at an epoch's end, or (`step` set) inside the first epoch."""

    epoch: int  # the epoch that ended, or 1 for a point inside the first epoch
    seconds: float  # launch to the saved state (its file's mtime)
    model: str  # the model a user stopping here gets; epochs with the same best-so-far model share it
    step: int | None = None  # the step inside the first epoch; None at an epoch's end

    @property
    def within_epoch(self) -> bool:
        return self.step is not None


def our_points(run_dir: Path, started: float, every: int | None = None) -> tuple[list[Point], dict[str, Path]]:
    """The points of one of our runs in training order, and for each model the first checkpoint holding it: the
    epoch-end checkpoints, and before the first epoch's end the mid-epoch ones saved `every` steps. Later
    mid-epoch checkpoints hold the same best model as the epoch before, and a stop request's comes after the
    budget: both skipped."""
    points, holders = [], {}
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):  # zero-padded steps: in training order
        state = TrainState.from_dict(read_checkpoint(path), path)
        seconds = path.stat().st_mtime - started
        if not state.next_batch:
            point = Point(state.epoch, seconds, f"best of epoch {state.best_epoch}")
        elif state.next_epoch == 1 and every and state.global_step % every == 0:
            point = Point(1, seconds, f"weights at step {state.global_step}", step=state.global_step)
        else:
            continue
        holders.setdefault(point.model, path)
        points.append(point)
    return points, holders


def held_weights(state: TrainState) -> dict:
    """The weights a user stopping at this checkpoint holds: inside the first epoch, before any validation, the
    current ones; after it the best so far by validation loss (what fit loads at the end)."""
    return state.model if state.next_epoch == 1 else state.best_model


def our_test_top1(run_dir: Path, holders: dict[str, Path]) -> dict[str, float]:
    """Test top-1 of the model each checkpoint holds, through the run's model file (how to build and feed the model)
    and `evaluate_classifier`, as `python evaluate.py run=DIR` measures the run's final model. A run stopped before
    its first epoch's end wrote no model file: its points cannot be tested (a warning; none)."""
    if not holders:
        return {}
    if not (run_dir / "best.pt").exists():
        print(f"    WARNING: {run_dir} ended no epoch, so it has no best.pt to build its models from: untested")
        return {}
    card = read_model_file(run_dir / "best.pt")  # how to build and feed the model: the same for every point
    config = card.config or {}
    device = eval_device(None, config)
    test = load_split(OmegaConf.create(config["data"]), "test", int(config.get("seed", 0)), card.classes or [])
    top1 = {}
    for model, path in holders.items():
        state = TrainState.from_dict(read_checkpoint(path), path)
        held = dataclasses.replace(card, model=held_weights(state), epoch=state.best_epoch)
        classifier = classifier_from(held, path).to(device)
        top1[model] = evaluate_classifier(classifier, test, config)["top1"]
    return top1


def keras_points(states: Path, started: float) -> tuple[list[Point], dict[str, Path]]:
    """The Keras peer's points in training order: its files inside the first epoch (`epoch-000-step-NNNNN.npz`,
    the current weights), then its epoch files, each with the best-so-far model (lowest validation loss so far);
    and for each model its file."""
    inside = sorted(states.glob("epoch-000-step-*.npz"))
    points = [Point(1, file.stat().st_mtime - started, file.name, int(file.stem.split("-")[-1])) for file in inside]
    holders = {file.name: file for file in inside}
    files = sorted(states.glob("epoch-[0-9][0-9][0-9].npz"))
    losses = []
    for file in files:
        with np.load(file) as saved:
            losses.append(float(saved["val_loss"]))
    for file, best in zip(files, best_so_far(losses), strict=True):
        if best is None:
            continue
        model = files[best].name
        holders.setdefault(model, files[best])
        points.append(Point(int(file.stem.split("-")[1]), file.stat().st_mtime - started, model))
    return points, holders


def keras_test_top1(plan: Plan, holders: dict[str, Path], log: Path) -> tuple[dict[str, float], list[str]]:
    """Test top-1 of each weights file, measured by Keras in a process of its own; and its command."""
    if not holders:
        return {}, []
    command = [sys.executable, "-m", "bench.keras_tta", "evaluate", "--data", str(plan.data)]
    command += ["--setting", plan.setting, "--weights", *map(str, holders.values())]
    print(f"    evaluating: {shell_line(command, PEERS[0])}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=environment(PEERS[0]), capture_output=True, text=True, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    by_file = json.loads(done.stdout.strip().splitlines()[-1])
    return {model: by_file[str(path)] for model, path in holders.items()}, command


def run_peer(plan: Plan, peer: Peer, round_: int, every: int | None = None) -> dict:
    """One timed process of `peer` (ours with a mid-epoch checkpoint `every` steps), then its points' test top-1
    measured afterwards: one curves.jsonl row."""
    name = f"{peer.key}-round{round_}"
    place = plan.work / "runs" / name
    shutil.rmtree(place, ignore_errors=True)  # a rerun into the same --out starts afresh (no resume)
    command = peer_command(plan, peer, place, every)
    print(f"({peer.key}) round {round_}: {shell_line(command, peer)}", flush=True)
    launch = run_with_budget(command, environment(peer), plan.work / "logs" / f"{name}.log", plan.budget_s)
    if launch.returncode != 0 and not launch.stopped:
        print(f"    WARNING: it ended with exit code {launch.returncode}; see {plan.work / 'logs' / name}.log")
    if peer.keras:
        points, holders = keras_points(place, launch.started)
        top1, evaluation = keras_test_top1(plan, holders, plan.work / "logs" / f"{name}-evaluate.log")
    else:
        points, holders = our_points(place, launch.started, every)
        top1, evaluation = our_test_top1(place, holders), []
    tested = [point for point in points if point.model in top1]
    epochs = [dataclasses.asdict(p) | {"within_epoch": p.within_epoch, "test_top1": top1[p.model]} for p in tested]
    kept = [point for point in epochs if point["seconds"] <= plan.budget_s]
    curve = [(point["seconds"], point["test_top1"]) for point in kept]
    inside = sum(point["within_epoch"] for point in kept)
    shown = ", ".join(f"{seconds:.0f} s {accuracy:.4f}" for seconds, accuracy in curve)
    print(f"    {inside} points inside the first epoch and {len(curve) - inside} epoch ends within the budget "
          f"({launch.seconds:.0f} s in all): {shown}", flush=True)  # fmt: skip
    return {
        "peer": peer.key,
        "label": peer.label,
        "round": round_,
        "command": shell_line(command, peer),
        "evaluation_command": shell_line(evaluation, peer) if evaluation else None,
        "budget_seconds": plan.budget_s,
        "process_seconds": launch.seconds,
        "stopped_at_budget": launch.stopped,
        "returncode": launch.returncode,
        "epochs": epochs,
        "curve": curve,
        "within_epoch_points": inside,  # the curve's first points, inside the first epoch (bench/tta_report.py)
    }


# ----------------------------------------------------------------------------- the command line


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(prog="python -m bench tta", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, help="interleaved rounds (a b c); default 3, --tiny 1")
    parser.add_argument("--budget-minutes", type=float, help="each process's budget; default 20, --tiny 2")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/tta"), help="runs, logs, curves, summary")
    parser.add_argument("--fast", help=f"(c)'s train.py overrides, one string; default {FAST!r}")
    parser.add_argument("--data", type=Path, help=f"a folder holding Fashion-MNIST's idx files; default {DEBIAN_COPY}")
    parser.add_argument("--accuracies", type=float, nargs="+", default=ACCURACIES, help="test top-1 targets, 0-1")
    parser.add_argument("--at-minutes", type=float, nargs="+", help="fixed budgets; default 5 10 20, --tiny 0.5 1 2")
    parser.add_argument(
        "--first-epoch-points",
        type=at_least(
            0, ": give how many times each peer saves its weights inside its first epoch, e.g. 10, or 0 for none"
        ),
        default=FIRST_EPOCH_POINTS,
        help=f"saves of the current weights inside each peer's first epoch, evenly in its steps; 0 = none; "
        f"default {FIRST_EPOCH_POINTS}",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny idx files written here, a tiny model, 2 epochs")
    args = parser.parse_args(argv)
    work = args.out.resolve()
    if args.tiny:
        data = check_data(args.data) if args.data else write_tiny_data(work / "tiny-data")
        tiny = ("trainer.epochs=2", *SETTINGS["tiny"].train_overrides(), *TINY_FAST)
        fast = tuple(shlex.split(args.fast)) if args.fast else tiny
        plan = Plan(data.resolve(), work, "tiny", 2, 60 * (args.budget_minutes or 2), fast, args.first_epoch_points)
        args.pairs, args.at_minutes = args.pairs or 1, args.at_minutes or (0.5, 1, 2)
    else:
        data = check_data(args.data or DEBIAN_COPY)
        fast = tuple(shlex.split(args.fast or FAST))
        budget_s = 60 * (args.budget_minutes or 20)
        plan = Plan(data.resolve(), work, "fashion_mnist", EXAMPLE_EPOCHS, budget_s, fast, args.first_epoch_points)
        args.pairs, args.at_minutes = args.pairs or 3, args.at_minutes or (5, 10, 20)
    return args, plan


def check_keras() -> None:
    import importlib.util

    if importlib.util.find_spec("keras") is None:
        raise SystemExit('(a) needs Keras 3: pip install -e ".[bench]"')


def main(argv: Sequence[str] | None = None) -> None:
    args, plan = parse(argv)
    check_keras()
    every = {key: our_step_interval(plan, config) for key, config in check_recipes(plan).items()}
    plan.work.mkdir(parents=True, exist_ok=True)
    print(f"data: {plan.data}; budget {plan.budget_s:g} s per process; {args.pairs} round(s) of (a) (b) (c)")
    rows = []
    with open(plan.work / "curves.jsonl", "w") as curves:
        for round_ in range(1, args.pairs + 1):
            for peer in PEERS:
                rows.append(run_peer(plan, peer, round_, every.get(peer.key)))
                curves.write(json.dumps(rows[-1]) + "\n")
                curves.flush()
    text = report(rows, plan.budget_s, args.at_minutes, args.accuracies)
    (plan.work / "summary.md").write_text(text + "\n")
    draw_curves(rows, plan.work / "curves.png", f"{plan.data.name}: test top-1 against whole-process wall clock")
    print("\n" + text)
    print(f"\n  -> {plan.work / 'curves.jsonl'}\n  -> {plan.work / 'summary.md'}\n  -> {plan.work / 'curves.png'}")


if __name__ == "__main__":
    main()
