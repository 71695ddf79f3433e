"""End to end through the real entry point: `python train.py ...` in a subprocess, and `train()` in-process."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from perceiver import Perceiver, TrainSettings
from perceiver.experiment.run import train
from perceiver.training.metrics import training_flops
from tests.helpers import run_script, write_image_folder
from tests.helpers.wandb_files import read_offline_run

SMOKE = ["experiment=cpu_smoke"]


def run_train(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("train.py", *overrides, timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_run_learns_and_writes_its_outputs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(*SMOKE, "logger.mode=offline", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test) >= {"top1", "top5", "loss"}
    assert all(0.0 <= test[k] <= 1.0 for k in ("top1", "top5"))
    assert test["top1"] > 0.5, f"synthetic task (10 classes, chance 0.1) not learned: {test}"
    assert test["top5"] >= test["top1"]
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] == 6
    assert metrics["images_per_second"] > 0
    assert metrics["settings"]["model"]["latent_dim"] == 16
    assert len(metrics["history"]) == 6
    for name in ("best.pt", "last.pt", "config.yaml"):
        assert (run_dir / name).is_file(), name
    best = torch.load(run_dir / "best.pt", weights_only=False)
    assert best["epoch"] == metrics["best_epoch"]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1, "W&B offline run files missing"
    recorded = read_offline_run(offline_runs[0])  # what W&B itself wrote, decoded from its protobufs
    assert recorded.run_id == metrics["wandb_run_id"] and recorded.exit_code == 0
    assert recorded.config["model"]["latent_dim"] == 16 and recorded.config["seed"] == metrics["settings"]["seed"]
    assert [row["epoch"] for row in recorded.history] == [1, 2, 3, 4, 5, 6]
    for row, logged in zip(metrics["history"], recorded.history, strict=True):
        assert logged["val/loss"] == pytest.approx(row["val/loss"]) and logged["lr"] == pytest.approx(row["lr"])
    assert recorded.summary["test/top1"] == pytest.approx(test["top1"])


@pytest.mark.slow
def test_multirun_over_two_values_makes_two_job_directories(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "--multirun",
        *SMOKE,
        "logger=none",
        "trainer.epochs=1",
        "model.num_iterations=1,2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert [p.name for p in jobs] == ["0", "1"]
    iterations = [json.loads((job / "metrics.json").read_text())["settings"]["model"]["num_iterations"] for job in jobs]
    assert iterations == [1, 2]


@pytest.mark.slow
def test_bad_setting_exits_fast_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    result = run_train(*SMOKE, "model.patch_size=3", "logger=none", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert "model.image_size=16 is not divisible by patch_size=3" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_train_in_process_returns_the_metrics_it_writes(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(*SMOKE, "logger=none", "trainer.epochs=2", "trainer.save_checkpoints=false")
    metrics = train(cfg, run_dir=tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == metrics["test"]
    assert not (tmp_path / "best.pt").exists()


def test_history_logs_model_flop_utilisation(compose_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = compose_config(*SMOKE, "logger=none", "trainer.epochs=1", "trainer.save_checkpoints=false")
    cfg.trainer.peak_tflops = 0.5
    row = train(cfg, run_dir=tmp_path)["history"][0]
    fields = {k: v for k, v in cfg.model.items() if k != "_target_"}
    per_image = training_flops(Perceiver(**fields), cfg.trainer.batch_size) / cfg.trainer.batch_size
    assert row["perf/tflops"] == pytest.approx(row["images_per_second"] * per_image / 1e12)
    assert row["perf/mfu"] == pytest.approx(row["perf/tflops"] / 0.5)


@pytest.mark.parametrize("peak", [0, -1.0, "fast", True])
def test_bad_peak_tflops_is_refused(peak: object) -> None:
    with pytest.raises(ValueError, match=r"trainer\.peak_tflops"):
        TrainSettings(peak_tflops=peak, device="cpu")


def test_same_seed_same_result(compose_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = compose_config(*SMOKE, "logger=none", "trainer.epochs=1", "trainer.save_checkpoints=false")
    first = train(cfg, run_dir=tmp_path)["test"]
    second = train(cfg, run_dir=tmp_path)["test"]
    assert first == second


@pytest.mark.parametrize(
    "extra",
    [
        ["augmentation=mixup"],
        ["augmentation=randaugment"],
        ["scheduler=cosine", "optimizer=lamb", "model.position_encoding=fourier", "model.weight_sharing=none"],
        ["IMAGEFOLDER"],
    ],
    ids=["mixup", "randaugment", "cosine-lamb-fourier-unshared", "imagefolder"],
)
def test_other_pipelines_train_end_to_end(
    compose_config: Callable[..., DictConfig], tmp_path: Path, extra: list[str]
) -> None:
    if extra == ["IMAGEFOLDER"]:
        extra = [
            "data=imagefolder",
            f"data.source.path={write_image_folder(tmp_path / 'images', per_class=10, size=(20, 18))}",
            "data.source.image_size=16",
        ]
    cfg = compose_config(
        *SMOKE, *extra, "logger=none", "trainer.epochs=2", "trainer.num_workers=0", "trainer.save_checkpoints=false"
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert all(0.0 <= metrics["test"][k] <= 1.0 for k in ("top1", "top5"))
    assert math.isfinite(metrics["test"]["loss"])


@pytest.mark.slow
def test_a_plain_multirun_leaves_its_summary_table_and_plot(tmp_path: Path) -> None:
    """The summary is a Hydra callback: `python train.py --multirun` alone writes it, mean and std over seeds."""
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "--multirun", *SMOKE, "logger=none", "trainer.epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    top1 = [json.loads((sweep_dir / str(n) / "metrics.json").read_text())["test"]["top1"] for n in (0, 1)]
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert table[0] == "| n | top-1 | top-5 | loss | params |"
    mean, std = sum(top1) / 2, abs(top1[0] - top1[1]) / 2**0.5
    assert table[2].startswith(f"| 2 | {mean:.4f} ± {std:.4f} |")
    assert (sweep_dir / "top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 finished, 0 failed, 0 incomplete of 2 jobs" in result.stdout


@pytest.mark.slow
def test_files_an_operating_system_makes_in_an_image_folder_are_skipped_silently(tmp_path: Path) -> None:
    """Thumbs.db, desktop.ini, .DS_Store, ._* (AppleDouble), hidden files and folders, __MACOSX: not the user's
    images, so neither an error under data.source.bad_files=error nor a class, an image or a warning."""
    folder = write_image_folder(tmp_path / "images", ["cat", "dog"], per_class=5, size=(8, 8))
    write_image_folder(folder / "cat" / ".thumbnails", ["small"], per_class=2, size=(4, 4))  # a hidden folder's images
    write_image_folder(folder / ".ipynb_checkpoints", ["cat"], per_class=1, size=(8, 8))  # not a class
    (folder / "__MACOSX" / "cat").mkdir(parents=True)
    for junk in ("Thumbs.db", "desktop.ini", ".DS_Store", "._0.png", ".hidden.png"):
        (folder / "cat" / junk).write_bytes(b"\x00\x05\x16\x07 not an image")
    (folder / "dog" / "THUMBS.DB").write_bytes(b"\x00")
    run_dir = tmp_path / "run"
    result = run_train(
        *SMOKE,
        "data=imagefolder",
        f"data.source.path={folder}",
        "data.source.image_size=16",
        "trainer.epochs=1",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "data: 8 train / 1 val / 1 test images, 2 classes" in output, output[-3000:]
    assert "WARNING" not in output and "Thumbs" not in output, output[-3000:]
    assert (run_dir / "metrics.json").is_file()
