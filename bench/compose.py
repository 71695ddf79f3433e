"""train.py's config composed in-process, for the benchmarks that check their recipes before running anything."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from perceiver.experiment.config import composition_message

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(overrides: Sequence[str], what: str) -> DictConfig:
    """conf/train.yaml with `overrides`, as `python train.py OVERRIDES` composes it. One that does not compose ends
    the bench with train.py's message, naming `what` and the overrides."""
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        message = composition_message(error)
        raise SystemExit(
            f"{what} does not compose with train.py: {message}; overrides: {shlex.join(overrides)}"
        ) from None
