"""Shared fixtures: Hydra's compose API on the project's conf/, and an isolated data root and W&B."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.helpers import isolated

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session", autouse=True)
def isolated_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The caller's environment never reaches a test, a module's fixtures (made before each test's) included."""
    with isolated(tmp_path_factory.mktemp("session-home")):
        yield


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test's data caches and W&B files below a home of its own; no W&B server."""
    with isolated(tmp_path_factory.mktemp("home")):
        yield


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, as `python train.py OVERRIDES` would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={tmp_path / 'outputs'}", *overrides])

    return _compose
