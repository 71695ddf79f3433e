"""Start-up: what every run pays before its first step is paid once where it can be shared, and not at all
where it is not needed (timm and torchvision cost seconds to import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceiver.data import ImageFolderSource
from perceiver.experiment import build
from perceiver.models import Perceiver
from perceiver.training import TrainSettings
from tests.conftest import REPO
from tests.helpers import run_script, write_image_folder


def test_the_matmul_peak_is_timed_once_per_device_and_precision_in_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs of a sweep in one process (Hydra's basic launcher) share one ~1 s timing."""
    timed: list[tuple[str, torch.dtype]] = []
    monkeypatch.setattr(build, "_matmul_peaks", {})
    monkeypatch.setattr(build, "matmul_peak", lambda device, dtype: timed.append((str(device), dtype)) or 2e12)
    model = Perceiver(image_size=16, patch_size=4, num_classes=3, latent_dim=8, projection_dim=16, num_heads=2)
    for precision in ("fp32", "fp32", "bf16", "fp32"):
        settings = TrainSettings(device="cpu", precision=precision, peak_tflops="auto")
        assert build.with_measured_peak(settings, model, torch.device("cpu")).peak_tflops == 2.0
    assert timed == [("cpu", torch.float32), ("cpu", torch.bfloat16)]


def test_a_warm_image_folder_start_imports_neither_timm_nor_torchvision(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=5)
    ImageFolderSource(str(folder), image_size=8, cache_dir=str(tmp_path / "cache")).load()  # the cold run
    code = (
        "import sys; from perceiver.data import ImageFolderSource; from perceiver.models import Perceiver; "
        "from perceiver.training.optimizers import create_optimizer; import perceiver.experiment.build; "
        f"train, _ = ImageFolderSource({str(folder)!r}, image_size=8, cache_dir={str(tmp_path / 'cache')!r}).load(); "
        "create_optimizer(Perceiver(image_size=8, patch_size=4, num_classes=3), 'adam', lr=1e-3); "
        "print(type(train).__name__, sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "ArrayDataset []"


@pytest.mark.slow
def test_bench_startup_times_every_stage_up_to_the_first_step(tmp_path: Path) -> None:
    done = run_script(
        "-m", "bench", "startup", "experiment=cpu_smoke", "logger=none", "trainer.peak_tflops=auto",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| stage |") :].splitlines()
    stages = [line.split(" | ")[0].lstrip("| ") for line in table[2:]]
    for stage in ("import torch", "build_parts: data.source", "build_parts: optimizer", "with_measured_peak"):
        assert stage in stages
    assert stages[-1] == "**until the first training step**"
    seconds = [float(line.split(" | ")[1].strip("* ")) for line in table[2:]]
    assert seconds[-1] == pytest.approx(sum(seconds[:-1]), abs=0.02) and min(seconds) >= 0
    assert not (tmp_path / "run" / "metrics.json").exists()  # stopped at the first step
