"""Kill real `python train.py` runs (SIGKILL mid-epoch; SIGTERM as a scheduler's preemption does) and
resume them: they must end with exactly the metrics of an uninterrupted run with the same seed (CPU,
deterministic mode), and the W&B run must go on under the same id without logging an epoch twice."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import REPO, environment
from tests.helpers.wandb_files import read_offline_run

# 800 images, 10% for validation: 720 / 32 = 23 steps per epoch, so epoch 2 is steps 24-46 and step 30
# (a checkpoint every 5 steps) is in its middle.
SETTINGS = [
    "experiment=cpu_smoke",
    "trainer.epochs=4",
    "data.source.num_train=800",
    "trainer.batch_size=32",
    "trainer.checkpoint_every_n_steps=5",
    "trainer.deterministic=true",
]
MID_EPOCH_2 = "step-00000030.pt"
TIMING = ("images_per_second", "epoch_seconds", "perf/tflops", "perf/mfu")  # wall-clock figures


def start(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "train.py", *SETTINGS, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll for a checkpoint file; fail at once if the run ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before writing {path.name}:\n{finish(process)[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {path.name} after {timeout} s")
        time.sleep(0.01)


def comparable(run_dir: Path) -> dict[str, Any]:
    """metrics.json without wall-clock figures."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [{k: v for k, v in row.items() if k not in TIMING} for row in metrics["history"]]
    keys = ("test", "best_epoch", "best_val", "epochs_run", "stopped_early")
    return {**{k: metrics[k] for k in keys}, "history": history}


def resume(run_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "train.py", f"resume={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("uninterrupted")
    env = environment(PERCEIVER_DATA_ROOT=str(root / "data"), WANDB_MODE="disabled")
    process = start(root / "run", "logger=none", env=env)
    output = finish(process)
    assert process.returncode == 0, output[-3000:]
    return comparable(root / "run")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    process = start(run_dir, "logger=none")
    wait_for(run_dir / "checkpoints" / MID_EPOCH_2, process)
    process.kill()  # SIGKILL: no handler, no last save; what is on disk is all there is
    finish(process)
    assert process.returncode == -signal.SIGKILL and not (run_dir / "metrics.json").exists()

    output = resume(run_dir)
    position = re.search(r"resuming at epoch (\d+), batch (\d+)", output)
    assert position and position[1] == "2" and int(position[2]) > 0, output[-3000:]  # mid-epoch 2
    assert comparable(run_dir) == uninterrupted


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_resume_continues_the_wandb_run(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    process = start(run_dir, "logger.mode=offline")
    wait_for(run_dir / "checkpoints" / MID_EPOCH_2, process)
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    assert f"resume with: python train.py resume={run_dir}" in output
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["next_epoch"] == 2 and saved["next_batch"] > 0  # saved at a step boundary inside epoch 2
    step_file = run_dir / "checkpoints" / f"step-{saved['global_step']:08d}.pt"
    assert f"checkpoint saved to {step_file}" in output

    resume(run_dir)
    assert comparable(run_dir) == uninterrupted
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["overrides"][: len(SETTINGS)] == SETTINGS  # the original run's overrides are kept
    run_id = metrics["wandb_run_id"]
    first, second = (read_offline_run(f) for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")))
    assert first.run_id == second.run_id == run_id  # one W&B run, continued
    assert first.exit_code == 128 + signal.SIGTERM and second.exit_code == 0
    logged = [row["epoch"] for row in first.history] + [row["epoch"] for row in second.history]
    assert logged == [1, 2, 3, 4]  # every epoch once: none lost, none twice
    assert second.summary["test/top1"] == uninterrupted["test"]["top1"]


# ----------------------------------------------------------------------------- a checkpoint is data, never code

CRAFTED = {  # what a checkpoint someone hands you could make `resume=` run, each aimed at the file VICTIM
    "open-for-writing": ("optimizer", {"_target_": "builtins.open", "file": "VICTIM", "mode": "w"}),
    "remove-through-a-module": ("scheduler", {"_target_": "perceiver.files.os.remove", "path": "VICTIM"}),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unfinished run per CRAFTED entry whose checkpoints' config names that target."""
    from tests.helpers.runs import train_run

    root = tmp_path_factory.mktemp("crafted")
    train_run(root / "run", "trainer.epochs=1", "data.source.num_train=200")
    (root / "run" / "metrics.json").unlink()  # as if it had stopped before the test evaluation
    for name, (group, node) in CRAFTED.items():
        shutil.copytree(root / "run", root / name)
        (root / name / "victim.txt").write_text("precious")
        for path in [root / name / "last.pt", *(root / name / "checkpoints").glob("*.pt")]:
            state = torch.load(path, weights_only=True)
            state["config"][group] = {
                k: str(root / name / "victim.txt") if v == "VICTIM" else v for k, v in node.items()
            }
            path.unlink()  # last.pt is a hard link to the newest checkpoint: write each file afresh
            torch.save(state, path)
    return root


@pytest.mark.slow
def test_a_checkpoint_whose_config_names_other_code_is_refused_before_anything_runs(crafted: Path) -> None:
    def resume(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "train.py", f"resume={crafted / name}", "logger=none", f"hydra.run.dir={crafted / 'out'}"],
            cwd=REPO,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CRAFTED, pool.map(resume, CRAFTED), strict=True))
    for name, result in results.items():
        group, node = CRAFTED[name]
        output = result.stdout + result.stderr
        assert (crafted / name / "victim.txt").read_text() == "precious", output[-3000:]
        assert result.returncode == 2, output[-3000:]
        assert f"{group}._target_={node['_target_']!r} is refused" in output, output[-3000:]
        assert "Traceback" not in output and "trainable parameters" not in output, output[-3000:]
