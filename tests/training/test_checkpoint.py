"""Checkpoint files (perceiver/training/checkpoint.py, state.py): atomic writes, rotation, damaged files, finding
what to resume from, and the random generators' state. (`fit`'s exact resume: tests/training/test_loop.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    checkpoint_files,
    load_newest,
    locate,
    read_checkpoint,
    save_atomic,
)
from perceiver.training.state import TrainState, restore_rng, rng_states


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_atomic(path, {"value": torch.tensor([1.0])})
    real_save = torch.save

    def crash_half_way(state: object, file: object) -> None:
        real_save(state, file)
        file.truncate(10)  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_atomic(path, {"value": torch.tensor([2.0])})
    assert torch.load(path)["value"].item() == 1.0


def test_checkpointer_keeps_the_newest_and_links_last_pt(tmp_path: Path) -> None:
    checkpoints = Checkpointer(tmp_path, keep=2)
    for step in (5, 10, 15):
        checkpoints.save({"step": step}, step)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000015.pt", "step-00000010.pt"]
    assert torch.load(tmp_path / "last.pt")["step"] == 15


def checkpoint_state(step: int) -> dict:
    return {"format": "perceiver-checkpoint", "version": 1, "step": step}


def test_a_truncated_checkpoint_is_refused_naming_the_intact_previous_one(tmp_path: Path) -> None:
    checkpoints = Checkpointer(tmp_path, keep=3)
    older = checkpoints.save(checkpoint_state(1), 1)
    newest = checkpoints.save(checkpoint_state(2), 2)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError) as error:
        load_newest(checkpoint_files(tmp_path))
    message = str(error.value)
    assert f"{newest} is truncated or corrupt" in message
    assert f"resume={older}" in message


def test_weights_only_files_are_not_resumable(tmp_path: Path) -> None:
    save_atomic(tmp_path / "best.pt", {"model": {}, "epoch": 1})
    with pytest.raises(CheckpointError, match="not a resumable checkpoint"):
        read_checkpoint(tmp_path / "best.pt")


def test_locate_reports_a_finished_run_and_explains_an_empty_one(tmp_path: Path) -> None:
    assert locate(None, tmp_path) is None and locate("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        locate(str(tmp_path), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        locate(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "metrics.json").write_text('{"test": {"top1": 0.5}}')
    assert locate(str(tmp_path), tmp_path).finished == {"test": {"top1": 0.5}}


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_atomic(tmp_path / "rng.pt", {"rng": rng_states()})
    expected = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2]) and expected[3] == again[3]


def minimal_state() -> dict:
    return TrainState({}, {}, None, {}, {"best_loss": 1.0, "best_epoch": 1}, {}, []).to_dict()


def test_a_checkpoint_written_before_the_ema_field_loads_without_one() -> None:
    state = minimal_state()
    del state["ema"]
    assert TrainState.from_dict(state).ema is None


@pytest.mark.parametrize("field", ["history", "optimizer", "wandb_run_id"])
def test_a_checkpoint_lacking_any_other_field_is_refused_naming_it(field: str) -> None:
    state = minimal_state()
    del state[field]
    with pytest.raises(CheckpointError, match=f"last.pt lacks {field}: it is incomplete or from another program"):
        TrainState.from_dict(state, "last.pt")
