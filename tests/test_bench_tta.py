"""`python -m bench tta`: its curve arithmetic against hand-made curves, how it reads the peers' epoch files and
stops a process at the budget, and the tiny mode end to end (Keras and this project). No timing is asserted."""

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
from PIL import Image

from bench import tta
from bench.settings import SETTINGS
from bench.tta_report import accuracy_at, best_so_far, speedup, spread, summary_table, time_to
from perceiver.data import MnistSource
from perceiver.data.mnist import read_idx
from perceiver.training.checkpoint import save_atomic
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
        model={},
        optimizer={},
        scheduler=None,
        scaler={},
        early_stopping={"best_loss": 1.0, "best_epoch": best_epoch, "epochs_without_improvement": 0},
        best_model={},
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
    ends, holders = tta.our_epoch_ends(tmp_path, launched)
    assert [(e.epoch, e.seconds, e.model) for e in ends] == [
        (1, 30.0, "best of epoch 1"),
        (2, 55.0, "best of epoch 1"),
        (3, 80.0, "best of epoch 3"),
    ]
    assert holders == {"best of epoch 1": tmp_path / "checkpoints/step-00000009.pt",
                       "best of epoch 3": tmp_path / "checkpoints/step-00000027.pt"}  # fmt: skip


def test_the_keras_epochs_choose_the_lowest_validation_loss_so_far(tmp_path: Path) -> None:
    launched = 2_000_000.0
    for epoch, val_loss in enumerate([2.0, 2.5, 1.5], start=1):
        path = tmp_path / f"epoch-{epoch:03d}.npz"
        np.savez(path, val_loss=np.float64(val_loss), w0000=np.zeros(2))
        os.utime(path, (launched + 10 * epoch, launched + 10 * epoch))
    ends, holders = tta.keras_epoch_ends(tmp_path, launched)
    assert [(e.epoch, e.seconds, e.model) for e in ends] == [
        (1, 10.0, "epoch-001.npz"),
        (2, 20.0, "epoch-001.npz"),
        (3, 30.0, "epoch-003.npz"),
    ]
    assert holders == {"epoch-001.npz": tmp_path / "epoch-001.npz", "epoch-003.npz": tmp_path / "epoch-003.npz"}


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
        assert [e["epoch"] for e in row["epochs"]] == [1, 2]
        times = [seconds for seconds, _ in row["curve"]]
        assert len(times) == 2 and 0 < times[0] < times[1] <= row["process_seconds"]
        for _, top1 in row["curve"]:
            assert 0.0 <= top1 <= 1.0
            assert abs(top1 * 100 - round(top1 * 100)) < 1e-4  # a fraction of the 100 tiny test images
    for row in rows[1:]:  # ours ran to its end: its own test of the final (best) model is the curve's last point
        metrics = json.loads((out / "runs" / f"{row['peer']}-round1" / "metrics.json").read_text())
        assert row["curve"][-1][1] == metrics["test"]["top1"]

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
