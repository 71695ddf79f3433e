"""Resuming from the command line (perceiver/experiment/resume.py): the checkpoint's config with this command's
overrides on top, and a refusal naming the fields when they would change what is being trained."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from perceiver.experiment.resume import resumed_config
from perceiver.training.checkpoint import CheckpointError


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
