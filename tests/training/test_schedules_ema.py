"""Per-step learning-rate schedules and the weight EMA, against plain re-computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from perceiver.training.ema import WeightEMA
from perceiver.training.schedules import StepSchedule


def rates(steps_per_epoch: int, epochs: int, **kwargs) -> list[float]:
    """The learning rate each optimizer step of a whole run trains with."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = StepSchedule(optimizer, steps_per_epoch, epochs, **kwargs)
    seen = []
    for _ in range(steps_per_epoch * epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_warm_up_then_cosine_matches_the_formula():
    seen = rates(10, 3, warmup_epochs=1, decay="cosine")
    for step, lr in enumerate(seen):
        expected = 0.1 * (step + 1) / 10 if step < 10 else 0.1 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 20))
        assert lr == pytest.approx(expected, rel=1e-12), step


def test_the_first_epoch_trains_at_the_warm_up_rates_not_at_its_start():
    seen = rates(10, 3, warmup_epochs=1)
    assert sum(seen[:10]) / 10 == pytest.approx(0.1 * 5.5 / 10)
    assert max(seen) == pytest.approx(0.1)


@pytest.mark.parametrize(("decay", "last"), [("linear", 0.01 + 0.09 * (1 / 20)), ("constant", 0.1)])
def test_other_decays_end_where_they_should(decay, last):
    seen = rates(10, 3, warmup_epochs=1, decay=decay, final_lr_ratio=0.1)
    assert seen[-1] == pytest.approx(last)
    assert seen[10] == pytest.approx(0.1)


def test_no_warm_up_starts_at_the_full_rate():
    assert rates(4, 2, warmup_epochs=0, decay="constant") == [pytest.approx(0.1)] * 8


def test_a_restored_schedule_continues_exactly():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = StepSchedule(optimizer, 10, 3)
    for _ in range(13):
        optimizer.step()
        schedule.step()
    state = schedule.state_dict()
    expected = []
    for _ in range(5):
        optimizer.step()
        schedule.step()
        expected.append(optimizer.param_groups[0]["lr"])
    optimizer2 = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule2 = StepSchedule(optimizer2, 10, 3)
    schedule2.load_state_dict(state)
    optimizer2.param_groups[0]["lr"] = schedule2.get_last_lr()[0]  # as a restored optimizer state carries it
    again = []
    for _ in range(5):
        optimizer2.step()
        schedule2.step()
        again.append(optimizer2.param_groups[0]["lr"])
    assert again == expected


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [({"decay": "step"}, "decay"), ({"final_lr_ratio": 2.0}, "final_lr_ratio"), ({"warmup_epochs": -1}, "warmup")],
)
def test_bad_settings_are_refused_by_name(kwargs, names):
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=names):
        StepSchedule(optimizer, 10, 3, **kwargs)


def test_ema_follows_the_recurrence_computed_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    reference = {k: v.double().clone() for k, v in model.state_dict().items()}
    for n in range(1, 40):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        for key, value in model.state_dict().items():
            reference[key] = d * reference[key] + (1 - d) * value.double()
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value.double(), reference[key], rtol=1e-5, atol=1e-5)


def test_ema_copies_integer_buffers_and_never_trains():
    model = nn.BatchNorm1d(3)
    ema = WeightEMA(model, decay=0.99)
    model.num_batches_tracked += 7
    ema.update(model)
    assert ema.module.num_batches_tracked.item() == 7
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_a_restored_ema_continues_exactly():
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.95)
    steps = [torch.randn(2, 3) for _ in range(10)]
    for delta in steps[:5]:
        model.weight.data += delta
        ema.update(model)
    restored = WeightEMA(nn.Linear(3, 2), decay=0.95)
    restored.load_state_dict(ema.state_dict())
    for delta in steps[5:]:
        model.weight.data += delta
        ema.update(model)
        restored.update(model)
    assert torch.equal(restored.module.weight, ema.module.weight)


def test_ema_refuses_a_decay_outside_0_1():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(nn.Linear(2, 2), decay=1.0)
