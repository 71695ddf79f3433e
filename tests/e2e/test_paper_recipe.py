"""experiment=paper_cifar100: the paper-style recipe composes to what its comments say, and trains two tiny
epochs end to end (sizes overridden to tiny; its real test is a GPU run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from perceiver.experiment.build import build_parts
from perceiver.experiment.run import train

TINY = [
    "data=synthetic",
    "data.source.num_train=256",
    "data.source.num_test=64",
    "model.image_size=16",
    "model.patch_size=2",
    "model.latent_dim=8",
    "model.projection_dim=16",
    "model.num_heads=2",
    "model.key_dim=8",
    "model.num_transformer_blocks=1",
    "model.num_iterations=3",
    "model.fourier_num_bands=4",
    "trainer.batch_size=32",
    "trainer.device=cpu",
    "trainer.compile=false",
    "trainer.num_workers=0",
    "trainer.peak_tflops=null",
    "trainer.progress_bar=false",
    "trainer.save_checkpoints=false",
    "logger=none",
]


def test_the_paper_recipe_composes_to_its_choices(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config("experiment=paper_cifar100")
    assert cfg.optimizer.opt == "lamb" and cfg.scheduler._target_ == "timm.scheduler.CosineLRScheduler"
    assert cfg.scheduler.warmup_t > 0 and cfg.scheduler.t_initial == cfg.trainer.epochs
    augmentation = cfg.augmentation
    assert augmentation.randaugment and augmentation.mixup_alpha > 0 and augmentation.cutmix_alpha > 0
    assert augmentation.label_smoothing > 0
    model = cfg.model
    assert (model.position_encoding, model.weight_sharing, model.patch_size) == ("fourier", "all_but_first", 1)
    assert model.dropout_rate == model.attention_dropout_rate == 0.0 and model.logit_dropout is False
    assert cfg.data.source.name == "cifar100" and cfg.trainer.early_stopping_patience is None


def test_the_paper_recipe_trains_two_tiny_epochs(compose_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = compose_config("experiment=paper_cifar100", *TINY, "trainer.epochs=2")
    parts = build_parts(cfg)
    model = parts.model
    assert len(model.cross_attends) == 2 and len(model.latent_transformers) == 1  # first cross-attend unshared
    assert type(parts.optimizer).__name__ == "Lamb" and parts.augment.mixup is not None
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    metrics = train(cfg, run_dir=tmp_path)
    history = metrics["history"]
    assert metrics["epochs_run"] == 2 and all(math.isfinite(row["train/loss"]) for row in history)
    assert history[0]["lr"] < history[1]["lr"]  # warming up
    assert math.isfinite(metrics["test"]["loss"]) and 0.0 <= metrics["test"]["top1"] <= 1.0
