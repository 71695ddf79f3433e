"""The training loop's parts against plain re-computations and the Keras callbacks' documented rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from perceiver import BatchAugment, Perceiver, TrainingParts, TrainSettings, fit
from perceiver.data import ArrayDataset, DeviceBatches
from perceiver.training.loop import step_scheduler
from perceiver.training.metrics import RunningMetrics, classification_loss
from perceiver.training.stopping import EarlyStopping


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


def tiny_problem(seed: int = 0) -> tuple[DeviceBatches, DeviceBatches]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (128,), generator=generator)
    images = (labels[:, None, None, None] * 150 + torch.randint(0, 100, (128, 3, 8, 8), generator=generator)).to(
        torch.uint8
    )
    data = ArrayDataset(images, labels)
    train = DeviceBatches(data.subset(torch.arange(96)), 32, torch.device("cpu"), shuffle=True)
    val = DeviceBatches(data.subset(torch.arange(96, 128)), 32, torch.device("cpu"))
    return train, val


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
