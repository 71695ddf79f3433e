"""The benchmark's plumbing (no timing is asserted): one measurement process end to end, and the tables'
arithmetic on given rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pairs
from bench.gpu import sdpa_backends
from bench.measure import perceiver_kwargs
from bench.settings import SETTINGS
from bench.suite import scaling_table, throughput_table
from perceiver import Perceiver
from perceiver.training.metrics import training_flops
from tests.helpers import REPO


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


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_tiny_cpu_mode(tmp_path: Path) -> None:
    """`python -m bench gpu` end to end (tiny without CUDA): a compiled and an eager row, table and JSON."""
    command = [sys.executable, "-m", "bench", "gpu", "--tiny", "--rows", "bf16+compile", "tf32", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["tiny"] and [row["row"] for row in results["rows"]] == ["bf16+compile", "tf32"]
    compiled, eager = results["rows"]
    assert compiled["compile_seconds"] is not None and compiled["graphs"] >= 1 and eager["compile_seconds"] is None
    for row in results["rows"]:
        assert row["images_per_second"] == pytest.approx(row["train_images"] / row["epoch_seconds"], rel=1e-6)
        assert row["mfu"] > 0 and row["sdpa"]
    assert "| bf16+compile | bf16 autocast | torch.compile (eager) |" in (tmp_path / "gpu.md").read_text()


def test_sdpa_backends_are_named_from_profiler_events() -> None:
    flash = {"aten::_scaled_dot_product_flash_attention", "void pytorch_flash::flash_fwd_kernel<...>"}
    assert sdpa_backends(flash) == "flash"
    assert sdpa_backends({"aten::_scaled_dot_product_efficient_attention", "aten::mm"}) == "memory-efficient"
    assert sdpa_backends(flash | {"fmha_cutlassF_f32_aligned_64x64_rf_sm80"}) == "flash + memory-efficient"
    assert sdpa_backends({"aten::bmm", "aten::softmax"}) == "none (attention spelled out)"


def pair_row(pair: int, peer: str, step_seconds: float, faults: float = 10.0) -> dict:
    return {
        "setting": "small",
        "condition": "same allocator (environment)",
        "pair": pair,
        "peer": peer,
        "step_seconds": step_seconds,
        "minor_faults_per_step": faults,
        "peak_memory_mib": 100.0 + pair,
    }


def test_pairs_run_interleaved_and_ratios_are_taken_within_each_pair() -> None:
    calls = []

    def fake_measure(peer: pairs.Peer, setting: str, seconds: float) -> dict:
        calls.append(peer.label)
        return {"step_seconds": 0.1, "minor_faults_per_step": 0.0}

    condition = pairs.CONDITIONS[0]
    rows = pairs.run_pairs(condition, "small", 3, 0.0, measure=fake_measure)
    assert calls == [pairs.KERAS, pairs.OURS] * 3  # A B A B A B
    assert [row["pair"] for row in rows] == [1, 1, 2, 2, 3, 3]
    rows = [pair_row(1, "Keras example", 0.30), pair_row(1, "this project", 0.20)]
    rows += [pair_row(2, "Keras example", 0.60), pair_row(2, "this project", 0.50)]
    rows += [pair_row(3, "Keras example", 0.20), pair_row(3, "this project", 0.10)]
    assert pairs.ratios(rows, "this project") == pytest.approx([1.5, 1.2, 2.0])
    ours = pairs.summary_rows(rows)[1]
    assert (ours["ratio"], ours["low"], ours["high"], ours["pairs"]) == pytest.approx((1.5, 1.2, 2.0, 3))
    assert ours["step_seconds"] == pytest.approx(0.2) and ours["peak_memory_mib"] == 103.0
    table = pairs.pairs_table(pairs.summary_rows(rows)).splitlines()
    assert (
        table[3] == "| small | same allocator (environment) | this project | 3 | 1.50 | 1.20-2.00 | 200.0 | 10 | 103 |"
    )


def test_every_condition_gives_both_peers_the_same_allocator() -> None:
    out_of_the_box, environment, mallopt = pairs.CONDITIONS
    assert all(peer.env == pairs.ENV_ALLOCATOR and "--allocator" not in peer.args for peer in environment.peers)
    assert all(peer.args[:2] == ("--allocator", "keep") and not peer.env for peer in mallopt.peers)
    keras, ours = out_of_the_box.peers
    assert not keras.args and not keras.env and ours.args == ("--allocator", "keep")  # what train.py does


@pytest.mark.slow
def test_a_peer_process_gets_its_allocator_environment_and_reports_it() -> None:
    peer = pairs.Peer("this project", "ours", ("--min-steps", "1", "--warmup", "0"), pairs.ENV_ALLOCATOR)
    row = pairs.measure_process(peer, "small", 0.0)
    faults = row["minor_faults_per_step"] * row["steps_timed"]  # a count of page faults, spread over the steps
    assert row["allocator"] == "env" and faults >= 0 and faults == pytest.approx(round(faults))


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
