"""`python -m bench tta`: its curve arithmetic against hand-made curves, how it reads the peers' epoch files and
their saves inside the first epoch and stops a process at the budget, and the tiny mode end to end (Keras and
this project). No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bench import tta
from bench.settings import SETTINGS
from bench.tta_report import (
    accuracy_at,
    best_so_far,
    first_epoch_interval,
    report,
    speedup,
    speedup_verdict,
    spread,
    summary_table,
    time_to,
)
from perceiver.data import MnistSource
from perceiver.data.mnist import read_idx
from perceiver.training.checkpoint import read_checkpoint, save_atomic
from perceiver.training.state import TrainState
from tests.helpers import REPO

CURVE = [(30.0, 0.50), (60.0, 0.80), (90.0, 0.79), (120.0, 0.85)]


# ----------------------------------------------------------------------------- the curve arithmetic


def test_time_to_an_accuracy_is_the_first_epoch_end_at_or_above_it() -> None:
    assert time_to(CURVE, 0.50) == 30.0
    assert time_to(CURVE, 0.795) == 60.0
    assert time_to(CURVE, 0.85) == 120.0
    assert time_to(CURVE, 0.86) is None
    assert time_to([], 0.1) is None


def test_the_accuracy_at_a_budget_is_that_of_the_last_epoch_ended_by_then() -> None:
    assert accuracy_at(CURVE, 29.9) is None  # no model yet
    assert accuracy_at(CURVE, 30.0) == 0.50
    assert accuracy_at(CURVE, 100.0) == 0.79  # what a user holds then, although an earlier epoch tested higher
    assert accuracy_at(CURVE, 1e9) == 0.85


def test_the_best_model_so_far_has_the_lowest_validation_loss_the_earliest_on_ties() -> None:
    assert best_so_far([2.0, 2.5, 1.5, 1.5, math.nan, 1.4]) == [0, 0, 2, 2, 2, 5]
    assert best_so_far([math.nan, math.inf, 3.0]) == [None, None, 2]
    assert best_so_far([]) == []


def test_the_speedup_is_the_references_time_to_its_best_over_the_peers_time_to_reach_it() -> None:
    reference = [(100.0, 0.6), (200.0, 0.7), (300.0, 0.65)]  # its best, 0.7, at 200 s
    assert speedup(reference, [(10.0, 0.5), (20.0, 0.72)]) == 10.0
    assert speedup(reference, [(400.0, 0.7)]) == 0.5
    assert speedup(reference, [(10.0, 0.69)]) is None
    assert speedup(reference, reference) == 1.0
    assert speedup([], CURVE) is None


def test_a_spread_is_the_median_and_range_of_the_rounds_that_got_there() -> None:
    found = spread([3.0, None, 1.0, 2.0])
    assert (found.median, found.low, found.high, found.count, found.rounds) == (2.0, 1.0, 3.0, 3, 4)
    assert found.text(lambda v: f"{v:.0f} s") == "2 s (1 s-3 s), 3 of 4 rounds"
    assert spread([4.0, 1.0]).median == 2.5
    assert spread([5.0]).text(lambda v: f"{v:.0f} s") == "5 s"
    assert spread([None, None]) is None


def table_cells(table: str) -> dict[str, list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return {row[0]: row[1:] for row in rows[2:]}


def test_the_table_gives_each_peer_its_medians_and_ranges_over_rounds() -> None:
    rows = [
        {"peer": "a", "round": 1, "curve": [(100.0, 0.80), (200.0, 0.86)]},
        {"peer": "b", "round": 1, "curve": [(90.0, 0.81), (180.0, 0.84)]},
        {"peer": "c", "round": 1, "curve": [(10.0, 0.86), (20.0, 0.90)]},
        {"peer": "a", "round": 2, "curve": [(120.0, 0.79), (240.0, 0.84)]},
        {"peer": "b", "round": 2, "curve": [(100.0, 0.70)]},
        {"peer": "c", "round": 2, "curve": [(12.0, 0.83), (24.0, 0.88)]},
    ]
    cells = table_cells(summary_table(rows, [1, 3], [0.8, 0.85]))
    assert cells["rounds"] == ["2", "2", "2"]
    assert cells["epochs within the budget"] == ["2 (2-2)", "1.5 (1-2)", "2 (2-2)"]
    assert cells["best test top-1 within the budget"] == [
        "0.8500 (0.8400-0.8600)",
        "0.7700 (0.7000-0.8400)",
        "0.8900 (0.8800-0.9000)",
    ]
    assert cells["time to 80% test top-1"] == ["170 s (100 s-240 s)", "90 s, 1 of 2 rounds", "11 s (10 s-12 s)"]
    assert cells["time to 85% test top-1"] == ["200 s, 1 of 2 rounds", "not reached", "17 s (10 s-24 s)"]
    assert cells["test top-1 at 1 min"] == ["no epoch ended", "no epoch ended", "0.8900 (0.8800-0.9000)"]
    assert cells["test top-1 at 3 min"] == [
        "0.7950 (0.7900-0.8000)",  # round 1 holds epoch 1 at 180 s (epoch 2 ends at 200 s)
        "0.7700 (0.7000-0.8400)",  # an epoch ending at 180 s counts
        "0.8900 (0.8800-0.9000)",
    ]
    # (a)'s best: 0.86 at 200 s, then 0.84 at 240 s; (c) reached them at 10 s and 24 s; (b) never did
    speedups = cells["(a)'s time to its best test top-1 / this peer's time to reach it"]
    assert speedups == ["1.00x (1.00x-1.00x)", "not reached", "15.00x (10.00x-20.00x)"]


# a reference whose best (0.50) is a save inside its first epoch, at 200 s; its first epoch ends at 260 s, worse
MID_ROWS = [
    {"peer": "a", "round": 1, "curve": [(100.0, 0.30), (200.0, 0.50), (260.0, 0.45)], "within_epoch_points": 2},
    {"peer": "b", "round": 1, "curve": [(50.0, 0.20), (150.0, 0.50), (300.0, 0.60)], "within_epoch_points": 2},
    {"peer": "c", "round": 1, "curve": [(10.0, 0.40), (20.0, 0.55), (40.0, 0.70)], "within_epoch_points": 2},
    {"peer": "a", "round": 2, "curve": [(100.0, 0.40), (300.0, 0.40)], "within_epoch_points": 1},
    {"peer": "b", "round": 2, "curve": [(120.0, 0.20)], "within_epoch_points": 1},
    {"peer": "c", "round": 2, "curve": [(5.0, 0.30), (25.0, 0.41), (60.0, 0.80)], "within_epoch_points": 2},
]


def test_points_inside_the_first_epoch_count_for_time_accuracy_and_speedup_but_not_as_epochs() -> None:
    reference = MID_ROWS[0]["curve"]
    assert time_to(reference, 0.5) == 200.0  # the save inside the epoch, before the epoch's end at 260 s
    assert accuracy_at(reference, 230.0) == 0.50 and accuracy_at(reference, 260.0) == 0.45  # what is held then
    assert speedup(reference, MID_ROWS[2]["curve"]) == 10.0  # 200 s / 20 s
    cells = table_cells(summary_table(MID_ROWS, [1, 5], [0.5]))
    assert cells["epochs within the budget"] == ["1 (1-1)", "0.5 (0-1)", "1 (1-1)"]
    assert cells["time to 50% test top-1"] == ["200 s, 1 of 2 rounds", "150 s, 1 of 2 rounds", "40 s (20 s-60 s)"]
    assert cells["test top-1 at 1 min"] == ["no epoch ended", "0.2000, 1 of 2 rounds", "0.7500 (0.7000-0.8000)"]
    # round 1: 200/150 for (b), 200/20 for (c); round 2: (a)'s best 0.40 at 100 s, (b) never, (c) at 25 s
    speedups = cells["(a)'s time to its best test top-1 / this peer's time to reach it"]
    assert speedups == ["1.00x (1.00x-1.00x)", "1.33x, 1 of 2 rounds", "7.00x (4.00x-10.00x)"]


def test_the_verdict_says_per_peer_whether_its_speedup_against_the_reference_is_10x() -> None:
    assert speedup_verdict(MID_ROWS, "c") == (
        "(c) this project, fast recipe: 7.00x (4.00x-10.00x); 10x or more: in 1 of 2 rounds only"
    )
    assert speedup_verdict(MID_ROWS, "b") == (
        "(b) this project, the example's recipe: 1.33x, 1 of 2 rounds; 10x or more: no"
    )
    both = [row for row in MID_ROWS if row["round"] == 1]
    assert speedup_verdict(both, "c").endswith(": 10.00x; 10x or more: yes")
    never = [{"peer": "a", "round": 1, "curve": [(9.0, 0.9)]}, {"peer": "c", "round": 1, "curve": [(1.0, 0.5)]}]
    assert speedup_verdict(never, "c") == "(c) this project, fast recipe: never reached (a)'s best; 10x or more: no"
    commands = {"command": "python train.py", "evaluation_command": None}
    summary = report([row | commands for row in MID_ROWS], 600.0, [1], [0.5])
    assert f"- {speedup_verdict(MID_ROWS, 'b')}\n- {speedup_verdict(MID_ROWS, 'c')}\n" in summary


def test_the_saves_inside_the_first_epoch_are_evenly_spaced_and_at_least_a_step_apart() -> None:
    assert first_epoch_interval(844, 10) == 84  # Fashion-MNIST's 54,000 training images in batches of 64
    assert first_epoch_interval(422, 10) == 42  # ... of 128
    assert first_epoch_interval(9, 10) == 1  # an epoch shorter than the points asked for: one per step
    assert first_epoch_interval(100, 1) == 100  # one point: the epoch's end (saved anyway), so none inside
    assert first_epoch_interval(844, 0) is None
    with pytest.raises(ValueError, match=">= 0"):
        first_epoch_interval(844, -1)


def test_our_interval_comes_from_the_training_images_the_validation_split_leaves(tmp_path: Path) -> None:
    tta.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(60_000, dtype=np.uint8))
    plan = tta.Plan(tmp_path, tmp_path, "fashion_mnist", 50, 60.0, (), first_epoch_points=10)

    def config(batch_size: int, train_size: int | None = None) -> OmegaConf:
        data = {"val_fraction": 0.1, "train_size": train_size}
        return OmegaConf.create({"seed": 42, "data": data, "trainer": {"batch_size": batch_size}})

    assert tta.our_step_interval(plan, config(64)) == 84  # 54,000 / 64 = 843.75: 844 steps
    assert tta.our_step_interval(plan, config(128)) == 42  # 422 steps
    assert tta.our_step_interval(plan, config(64, train_size=1000)) == 1  # 16 steps
    assert tta.our_step_interval(tta.Plan(tmp_path, tmp_path, "fashion_mnist", 50, 60.0, (), 0), config(64)) is None


@pytest.mark.parametrize("value", ["-1", "ten", "1.5", ""])
def test_a_bad_number_of_first_epoch_points_ends_the_bench_before_any_process(tmp_path, capsys, value) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        tta.main(["--tiny", "--out", str(out), "--first-epoch-points", value])
    assert stopped.value.code == 2
    assert f"--first-epoch-points: {value!r} is not a whole number >= 0" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- the peers and the data


@pytest.mark.parametrize("setting", ["fashion_mnist", "tiny"])
def test_the_keras_peer_and_ours_train_models_of_the_same_parameter_count(setting: str) -> None:
    from bench.keras_example import build_example
    from perceiver import Perceiver

    chosen = SETTINGS[setting]
    images = np.random.default_rng(0).uniform(0, 255, (8, 28, 28, 1)).astype(np.float32)
    keras_model = build_example(images, chosen, augment=True)
    ours = Perceiver(**chosen.model_kwargs(), num_classes=10, in_channels=1)
    keras_count = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
    assert keras_count == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_the_tiny_data_is_written_in_the_idx_format_that_the_data_group_reads(tmp_path: Path) -> None:
    folder = tta.write_tiny_data(tmp_path / "tiny", train=50, test=20)
    raw = (tmp_path / "tiny" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"  # gzip, as the originals
    images = read_idx(folder / "train-images-idx3-ubyte.gz", dims=3)
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8
    train, test = MnistSource(path=str(folder), download=False).load()
    assert train.images.shape == (50, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert int(train.labels.max()) <= 9
    for image, label in zip(train.images[:, 0], train.labels, strict=True):  # the class is the bright bar's height
        assert (image == 255).all(dim=1).nonzero().flatten().tolist() == [3 + 2 * int(label), 4 + 2 * int(label)]


def test_missing_data_ends_the_bench_before_any_work_saying_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist, or pass --data DIR"):
        tta.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_fast_recipe_that_does_not_compose_ends_the_bench_before_any_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"\(c\) \(--fast\) does not compose.*no_such_preset"):
        tta.main(["--tiny", "--out", str(out), "--fast", "experiment=no_such_preset"])
    assert not (out / "runs").exists() and not (out / "curves.jsonl").exists()


# ----------------------------------------------------------------------------- the epoch files and the budget


def save_checkpoint(run_dir: Path, step: int, epoch: int, best_epoch: int, next_batch: int, mtime: float) -> None:
    state = TrainState(
        model={"w": torch.tensor(float(step))},  # the current weights
        optimizer={},
        scheduler=None,
        scaler={},
        early_stopping={"best_loss": 1.0, "best_epoch": best_epoch, "epochs_without_improvement": 0},
        best_model={"w": torch.tensor(-float(best_epoch))},  # the weights of the lowest validation loss so far
        history=[],
        next_epoch=epoch + 1 if next_batch == 0 else epoch,
        next_batch=next_batch,
        global_step=step,
    )
    path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, state.to_dict())
    os.utime(path, (mtime, mtime))


def test_our_epochs_are_the_epoch_end_checkpoints_timed_by_their_mtime(tmp_path: Path) -> None:
    launched = 1_000_000.0
    save_checkpoint(tmp_path, 9, 1, 1, 0, launched + 30)
    save_checkpoint(tmp_path, 18, 2, 1, 0, launched + 55)  # no lower val loss: still epoch 1's model
    save_checkpoint(tmp_path, 27, 3, 3, 0, launched + 80)
    save_checkpoint(tmp_path, 100, 12, 3, 4, launched + 90)  # the stop request's mid-epoch checkpoint: no epoch end
    ends, holders = tta.our_points(tmp_path, launched)
    assert [(e.epoch, e.seconds, e.model) for e in ends] == [
        (1, 30.0, "best of epoch 1"),
        (2, 55.0, "best of epoch 1"),
        (3, 80.0, "best of epoch 3"),
    ]
    assert holders == {"best of epoch 1": tmp_path / "checkpoints/step-00000009.pt",
                       "best of epoch 3": tmp_path / "checkpoints/step-00000027.pt"}  # fmt: skip


def test_our_checkpoints_inside_the_first_epoch_are_points_of_their_current_weights(tmp_path: Path) -> None:
    launched = 1_000_000.0
    save_checkpoint(tmp_path, 3, 1, 0, 3, launched + 10)  # inside epoch 1, every 3 steps
    save_checkpoint(tmp_path, 6, 1, 0, 6, launched + 20)
    save_checkpoint(tmp_path, 9, 1, 1, 0, launched + 30)  # epoch 1's end
    save_checkpoint(tmp_path, 12, 2, 1, 3, launched + 40)  # inside epoch 2: epoch 1's best model again, skipped
    save_checkpoint(tmp_path, 18, 2, 2, 0, launched + 55)
    points, holders = tta.our_points(tmp_path, launched, every=3)
    assert [(p.epoch, p.step, p.within_epoch, p.seconds, p.model) for p in points] == [
        (1, 3, True, 10.0, "weights at step 3"),
        (1, 6, True, 20.0, "weights at step 6"),
        (1, None, False, 30.0, "best of epoch 1"),
        (2, None, False, 55.0, "best of epoch 2"),
    ]
    held = {model: tta.held_weights(TrainState.from_dict(read_checkpoint(path))) for model, path in holders.items()}
    assert {model: float(weights["w"]) for model, weights in held.items()} == {
        "weights at step 3": 3.0,  # the current weights: no validation has chosen a best model yet
        "weights at step 6": 6.0,
        "best of epoch 1": -1.0,  # the best model so far
        "best of epoch 2": -2.0,
    }
    assert [p.model for p in tta.our_points(tmp_path, launched)[0]] == ["best of epoch 1", "best of epoch 2"]


def test_a_stop_requests_checkpoint_inside_the_first_epoch_is_no_point(tmp_path: Path) -> None:
    launched = 1_000_000.0
    save_checkpoint(tmp_path, 4, 1, 0, 4, launched + 10)
    save_checkpoint(tmp_path, 5, 1, 0, 5, launched + 12)  # SIGTERM at step 5, off the 4-step interval
    points, holders = tta.our_points(tmp_path, launched, every=4)
    assert [p.step for p in points] == [4] and list(holders) == ["weights at step 4"]


def test_the_keras_epochs_choose_the_lowest_validation_loss_so_far(tmp_path: Path) -> None:
    launched = 2_000_000.0
    for epoch, val_loss in enumerate([2.0, 2.5, 1.5], start=1):
        path = tmp_path / f"epoch-{epoch:03d}.npz"
        np.savez(path, val_loss=np.float64(val_loss), w0000=np.zeros(2))
        os.utime(path, (launched + 10 * epoch, launched + 10 * epoch))
    ends, holders = tta.keras_points(tmp_path, launched)
    assert [(e.epoch, e.seconds, e.model) for e in ends] == [
        (1, 10.0, "epoch-001.npz"),
        (2, 20.0, "epoch-001.npz"),
        (3, 30.0, "epoch-003.npz"),
    ]
    assert holders == {"epoch-001.npz": tmp_path / "epoch-001.npz", "epoch-003.npz": tmp_path / "epoch-003.npz"}


def test_the_keras_saves_inside_the_first_epoch_come_first_as_their_own_models(tmp_path: Path) -> None:
    launched = 2_000_000.0
    files = {"epoch-000-step-00004.npz": 3, "epoch-000-step-00008.npz": 6, "epoch-001.npz": 9, "epoch-002.npz": 12}
    for name, seconds in files.items():
        extra = {"val_loss": np.float64(seconds)} if "step" not in name else {"step": np.int64(name[-9:-4])}
        np.savez(tmp_path / name, w0000=np.zeros(2), **extra)
        os.utime(tmp_path / name, (launched + seconds, launched + seconds))
    points, holders = tta.keras_points(tmp_path, launched)
    assert [(p.epoch, p.step, p.seconds, p.model) for p in points] == [
        (1, 4, 3.0, "epoch-000-step-00004.npz"),
        (1, 8, 6.0, "epoch-000-step-00008.npz"),
        (1, None, 9.0, "epoch-001.npz"),
        (2, None, 12.0, "epoch-001.npz"),  # a higher validation loss: epoch 1's weights stay the best
    ]
    assert holders == {name: tmp_path / name for name in list(files)[:3]}


def test_a_process_past_its_budget_gets_sigterm_and_one_that_ignores_it_is_killed(tmp_path, monkeypatch) -> None:
    done = tta.run_with_budget([sys.executable, "-c", "print('done')"], dict(os.environ), tmp_path / "a.log", 300)
    assert (done.returncode, done.stopped) == (0, False) and (tmp_path / "a.log").read_text() == "done\n"
    stopped = tta.run_with_budget(["sleep", "300"], dict(os.environ), tmp_path / "b.log", 0.5)
    assert (stopped.returncode, stopped.stopped) == (-signal.SIGTERM, True)
    monkeypatch.setattr(tta, "STOP_GRACE_SECONDS", 0.5)
    stubborn = ["sh", "-c", "trap '' TERM; exec sleep 300"]  # SIGTERM ignored, also by the exec'd sleep
    killed = tta.run_with_budget(stubborn, dict(os.environ), tmp_path / "c.log", 3)
    assert (killed.returncode, killed.stopped) == (-signal.SIGKILL, True)


# ----------------------------------------------------------------------------- the tiny mode, end to end


@pytest.mark.slow
def test_the_tiny_mode_runs_every_peer_and_writes_curves_table_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "tta"
    command = [sys.executable, "-m", "bench", "tta", "--tiny", "--out", str(out), "--budget-minutes", "10"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "KERAS_BACKEND=torch" in done.stdout and "-m bench.keras_tta train --data" in done.stdout
    assert "train.py data=fashion_mnist data.source.path=" in done.stdout  # every command line is printed

    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert [(r["peer"], r["round"]) for r in rows] == [("a", 1), ("b", 1), ("c", 1)]
    for row in rows:
        assert not row["stopped_at_budget"] and row["returncode"] == 0  # 2 epochs, well within 10 minutes
        ends = [e for e in row["epochs"] if not e["within_epoch"]]
        assert [e["epoch"] for e in ends] == [1, 2]
        times = [e["seconds"] for e in ends]
        assert len(times) == 2 and 0 < times[0] < times[1] <= row["process_seconds"]
        # inside the first epoch: 320 tiny images less 10% for validation = 288, in 9 batches of 32 (every peer);
        # 10 points asked, so one every step, but for the 9th, the epoch's end
        inside = [e for e in row["epochs"] if e["within_epoch"]]
        assert [(e["epoch"], e["step"]) for e in inside] == [(1, step) for step in range(1, 9)]
        assert row["epochs"] == [*inside, *ends]  # the points inside the first epoch, then the epoch ends
        seconds = [e["seconds"] for e in row["epochs"]]
        assert seconds[0] > 0 and seconds == sorted(seconds) and seconds[7] < times[0]  # in time order
        assert row["curve"] == [[e["seconds"], e["test_top1"]] for e in row["epochs"]]
        assert row["within_epoch_points"] == 8 and len({e["model"] for e in inside}) == 8
        for _, top1 in row["curve"]:
            assert 0.0 <= top1 <= 1.0
            assert abs(top1 * 100 - round(top1 * 100)) < 1e-4  # a fraction of the 100 tiny test images
    for row in rows[1:]:  # ours ran to its end: its own test of the final (best) model is the curve's last point
        metrics = json.loads((out / "runs" / f"{row['peer']}-round1" / "metrics.json").read_text())
        assert row["curve"][-1][1] == metrics["test"]["top1"]
        assert "trainer.checkpoint_every_n_steps=1 " in row["command"]
    assert "--first-epoch-points 10" in rows[0]["command"]

    with Image.open(out / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 400
    summary = (out / "summary.md").read_text()
    table = summary[summary.index("| |") : summary.index("\n\n", summary.index("| |"))]
    cells = table_cells(table)
    expected = ["rounds", "epochs within the budget", "best test top-1 within the budget"]
    expected += [f"time to {a:g}% test top-1" for a in (80, 85, 88, 90, 91, 92, 93)]
    expected += [f"test top-1 at {m:g} min" for m in (0.5, 1, 2)]
    expected.append("(a)'s time to its best test top-1 / this peer's time to reach it")
    assert list(cells) == expected
    assert cells["rounds"] == ["1", "1", "1"] and cells["epochs within the budget"] == ["2", "2", "2"]
    assert cells[expected[-1]][0] == "1.00x"
    assert "- (c) this project, fast recipe: " in summary and "; 10x or more: " in summary
