"""Shared fixtures: every test, and every module's fixtures, run with the environment isolated; `compose_config`
composes conf/train.yaml through Hydra's compose API (tests/helpers holds everything else tests share)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import compose_config as compose
from tests.helpers import isolated


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
    return lambda *overrides: compose("train", f"paths.output_dir={tmp_path / 'outputs'}", *overrides)
