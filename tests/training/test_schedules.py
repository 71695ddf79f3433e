"""Per-step learning-rate schedules, against plain re-computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from perceiver.training.schedules import StepSchedule


def rates(steps_per_epoch: int, epochs: int, **kwargs) -> list[float]:
    """The learning rate each optimizer step of a whole run trains with."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = StepSchedule(optimizer, epochs, **kwargs)
    seen = []
    for step in range(steps_per_epoch * epochs):
        schedule.set_step(step + 1, steps_per_epoch)
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
    return seen


def test_warm_up_then_cosine_matches_the_formula():
    seen = rates(10, 3, warmup_epochs=1, decay="cosine")
    for step, lr in enumerate(seen):
        end = step + 1  # the step's end, in steps
        expected = 0.1 * end / 10 if end < 10 else 0.1 * 0.5 * (1 + math.cos(math.pi * (end - 10) / 20))
        assert lr == pytest.approx(expected, rel=1e-12), step


def test_the_first_epoch_trains_at_the_warm_up_rates_not_at_its_start():
    seen = rates(10, 3, warmup_epochs=1)
    assert sum(seen[:10]) / 10 == pytest.approx(0.1 * 5.5 / 10)
    assert max(seen) == pytest.approx(0.1)
    assert seen[0] > 0


@pytest.mark.parametrize(("decay", "last"), [("linear", 0.01), ("constant", 0.1)])
def test_other_decays_end_where_they_should(decay, last):
    seen = rates(10, 3, warmup_epochs=1, decay=decay, final_lr_ratio=0.1)
    assert seen[-1] == pytest.approx(last)
    assert seen[9] == pytest.approx(0.1)


def test_no_warm_up_starts_at_the_full_rate():
    assert rates(4, 2, warmup_epochs=0, decay="constant") == [pytest.approx(0.1)] * 8


def test_a_restored_schedule_sets_the_same_rates():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = StepSchedule(optimizer, 3)
    schedule.set_step(13, 10)
    state, lr = schedule.state_dict(), optimizer.param_groups[0]["lr"]
    optimizer.param_groups[0]["lr"] = 123.0  # as an optimizer state restored mid-run carries the current rate
    again = StepSchedule(optimizer, 3)
    again.load_state_dict(state)
    again.set_step(13, 10)
    assert optimizer.param_groups[0]["lr"] == lr


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [({"decay": "step"}, "decay"), ({"final_lr_ratio": 2.0}, "final_lr_ratio"), ({"warmup_epochs": -1}, "warmup")],
)
def test_bad_settings_are_refused_by_name(kwargs, names):
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=names):
        StepSchedule(optimizer, 3, **kwargs)


def test_a_loader_without_a_length_is_refused_by_what_it_lacks():
    schedule = StepSchedule(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), 3)
    with pytest.raises(ValueError, match="must have a length"):
        schedule.set_step(1, None)
