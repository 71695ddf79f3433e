"""The training loop (perceiver/training/loop.py) and its parts: metrics, early stopping and schedulers against plain
re-computations and the Keras callbacks' documented rules; `fit` end to end: best weights, exact mid-epoch resume, the
non-finite loss policies, console lines, step rows and epoch-end callbacks."""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from perceiver import BatchAugment, Perceiver, TrainingParts, TrainSettings, fit
from perceiver.training import EpochEnd, TrainingInterrupted, TrainState, distributed, loop
from perceiver.training.checkpoint import read_checkpoint
from perceiver.training.loop import step_scheduler
from perceiver.training.metrics import RunningMetrics, classification_loss
from perceiver.training.schedules import StepSchedule
from perceiver.training.stopping import EarlyStopping, NonFiniteLossError
from tests.helpers import REPO
from tests.helpers.training import TINY_CLASSIFIER as TINY
from tests.helpers.training import NaNAtCall, RecordingTracker, random_batches, tiny_problem, without_timing


def test_running_metrics_match_a_plain_computation() -> None:
    torch.manual_seed(0)
    metrics = RunningMetrics(torch.device("cpu"), num_classes=10)
    all_logits, all_labels, losses = [], [], []
    for size in (7, 5, 9):
        logits, labels = torch.randn(size, 10), torch.randint(0, 10, (size,))
        loss = F.cross_entropy(logits, labels)
        metrics.update(loss, logits, labels)
        all_logits.append(logits)
        all_labels.append(labels)
        losses.append(loss * size)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    ranks = (logits > logits.gather(1, labels[:, None])).sum(dim=1)  # how many classes score higher
    result = metrics.compute()
    assert result["top1"] == pytest.approx((ranks == 0).float().mean().item())
    assert result["top5"] == pytest.approx((ranks < 5).float().mean().item())
    assert result["loss"] == pytest.approx((sum(losses) / len(labels)).item(), rel=1e-6)


def test_top5_with_fewer_than_five_classes_is_always_a_hit() -> None:
    metrics = RunningMetrics(torch.device("cpu"), num_classes=3)
    metrics.update(torch.tensor(1.0), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert metrics.compute()["top5"] == 1.0


def test_soft_target_loss_is_cross_entropy_against_the_distribution() -> None:
    logits = torch.randn(4, 6)
    targets = torch.softmax(torch.randn(4, 6), dim=-1)
    expected = -(targets * torch.log(torch.softmax(logits, dim=-1))).sum(dim=-1).mean()
    torch.testing.assert_close(classification_loss(logits, targets), expected)
    hard = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(classification_loss(logits, hard), F.cross_entropy(logits, hard))


def test_early_stopping_stops_after_patience_epochs_without_improvement() -> None:
    """Keras EarlyStopping(patience=3): the 3rd epoch in a row without a lower val loss ends training."""
    stopper = EarlyStopping(patience=3)
    losses = [1.0, 0.8, 0.9, 0.85, 0.8]  # 0.8 again is not an improvement
    stops = []
    for epoch, loss in enumerate(losses, start=1):
        stopper.update(loss, epoch)
        stops.append(stopper.should_stop)
    assert stops == [False, False, False, False, True]
    assert stopper.best_epoch == 2 and stopper.best_loss == 0.8
    never = EarlyStopping(patience=None)
    for epoch in range(1, 50):
        never.update(1.0, epoch)
    assert not never.should_stop


def test_plateau_config_drops_the_lr_like_keras_patience_3() -> None:
    """Keras ReduceLROnPlateau(factor=0.2, patience=3) cuts the LR on the 3rd epoch without improvement."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.2, patience=2, threshold=1e-4, threshold_mode="abs"
    )
    lrs = []
    for epoch, loss in enumerate([1.0, 1.0, 1.0, 1.0], start=1):
        step_scheduler(scheduler, epoch, loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 2e-4])


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("batch_size", -2), ("precision", "fp8"), ("grad_clip_norm", -1.0), ("device", "gpu0")],
)
def test_train_settings_reject_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"trainer.{field}"):
        TrainSettings(**{field: value})


def test_fit_restores_the_best_weights_and_writes_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Perceiver(image_size=8, patch_size=4, num_classes=2, latent_dim=4, projection_dim=8, num_heads=1)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    train, val = tiny_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    settings = TrainSettings(epochs=4, progress_bar=False, device="cpu")
    result = fit(TrainingParts(model, augment, optimizer, None, num_classes=2), train, val, settings, tmp_path)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == result.best_epoch
    val_losses = [row["val/loss"] for row in result.history]
    assert result.best_epoch == 1 + val_losses.index(min(val_losses))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, best["model"][name], msg=name)
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 4 and "optimizer" in last


def test_cosine_config_warms_up_then_follows_the_cosine(compose_config) -> None:
    """conf/scheduler/cosine.yaml through `step_scheduler`, against the closed-form schedule."""
    from hydra.utils import instantiate

    cfg = compose_config("scheduler=cosine", "trainer.epochs=20")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    warmup, start, floor, length = 5, 1e-5, 1e-6, 20
    lrs = [optimizer.param_groups[0]["lr"]]
    for epoch in range(1, 15):
        step_scheduler(scheduler, epoch, val_loss=1.0)
        lrs.append(optimizer.param_groups[0]["lr"])
    expected = [start + (1e-3 - start) * e / warmup for e in range(warmup)]
    expected += [floor + 0.5 * (1e-3 - floor) * (1 + math.cos(math.pi * (e - warmup) / length)) for e in range(5, 15)]
    assert lrs == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- fit


def tiny_fit(
    run_dir: Path,
    resume: dict | None = None,
    model: torch.nn.Module | None = None,
    schedule=None,
    optimizer=None,
    **settings,
):
    """`optimizer(model)` makes the optimizer (default: Adam at 1e-2)."""
    torch.manual_seed(0)
    model = model or Perceiver(**TINY, dropout_rate=0.2)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    train, val = tiny_problem()
    optimizer = optimizer(model) if optimizer is not None else torch.optim.Adam(model.parameters(), lr=1e-2)
    if schedule is None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    else:
        scheduler = schedule(optimizer)
    options = {"epochs": 3, "progress_bar": False, "device": "cpu", "early_stopping_patience": None, **settings}
    parts = TrainingParts(model, augment, optimizer, scheduler, num_classes=2)
    state = TrainState.from_dict(resume) if resume is not None else None
    result = fit(parts, train, val, TrainSettings(**options), run_dir, resume=state)
    return result, model


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


def test_a_per_step_schedule_sets_every_step_and_resumes_exactly(tmp_path: Path) -> None:
    """scheduler=warmup_cosine: 3 batches per epoch, a warm-up of 1.5 epochs; resumed at epoch 2, batch 1."""
    seen: list[float] = []

    def schedule(optimizer: torch.optim.Optimizer) -> StepSchedule:
        made = StepSchedule(optimizer, epochs=3, warmup_epochs=1.5)
        original = optimizer.step
        optimizer.step = lambda *a, **k: (seen.append(optimizer.param_groups[0]["lr"]), original(*a, **k))[1]
        return made

    whole, whole_model = tiny_fit(tmp_path / "whole", schedule=schedule)
    expected = [1e-2 * (s / 4.5 if s < 4.5 else 0.5 * (1 + math.cos(math.pi * (s - 4.5) / 4.5))) for s in range(1, 10)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert [row["lr"] for row in whole.history] == pytest.approx([expected[2], expected[5], expected[8]])
    tiny_fit(tmp_path / "part", schedule=schedule, checkpoint_every_n_steps=2, keep_checkpoints=10)
    state = read_checkpoint(tmp_path / "part" / "checkpoints" / "step-00000004.pt")
    torch.manual_seed(123)
    resumed, resumed_model = tiny_fit(tmp_path / "part", resume=state, schedule=schedule)
    assert without_timing(resumed.history) == without_timing(whole.history)
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


# ----------------------------------------------------------------------------- an EMA of the weights


class BiasOffsetAtEpochEnds(torch.optim.Adam):
    """Adam at 1e-2 whose classifier bias carries an offset of (+5, -5) after every third step (an epoch's last on
    tiny_problem), taken back at the next: the trained weights end each epoch far off their path, their EMA takes
    in only part of the offset and validates better."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model.parameters(), lr=1e-2)
        self.bias, self.offset, self.calls = dict(model.named_parameters())["head.2.bias"], torch.tensor([5.0, -5.0]), 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.calls % 3 == 0 and self.calls:
            self.bias -= self.offset
        loss = super().step(closure)
        self.calls += 1
        if self.calls % 3 == 0:
            self.bias += self.offset
        return loss


def tiny_val_loss(weights: dict[str, torch.Tensor]) -> float:
    """The mean cross-entropy over tiny_problem's validation images of a model with `weights`."""
    model = Perceiver(**TINY, dropout_rate=0.2)
    model.load_state_dict(weights)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    images, labels = (torch.cat(parts) for parts in zip(*tiny_problem()[1], strict=True))
    with torch.no_grad():
        return F.cross_entropy(model.eval()(augment.preprocess(images)), labels).item()


@pytest.mark.parametrize("offset", [True, False], ids=["ema-better", "ema-lags"])
def test_with_an_ema_the_weights_kept_are_those_with_the_lower_validation_loss(tmp_path: Path, offset: bool) -> None:
    """Every epoch validates the trained weights and their EMA, read back here from the epoch-end checkpoint;
    the lower loss's weights are the epoch's candidate, and the best candidate ends in best.pt and the model."""
    make = BiasOffsetAtEpochEnds if offset else None
    result, model = tiny_fit(tmp_path, optimizer=make, ema_decay=0.9, keep_checkpoints=10)
    for epoch, row in enumerate(result.history, start=1):
        state = read_checkpoint(tmp_path / "checkpoints" / f"step-{3 * epoch:08d}.pt")
        assert row["val/loss"] == pytest.approx(tiny_val_loss(state["model"]), rel=1e-5)
        assert row["val_ema/loss"] == pytest.approx(tiny_val_loss(state["ema"]["module"]), rel=1e-5)
        assert row["val_ema/kept"] == int(row["val_ema/loss"] < row["val/loss"])
        assert state["ema"]["updates"] == 3 * epoch
    candidates = [min(row["val/loss"], row["val_ema/loss"]) for row in result.history]
    assert result.best_epoch == 1 + candidates.index(min(candidates))
    best_row = result.history[result.best_epoch - 1]
    assert best_row["val_ema/kept"] == int(offset)  # the scenario: the offset makes the EMA better, else it lags
    epoch_end = read_checkpoint(tmp_path / "checkpoints" / f"step-{3 * result.best_epoch:08d}.pt")
    kept = epoch_end["ema"]["module"] if offset else epoch_end["model"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for name, tensor in kept.items():
        assert torch.equal(best["model"][name], tensor) and torch.equal(model.state_dict()[name], tensor), name
    prefix = "val_ema/" if offset else "val/"
    assert result.best_val == best["val"] == {k: best_row[prefix + k] for k in ("loss", "top1", "top5")}


@pytest.mark.parametrize("step", [3, 4], ids=["epoch-end", "mid-epoch"])
def test_a_run_with_an_ema_resumed_ends_exactly_like_an_uninterrupted_one(tmp_path: Path, step: int) -> None:
    """Resumed at the end of epoch 1 (step 3) or at epoch 2, batch 1 (step 4): the same history, best weights and
    final EMA (its average and its count of updates, which sets the warm-up's decay)."""
    whole, whole_model = tiny_fit(tmp_path / "whole", ema_decay=0.9)
    tiny_fit(tmp_path / "part", ema_decay=0.9, checkpoint_every_n_steps=2, keep_checkpoints=10)
    state = read_checkpoint(tmp_path / "part" / "checkpoints" / f"step-{step:08d}.pt")
    assert state["ema"]["updates"] == step
    torch.manual_seed(123)  # whatever the generators hold now must not matter
    resumed, resumed_model = tiny_fit(tmp_path / "part", resume=state, ema_decay=0.9)
    assert "val_ema/loss" in whole.history[0]
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert (resumed.best_epoch, resumed.best_val) == (whole.best_epoch, whole.best_val)
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
    whole_ema = read_checkpoint(tmp_path / "whole" / "last.pt")["ema"]
    resumed_ema = read_checkpoint(tmp_path / "part" / "last.pt")["ema"]
    assert whole_ema["updates"] == resumed_ema["updates"] == 9
    for name, tensor in whole_ema["module"].items():
        assert torch.equal(tensor, resumed_ema["module"][name]), name


def test_a_run_resumed_with_an_ema_from_a_checkpoint_without_one_starts_it_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint written before `ema` existed (the key absent) still loads; `trainer.ema_decay` then starts the
    EMA from the resumed weights, says so, and the training itself goes on exactly as without an EMA."""
    tiny_fit(tmp_path / "whole")
    tiny_fit(tmp_path / "part", checkpoint_every_n_steps=2, keep_checkpoints=10)
    state = read_checkpoint(tmp_path / "part" / "checkpoints" / "step-00000004.pt")
    del state["ema"]
    with caplog.at_level(logging.WARNING, logger="perceiver.training.loop"):
        resumed, _ = tiny_fit(tmp_path / "part", resume=state, ema_decay=0.9)
    assert any("holds no EMA" in line and "trainer.ema_decay=0.9 starts one" in line for line in caplog.messages)
    resumed_last = read_checkpoint(tmp_path / "part" / "last.pt")
    assert resumed_last["ema"]["updates"] == 5  # steps 5 to 9
    whole_last = read_checkpoint(tmp_path / "whole" / "last.pt")
    assert [row["val/loss"] for row in resumed.history] == [row["val/loss"] for row in whole_last["history"]]
    for name, tensor in whole_last["model"].items():
        assert torch.equal(tensor, resumed_last["model"][name]), name


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


# ------------------------------------------------------------- console lines, step rows, epoch-end callbacks


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_is_drawn_only_on_rank_zero_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not loop.draws_progress_bar(True)  # redirected to a file
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert loop.draws_progress_bar(True) and not loop.draws_progress_bar(False)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=1, world_size=2))
    assert not loop.draws_progress_bar(True)


class LossReads:
    """Spies on the training losses `fit` computes and counts the host reads of them (each `item()` of a loss
    is a device sync); `values[i]` is the loss of the (i+1)-th training step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.values: list[float] = []
        self.reads = 0
        self._losses: dict[int, weakref.ref] = {}
        real_loss, real_item = loop.classification_loss, torch.Tensor.item

        def spy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
            loss = real_loss(logits, targets, smoothing)
            if torch.is_grad_enabled():  # training steps; evaluation runs without gradients
                self.values.append(real_item(loss))
                self._losses[id(loss)] = weakref.ref(loss)
            return loss

        def item(tensor: torch.Tensor) -> Any:
            known = self._losses.get(id(tensor))
            self.reads += known is not None and known() is tensor
            return real_item(tensor)

        monkeypatch.setattr(loop, "classification_loss", spy)
        monkeypatch.setattr(torch.Tensor, "item", item)


def fit_of(tmp_path: Path, batches: int, epochs: int = 1, log_row: Any = None, **settings: Any) -> None:
    """`fit` on `batches` one-image batches an epoch, a step row every 2 global steps."""
    from perceiver import BatchAugment, Perceiver, fit
    from perceiver.training import TrainingParts

    torch.manual_seed(0)
    model = Perceiver(**TINY)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    options = {"epochs": epochs, "device": "cpu", "log_every_n_steps": 2, "save_checkpoints": False, **settings}
    train, val = random_batches(batches, batch_size=1), random_batches(1)
    fit(
        TrainingParts(model, augment, optimizer, None, 2), train, val, TrainSettings(**options), tmp_path, None, log_row
    )


@pytest.mark.parametrize(("batches", "lines"), [(10, 5), (8, 0)])
def test_without_a_bar_a_long_epoch_logs_its_loss_every_n_steps(
    batches: int, lines: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Five intervals of 2 in 10 batches; 8 batches (4 intervals) is short: the epoch-end line is enough.
    Under pytest stderr is no terminal, so `progress_bar=true` draws no bar; without step rows to send, the loss is
    read for the lines alone."""
    losses = LossReads(monkeypatch)
    caplog.set_level(logging.INFO, logger=loop.__name__)
    fit_of(tmp_path, batches, progress_bar=True)
    logged = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert len(losses.values) == batches and losses.reads == lines == len(logged)
    if lines:
        assert logged[0] == f"epoch 1/1  batch 2/10  loss {losses.values[1]:.4f}"


@pytest.mark.slow
def test_a_progress_bar_redirected_to_a_file_writes_no_carriage_returns(tmp_path: Path) -> None:
    """A cluster job's log is a file: tqdm would fill it with a `\\r` per redraw."""
    epochs, output = 2, tmp_path / "output.txt"
    command = [sys.executable, "train.py", "experiment=cpu_smoke", "logger=none", "trainer.progress_bar=true"]
    command += [f"trainer.epochs={epochs}", f"hydra.run.dir={tmp_path / 'run'}"]
    with output.open("w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = output.read_text()
    assert result.returncode == 0, text[-3000:]
    assert text.count("\r") <= 2 * epochs, repr(text[-2000:])
    assert text.count("train loss") == epochs  # each epoch is still reported, by its epoch-end line


# ----------------------------------------------------------------------------- step rows, epoch-end callbacks


def small_fit(run_dir: Path, tracker: Any, resume: Any = None, callbacks: Any = (), **settings: Any) -> Any:
    """3 batches per epoch (tests/training/test_loop.py's tiny problem), 3 epochs, a step row every 2 global steps."""
    from perceiver import BatchAugment, Perceiver, fit
    from perceiver.training import TrainingParts, TrainState

    torch.manual_seed(0)
    model = Perceiver(image_size=8, patch_size=4, num_classes=2, latent_dim=4, projection_dim=8, num_heads=1)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    options = {"epochs": 3, "progress_bar": False, "device": "cpu", "log_every_n_steps": 2, **settings}
    state = TrainState.from_dict(resume) if resume is not None else None
    parts = TrainingParts(model, augment, optimizer, None, num_classes=2)
    train, val = tiny_problem()
    return fit(parts, train, val, TrainSettings(**options), run_dir, state, tracker.log, callbacks=callbacks)


def test_step_rows_come_every_n_global_steps_across_epochs_with_the_steps_own_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """9 steps: step rows at 2, 4, 6, 8 (epoch boundaries do not restart the count), epoch rows at 3, 6, 9; W&B's
    step is the global step for both and never goes down. The loss is the one of that very step, recorded here
    by a spy on the loss function (the loop itself reads it only at those steps)."""
    losses: list[float] = []
    real_loss = loop.classification_loss

    def spy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        loss = real_loss(logits, targets, smoothing)
        if torch.is_grad_enabled():  # training steps; evaluation runs without gradients
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "classification_loss", spy)
    tracker = RecordingTracker()
    result = small_fit(tmp_path, tracker)
    steps = [step for _, step in tracker.logged]
    assert steps == [2, 3, 4, 6, 6, 8, 9] and steps == sorted(steps)
    assert [(row["epoch"], step) for row, step in tracker.epoch_rows()] == [(1, 3), (2, 6), (3, 9)]
    assert [row for row, _ in tracker.epoch_rows()] == result.history and result.global_step == 9
    for row, step in tracker.step_rows():
        assert set(row) == {"global_step", "train_step/loss", "train_step/lr"} and row["global_step"] == step
        assert row["train_step/loss"] == pytest.approx(losses[step - 1], rel=1e-6)
        assert row["train_step/lr"] == 1e-2


def test_step_rows_reuse_the_one_loss_read_per_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two long epochs (9 batches, more than 4 intervals of 2): log lines and step rows share one read each at
    global steps 2, 4, ..., 18; in epoch 2, 9 global steps come before it, so they fall on batches 1, 3, ..."""
    losses = LossReads(monkeypatch)
    caplog.set_level(logging.INFO, logger=loop.__name__)
    reported: list[tuple[int, float]] = []
    fit_of(tmp_path, 9, epochs=2, log_row=lambda row, step: reported.append((step, row.get("train_step/loss"))))
    steps = [2, 4, 6, 8, 9, 10, 12, 14, 16, 18, 18]  # 9 and the last 18: epoch rows
    assert [step for step, _ in reported] == steps
    assert [(s, v) for s, v in reported if v is not None] == [(s, losses.values[s - 1]) for s in range(2, 19, 2)]
    assert losses.reads == 9 and len(losses.values) == 18
    lines = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert len(lines) == 9 and lines[4] == f"epoch 2/2  batch 1/9  loss {losses.values[9]:.4f}"
    short = LossReads(monkeypatch)
    fit_of(tmp_path, 6, progress_bar=False, log_row=lambda row, step: None)
    assert short.reads == 3  # a short epoch logs no lines, but its step rows are still read


def sigterm_at(step: int) -> Any:
    def send(row: dict[str, Any], logged_step: int | None) -> None:
        if "train_step/loss" in row and logged_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return send


def test_a_run_stopped_by_sigterm_and_resumed_logs_every_step_once(tmp_path: Path) -> None:
    """SIGTERM right after step 4 (epoch 2, batch 1): it saves there and stops; the resumed fit logs steps 6 and
    8 and the epochs 2 and 3, exactly what the uninterrupted fit logged after step 4."""
    whole = RecordingTracker()
    small_fit(tmp_path / "whole", whole)
    first = RecordingTracker(on_log=sigterm_at(4))
    with pytest.raises(TrainingInterrupted):
        small_fit(tmp_path / "part", first)
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert state["global_step"] == 4
    second = RecordingTracker()
    small_fit(tmp_path / "part", second, resume=state)
    steps = [step for _, step in first.logged + second.logged]
    assert steps == [step for _, step in whole.logged] == sorted(steps)
    resumed_rows = [row["global_step"] for row, _ in first.step_rows() + second.step_rows()]
    assert resumed_rows == [2, 4, 6, 8]  # none twice, none lost
    timing = ("images_per_second", "epoch_seconds", "perf/tflops")
    untimed = [({k: v for k, v in row.items() if k not in timing}, s) for row, s in first.logged + second.logged]
    assert untimed == [({k: v for k, v in row.items() if k not in timing}, s) for row, s in whole.logged]


def test_epoch_end_callbacks_see_each_epoch_after_its_checkpoint_and_not_when_stopping(tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []

    def callback(end: EpochEnd) -> None:
        saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
        seen.append((end.epoch, end.global_step, saved["next_epoch"]))
        assert end.row["epoch"] == end.epoch and isinstance(end.model, torch.nn.Module)

    result = small_fit(tmp_path / "run", RecordingTracker(), callbacks=[callback])
    assert seen == [(1, 3, 2), (2, 6, 3), (3, 9, 4)] and [row["epoch"] for row in result.history] == [1, 2, 3]

    seen.clear()

    def stop_after_epoch_1(row: dict[str, Any], step: int | None) -> None:
        if row.get("epoch") == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        small_fit(tmp_path / "run", RecordingTracker(on_log=stop_after_epoch_1), callbacks=[callback])
    assert seen == []  # stopping: the checkpoint is saved, nothing else is done


def test_mirror_averaging_is_the_mean_of_the_two_views_probabilities() -> None:
    """Against a plain re-computation: the probabilities of an image and of its mirror, averaged."""
    logits, mirrored = torch.randn(6, 5), torch.randn(6, 5)
    averaged = loop.mirror_averaged(logits, mirrored)
    plain = (logits.softmax(-1) + mirrored.softmax(-1)) / 2
    torch.testing.assert_close(averaged.exp(), plain)
    labels = torch.randint(0, 5, (6,))
    assert classification_loss(averaged, labels).item() == pytest.approx(-plain[range(6), labels].log().mean().item())


def test_a_mirror_averaged_evaluation_scores_a_set_and_its_mirror_image_alike() -> None:
    """Invariance: flipping every validation image left-right changes nothing with `mirror=True`; the numbers are
    the averaged probabilities' (plain re-computation), and differ from the single view's."""
    torch.manual_seed(0)
    model = Perceiver(**TINY).eval()
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    images, labels = (torch.cat(parts) for parts in zip(*tiny_problem()[1], strict=True))
    images[:, :, :, :4] = 0  # the left half dark: the mirror is another image

    def scores(batch: torch.Tensor, mirror: bool) -> dict[str, float]:
        loader = [(batch[:16], labels[:16]), (batch[16:], labels[16:])]
        return loop.evaluate(model, augment.preprocess, loader, torch.device("cpu"), "fp32", 2, mirror=mirror)

    averaged = scores(images, True)
    assert averaged == pytest.approx(scores(images.flip(-1), True))
    assert scores(images, False)["loss"] != pytest.approx(averaged["loss"])
    with torch.no_grad():
        inputs = augment.preprocess(images)
        probs = (model(inputs).softmax(-1) + model(inputs.flip(-1)).softmax(-1)) / 2
    assert averaged["top1"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    assert averaged["loss"] == pytest.approx(-probs[range(32), labels].log().mean().item(), rel=1e-5)
