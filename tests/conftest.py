"""Shared fixtures: every test runs with its environment isolated, and `compose_config` composes conf/train.yaml
through Hydra's compose API (tests/helpers holds everything else tests share)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import compose_config as compose
from tests.helpers import isolate


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep data caches and W&B files out of the home directory; never reach a W&B server."""
    isolate(monkeypatch, tmp_path_factory.mktemp("home"))


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, as `python train.py OVERRIDES` would."""
    return lambda *overrides: compose("train", f"paths.output_dir={tmp_path / 'outputs'}", *overrides)
