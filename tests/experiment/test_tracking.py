"""W&B mode resolution, offline runs as W&B records them, and failures that must not stop training."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perceiver.experiment.tracking import NullTracker, WandbTracker, has_wandb_credentials, resolve_mode
from tests.helpers import REPO, environment
from tests.helpers.wandb_files import read_offline_run


def test_auto_mode_is_offline_without_credentials() -> None:
    assert not has_wandb_credentials()
    assert resolve_mode("auto") == "offline"


def test_auto_mode_is_online_with_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"


def test_auto_mode_reads_netrc_for_the_configured_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.example.org\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "offline"  # the key is for another host than api.wandb.ai
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert resolve_mode("auto") == "online"


def test_explicit_modes_win_and_bad_modes_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("offline") == "offline" and resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match=re.escape("logger.mode='sometimes'")):
        resolve_mode("sometimes")


def test_offline_run_records_config_history_and_summary(tmp_path: Path) -> None:
    tracker = WandbTracker(
        config={"model": {"latent_dim": 8}}, run_dir=tmp_path, mode="offline", group="g1", name="n1", tags=["t"]
    )
    for epoch in (1, 2):
        tracker.log({"val/loss": 1.0 / epoch}, step=epoch)
    tracker.summarize({"test/top1": 0.5})
    tracker.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = read_offline_run(run_file)
    assert (run.run_id, run.group, run.name, run.tags) == (tracker.run_id, "g1", "n1", ["t"])
    assert run.config["model"] == {"latent_dim": 8}
    assert [row["val/loss"] for row in run.history] == [1.0, 0.5]
    assert run.summary["test/top1"] == 0.5 and run.exit_code == 0


class BrokenRun:
    id = "broken"

    def log(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("service unavailable")

    def finish(self, *args: object, **kwargs: object) -> None:
        raise ConnectionError("service unavailable")


def test_a_failing_wandb_call_warns_once_and_turns_tracking_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = WandbTracker(config={}, run_dir=tmp_path, mode="disabled")
    tracker.run = BrokenRun()
    tracker.log({"loss": 1.0}, step=1)  # must not raise
    tracker.log({"loss": 0.5}, step=2)
    tracker.summarize({"test/top1": 0.1})
    tracker.finish()
    warnings = [r for r in caplog.records if "W&B tracking is off" in r.getMessage()]
    assert len(warnings) == 1 and "service unavailable" in warnings[0].getMessage()
    assert tracker.run is None


def test_a_failing_wandb_init_does_not_stop_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wandb

    def refuse(**kwargs: object) -> None:
        raise PermissionError("bad credentials")

    monkeypatch.setattr(wandb, "init", refuse)
    tracker = WandbTracker(config={}, run_dir=tmp_path, mode="online")
    assert tracker.run is None
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()


def test_null_tracker_accepts_the_wandb_settings_and_refuses_others() -> None:
    tracker = NullTracker(config={}, run_dir=Path("."), mode="disabled", project="p")
    tracker.log({"a": 1}, step=1)
    tracker.finish()
    with pytest.raises(TypeError, match="projcet"):
        NullTracker(config={}, run_dir=Path("."), projcet="p")


def test_a_wandb_failure_mid_run_goes_on_in_an_offline_run_of_the_same_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = WandbTracker(config={}, run_dir=tmp_path, mode="disabled")
    tracker.mode, tracker.run_id, tracker.run = "online", "brokenrun1", BrokenRun()
    tracker._init_args = {"project": "perceiver", "config": {"seed": 1}, "dir": str(tmp_path)}
    for epoch in (1, 2, 3):
        tracker.log({"val/loss": 1.0 / epoch}, step=epoch)  # the first call fails, and is repeated offline
    tracker.finish()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "service unavailable" in warnings[0] and "wandb sync" in warnings[0]
    (run_file,) = tmp_path.glob("wandb/offline-run-*-brokenrun1/run-*.wandb")
    run = read_offline_run(run_file)
    assert run.run_id == "brokenrun1" and [row["val/loss"] for row in run.history] == [1.0, 0.5, 1 / 3]


@pytest.mark.slow
def test_unreachable_wandb_server_in_online_mode_trains_on_and_keeps_an_offline_run(tmp_path: Path) -> None:
    """Online mode, a key, and a base URL where nothing listens: W&B cannot start, training must not care."""
    run_dir = tmp_path / "run"
    env = environment(WANDB_API_KEY="k" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=cpu_smoke",
            "trainer.epochs=2",
            "data.source.num_train=200",
            "logger.mode=online",
            "logger.init_timeout=5",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert time.monotonic() - started < 120, "W&B's start-up wait is not bounded by logger.init_timeout"
    warnings = re.findall(r"WARNING\] - W&B: .*", output)
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0] and "wandb sync" in warnings[0], output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    recorded = read_offline_run(run_file)  # what `wandb sync` would upload
    assert recorded.run_id == metrics["wandb_run_id"] and recorded.exit_code == 0
    assert [row["epoch"] for row in recorded.history] == [1, 2]
    assert recorded.summary["test/top1"] == pytest.approx(metrics["test"]["top1"])
