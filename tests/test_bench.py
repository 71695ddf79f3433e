"""The benchmark's plumbing (no timing is asserted): one measurement process end to end, and the tables'
arithmetic on given rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import scaling_table, throughput_table
from bench.gpu import sdpa_backends
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
