"""The benchmark's plumbing (no timing is asserted): one measurement process end to end, and the tables'
arithmetic on given rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.__main__ import scaling_table, throughput_table
from bench.measure import perceiver_kwargs
from bench.settings import SETTINGS
from perceiver import Perceiver
from perceiver.training.metrics import training_flops
from tests.conftest import REPO


@pytest.mark.slow
def test_measure_runs_this_project_and_counts_its_flops() -> None:
    command = [sys.executable, "-m", "bench.measure", "--impl", "ours", "--setting", "small", "--allocator", "keep"]
    command += ["--seconds", "0", "--min-steps", "1", "--warmup", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["allocator"] == "keep" and row["steps_timed"] >= 1 and row["images_per_second"] > 0
    model = Perceiver(**perceiver_kwargs(SETTINGS["small"]))
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["flops_per_step"] == training_flops(model, SETTINGS["small"].batch_size)  # counter == analytic


def row(impl: str, allocator: str, step_seconds: float, flops: float, label: str = "") -> dict:
    return {
        "impl": impl,
        "setting": "small",
        "allocator": allocator,
        "label": label or f"{impl} {allocator}",
        "images_per_second": 64 / step_seconds,
        "step_seconds": step_seconds,
        "flops_per_step": flops,
        "peak_memory_mib": 100.0,
    }


def test_throughput_table_ratios_and_utilisation() -> None:
    rows = [row("keras", "default", 0.4, 8e9), row("keras", "keep", 0.2, 8e9), row("ours", "keep", 0.1, 6e9)]
    table = throughput_table(rows, peak=100e9).splitlines()
    assert table[-1] == "| small | ours keep | 640 | 4.00 | 2.00 | 6.0 | 60% | 100 |"
    assert table[2].startswith("| small | keras default | 160 | 1.00 | 0.50 | 8.0 | 20% |")


def test_scaling_table_divides_vit_by_perceiver() -> None:
    rows = [
        {"model": "perceiver", "num_inputs": 16, "image_size": 32, "patch_size": 8, "step_seconds": 0.02},
        {"model": "vit", "num_inputs": 16, "image_size": 32, "patch_size": 8, "step_seconds": 0.01},
        {"model": "perceiver", "num_inputs": 4096, "image_size": 64, "patch_size": 1, "step_seconds": 0.3},
        {"model": "vit", "num_inputs": 4096, "image_size": 64, "patch_size": 1, "step_seconds": 9.0},
    ]
    lines = scaling_table(rows).splitlines()
    assert lines[2] == "| 16 | 32 | 8 | 20.0 | 10.0 | 0.5 |"
    assert lines[3] == "| 4096 | 64 | 1 | 300.0 | 9000.0 | 30.0 |"


# ----------------------------------------------------------------------------- the digits benchmark


def test_the_digits_folders_hold_every_image_once_upscaled_in_its_class_folder(tmp_path) -> None:
    """On a tiny fake set of 8x8 images (no scikit-learn needed): a seeded test split, one PNG per image."""
    import numpy as np
    from PIL import Image

    from bench.digits import write_digit_folders

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    train, test = write_digit_folders(images, labels, tmp_path / "digits", size=32, test_fraction=0.2, seed=0)
    written = {p.name: p for p in [*train.rglob("*.png"), *test.rglob("*.png")]}
    assert len(list(test.rglob("*.png"))) == 2 and len(written) == 10
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = written[f"{index:04d}.png"]
        assert path.parent.name == str(label)
        expected = np.asarray(Image.fromarray(image, mode="L").resize((32, 32), Image.Resampling.BILINEAR))
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    stamps = {name: p.stat().st_mtime_ns for name, p in written.items()}
    write_digit_folders(images, labels, tmp_path / "digits", size=32, test_fraction=0.2, seed=0)
    assert {name: p.stat().st_mtime_ns for name, p in written.items()} == stamps  # a rerun rewrites nothing


def test_the_digits_table_gives_the_median_ratio_and_its_range() -> None:
    from bench.digits import table

    rows = [
        {"pair": 1, "ours_s": 40.0, "keras_s": 80.0, "ratio": 2.0, "ours_top1": 0.9, "keras_top1": 0.8},
        {"pair": 2, "ours_s": 50.0, "keras_s": 75.0, "ratio": 1.5, "ours_top1": 0.91, "keras_top1": 0.82},
        {"pair": 3, "ours_s": 40.0, "keras_s": 70.0, "ratio": 1.75, "ours_top1": 0.9, "keras_top1": 0.81},
    ]
    lines = table(rows).splitlines()
    assert lines[2] == "| 1 | 40.0 | 80.0 | 2.00 | 0.9000 | 0.8000 |"
    assert lines[-1] == "median ratio 1.75 (range 1.50-2.00)"
