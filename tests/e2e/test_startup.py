"""Start-up: what every run pays before its first step is paid once where it can be shared, and not at all
where it is not needed (timm and torchvision cost seconds to import)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceiver.data import ImageFolderSource
from perceiver.experiment import build
from perceiver.models import Perceiver
from perceiver.training import TrainSettings
from perceiver.training.device import peak_signature
from tests.helpers import REPO, run_script, write_image_folder


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


def test_the_matmul_peak_is_timed_once_per_machine_through_the_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process (a fresh `_matmul_peaks`) reads the peak a first one timed; an unreadable cache file is timed
    again and rewritten; a folder that cannot be written still gives a peak."""
    timed: list[torch.dtype] = []
    monkeypatch.setattr(build, "matmul_peak", lambda device, dtype: timed.append(dtype) or 3e12)
    model = Perceiver(image_size=16, patch_size=4, num_classes=3, latent_dim=8, projection_dim=16, num_heads=2)
    settings = TrainSettings(device="cpu", peak_tflops="auto")

    def new_process_peak(cache_dir: Path | None) -> float:
        monkeypatch.setattr(build, "_matmul_peaks", {})
        return build.with_measured_peak(settings, model, torch.device("cpu"), cache_dir).peak_tflops

    cache = tmp_path / "cache"
    assert new_process_peak(cache) == 3.0 and timed == [torch.float32]
    assert new_process_peak(cache) == 3.0 and timed == [torch.float32]  # read, not timed
    entry = json.loads((cache / build.PEAK_CACHE_FILE).read_text())
    assert list(entry) == [peak_signature(torch.device("cpu"), torch.float32)]
    (cache / build.PEAK_CACHE_FILE).write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING):
        assert new_process_peak(cache) == 3.0 and len(timed) == 2
    assert caplog.text.count("is unreadable") == 1
    assert json.loads((cache / build.PEAK_CACHE_FILE).read_text())  # whole again
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    assert new_process_peak(blocked) == 3.0 and len(timed) == 3  # cannot be written: timed, no error
    assert new_process_peak(None) == 3.0 and len(timed) == 4  # cache_dir=null: timed in every process


def test_the_peak_signature_names_what_the_timing_depends_on() -> None:
    signature = peak_signature(torch.device("cpu"), torch.bfloat16)
    assert platform.node() in signature and torch.__version__ in signature and "torch.bfloat16" in signature
    assert f"{torch.get_num_threads()} threads" in signature
    assert signature != peak_signature(torch.device("cpu"), torch.float32)


EXIT_PROBE = """
import atexit, sys, threading
from perceiver.experiment.cli import exit_without_teardown
atexit.register(lambda: print("atexit handler ran", flush=False))
with open(sys.argv[1], "w") as file:
    file.write("written")
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (__import__("time").sleep(0.5), print("thread finished"))).start()
print("buffered", end="")
exit_without_teardown(3)
print(" after: a normal exit follows")
"""


@pytest.mark.parametrize("thread", [False, True], ids=["alone", "with a running thread"])
def test_exit_without_teardown_runs_the_atexit_handlers_and_flushes(tmp_path: Path, thread: bool) -> None:
    """It ends the process with the code given, after atexit handlers and the buffered output; with a non-daemon
    thread still running it returns, so that the interpreter's normal exit waits for the thread."""
    argv = [sys.executable, "-c", EXIT_PROBE, str(tmp_path / "out.txt"), "thread" if thread else "-"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
    assert (tmp_path / "out.txt").read_text() == "written"
    if thread:
        assert done.returncode == 0 and done.stdout.startswith("buffered after")
        assert "thread finished" in done.stdout and "atexit handler ran" in done.stdout
    else:
        assert done.returncode == 3 and done.stdout == "bufferedatexit handler ran\n", done.stderr


def test_objects_made_before_training_are_frozen_while_it_runs_and_the_collector_is_on() -> None:
    import gc

    from perceiver.training.device import objects_so_far_frozen

    was_enabled = gc.isenabled()
    gc.disable()  # as train.py leaves it after its start-up
    try:
        with objects_so_far_frozen():
            assert gc.isenabled() and gc.get_freeze_count() > 10_000  # this test process's modules, at least
        assert gc.get_freeze_count() == 0 and gc.isenabled()  # ordinary objects again, collected from now on
    finally:
        gc.enable() if was_enabled else gc.disable()


def test_train_py_starts_with_the_garbage_collector_off() -> None:
    code = "import gc, train; print(gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
