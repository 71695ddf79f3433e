"""Checkpoints in-process: atomic writes, rotation, damaged files, RNG state, config checks, exact
mid-epoch resume of `fit`, and the non-finite loss policies."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from perceiver import BatchAugment, Perceiver, TrainSettings, fit
from perceiver.experiment.resume import resumed_config
from perceiver.training import TrainingParts, TrainState
from perceiver.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    checkpoint_files,
    load_newest,
    locate,
    read_checkpoint,
    save_atomic,
)
from perceiver.training.state import restore_rng, rng_states
from perceiver.training.stopping import NonFiniteLossError
from tests.test_engine import tiny_problem

TIMING = ("images_per_second", "epoch_seconds", "perf/tflops", "perf/mfu")  # wall-clock figures


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


def test_resumed_config_applies_overrides_and_refuses_another_model(compose_config) -> None:
    saved = OmegaConf.to_container(compose_config("experiment=cpu_smoke"), resolve=True)
    current = compose_config("trainer.epochs=9")  # `python train.py resume=DIR trainer.epochs=9`
    config = resumed_config(saved, current, ["resume=/x", "trainer.epochs=9"], ["experiment=cpu_smoke"])
    assert config.trainer.epochs == 9 and config.model.latent_dim == 16  # the rest is the checkpoint's
    with pytest.raises(CheckpointError) as error:
        resumed_config(saved, compose_config("model.latent_dim=8"), ["model.latent_dim=8"], [])
    assert "model.latent_dim (16 in the checkpoint, 8 now)" in str(error.value)
    with pytest.raises(CheckpointError, match=re.escape("experiment=keras_cifar100 cannot be changed")):
        resumed_config(saved, compose_config("experiment=keras_cifar100"), ["experiment=keras_cifar100"], [])
    with pytest.raises(CheckpointError, match=re.escape("trainer.batch_size (64 in the checkpoint, 32 now)")):
        resumed_config(saved, compose_config("experiment=cpu_smoke", "trainer.batch_size=32"), None, [])


# ----------------------------------------------------------------------------- fit


def tiny_fit(run_dir: Path, resume: dict | None = None, model: torch.nn.Module | None = None, **settings):
    torch.manual_seed(0)
    model = model or Perceiver(
        image_size=8, patch_size=4, num_classes=2, latent_dim=4, projection_dim=8, num_heads=1, dropout_rate=0.2
    )
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    train, val = tiny_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    options = {"epochs": 3, "progress_bar": False, "device": "cpu", "early_stopping_patience": None, **settings}
    parts = TrainingParts(model, augment, optimizer, scheduler, num_classes=2)
    state = TrainState.from_dict(resume) if resume is not None else None
    result = fit(parts, train, val, TrainSettings(**options), run_dir, resume=state)
    return result, model


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def test_fit_resumed_mid_epoch_ends_exactly_like_an_uninterrupted_fit(tmp_path: Path) -> None:
    """3 batches per epoch, a checkpoint every 2 steps: step 4 is epoch 2, batch 1 (dropout, augmentation,
    data order and a part-done epoch's metric sums all have to be restored)."""
    whole, whole_model = tiny_fit(tmp_path / "whole")
    tiny_fit(tmp_path / "part", checkpoint_every_n_steps=2, keep_checkpoints=10)
    state = read_checkpoint(tmp_path / "part" / "checkpoints" / "step-00000004.pt")
    assert (state["next_epoch"], state["next_batch"]) == (2, 1)
    torch.manual_seed(123)  # whatever the generators hold now must not matter
    resumed, resumed_model = tiny_fit(tmp_path / "part", resume=state)
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert (resumed.best_epoch, resumed.best_val) == (whole.best_epoch, whole.best_val)
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


class NaNAtCall(Perceiver):
    """Returns NaN logits on its `bad_call`-th training forward pass."""

    def __init__(self, bad_call: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call:
                return logits * math.nan
        return logits


def nan_model() -> NaNAtCall:
    return NaNAtCall(5, image_size=8, patch_size=4, num_classes=2, latent_dim=4, projection_dim=8, num_heads=1)


def test_a_nan_loss_stops_naming_epoch_and_step_after_saving_the_last_good_state(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as error:
        tiny_fit(tmp_path, model=nan_model())
    message = str(error.value)
    assert "at epoch 2, step 5 (batch 2 of 3)" in message and "trainer.nonfinite_loss=skip" in message
    state = read_checkpoint(tmp_path / "checkpoints" / "step-00000004.pt")
    assert f"saved in {tmp_path / 'checkpoints' / 'step-00000004.pt'}" in message
    assert (state["next_epoch"], state["next_batch"], state["global_step"]) == (2, 1, 4)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_skip_policy_skips_the_nan_step_and_counts_it(tmp_path: Path) -> None:
    result, model = tiny_fit(tmp_path, model=nan_model(), nonfinite_loss="skip")
    assert [row["train/skipped_steps"] for row in result.history] == [0, 1, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
