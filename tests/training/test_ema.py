"""The weight EMA (perceiver/training/ema.py) against a hand recomputation, and `trainer.ema_decay`'s check.
(`fit` with an EMA: the weights it keeps and its exact resume, tests/training/test_loop.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perceiver.experiment.config import ConfigError, train_settings
from perceiver.training import TrainSettings
from perceiver.training.ema import WeightEMA
from perceiver.training.loop import Validation


def test_ema_follows_the_recurrence_computed_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    reference = {k: v.double().clone() for k, v in model.state_dict().items()}
    for n in range(1, 120):  # the warm-up's decays (2/11, 3/12, ...) until they reach 0.9 at n = 80
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        for key, value in model.state_dict().items():
            reference[key] = d * reference[key] + (1 - d) * value.double()
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value.double(), reference[key], rtol=1e-5, atol=1e-5)


def test_ema_copies_integer_buffers_and_never_trains() -> None:
    model = nn.BatchNorm1d(3)
    ema = WeightEMA(model, decay=0.99)
    model.num_batches_tracked += 7
    ema.update(model)
    assert ema.module.num_batches_tracked.item() == 7
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_an_update_with_unchanged_weights_moves_the_average_towards_them() -> None:
    """A skipped (non-finite) step leaves the weights alone; its update still counts and averages them in."""
    model = nn.Linear(2, 1, bias=False)
    ema = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 1: d = min(0.5, 2/11)
    before = ema.module.weight.clone()
    ema.update(model)  # n = 2: d = min(0.5, 3/12), the weights as they were
    torch.testing.assert_close(ema.module.weight, 0.25 * before + 0.75 * torch.ones(1, 2))
    assert ema.updates == 2


def test_a_restored_ema_continues_exactly() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.95)
    steps = [torch.randn(2, 3) for _ in range(10)]
    for delta in steps[:5]:
        model.weight.data += delta
        ema.update(model)
    restored = WeightEMA(nn.Linear(3, 2), decay=0.95)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5
    for delta in steps[5:]:
        model.weight.data += delta
        ema.update(model)
        restored.update(model)
    assert torch.equal(restored.module.weight, ema.module.weight)
    assert torch.equal(restored.module.bias, ema.module.bias)


@pytest.mark.parametrize("decay", [1.0, 0.0, -0.5, 1.5])
def test_ema_refuses_a_decay_outside_0_1(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(nn.Linear(2, 2), decay=decay)


@pytest.mark.parametrize("value", [1.0, 0, -0.1, 1.5, True, "high"])
def test_a_bad_ema_decay_is_refused_naming_the_setting_and_the_range(value: object) -> None:
    with pytest.raises(ValueError, match=r"trainer\.ema_decay=.* is invalid: a number between 0 and 1 \(exclusive\)"):
        TrainSettings(ema_decay=value)
    assert TrainSettings(ema_decay=0.999).ema_decay == 0.999 and TrainSettings().ema_decay is None


def test_a_bad_ema_decay_in_the_config_is_a_config_error_before_anything_is_built(compose_config) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.ema_decay=1\.5 is invalid"):
        train_settings(compose_config("trainer.ema_decay=1.5", "trainer.device=cpu"))


@pytest.mark.parametrize(("ema_loss", "kept"), [(0.4, True), (0.5, False), (0.6, False)])
def test_the_ema_is_the_candidate_only_when_its_loss_is_lower(ema_loss: float, kept: bool) -> None:
    trained, ema = {"loss": 0.5, "top1": 0.8, "top5": 1.0}, {"loss": ema_loss, "top1": 0.7, "top5": 1.0}
    val = Validation(trained, ema)
    assert val.ema_kept is kept and val.kept == (ema if kept else trained)
    row = val.row()
    assert row["val/loss"] == 0.5 and row["val_ema/loss"] == ema_loss and row["val_ema/kept"] == int(kept)
    assert Validation.from_row({"epoch": 1, "lr": 0.1, **row}) == val
    assert Validation(trained).row() == {"val/loss": 0.5, "val/top1": 0.8, "val/top5": 1.0}
    assert Validation.from_row(Validation(trained).row()).kept == trained
