"""What several test files share: the repository's paths, the environment every test runs in, one way to
compose the config, real image folders written on the spot, running the entry points as a user does, and
reading what a sweep left behind. (Tiny models and training problems: helpers/models.py, helpers/training.py;
tiny trained runs: helpers/runs.py; W&B's offline files: helpers/wandb_files.py.)"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from tests.helpers.wandb_files import read_offline_run

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def compose_config(name: str, *overrides: str, hydra_node: bool = False) -> DictConfig:
    """conf/<name>.yaml composed with overrides, as `python <name>.py OVERRIDES` would; with `hydra_node`, also
    Hydra's own node (launcher, sweeper) as a multirun of that job sees it."""
    job = {"job_name": name} if hydra_node else {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", **job):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra_node)


Colour = Callable[[int, int], tuple[int, int, int]]
CALLER_PREFIXES = ("HYDRA_", "WANDB_", "PERCEIVER_")  # the caller's settings of Hydra, W&B and this project


@contextlib.contextmanager
def isolated(root: Path) -> Iterator[pytest.MonkeyPatch]:
    """The environment tests run in, whatever the caller's holds: none of the caller's Hydra, W&B or project
    variables; data caches, W&B files (artifact staging too) and credentials below `root`; no W&B server.
    tests/conftest.py applies it to the session and to each test, fixtures with a root of their own too."""
    with pytest.MonkeyPatch.context() as env:
        for name in [name for name in os.environ if name.startswith(CALLER_PREFIXES)]:
            env.delenv(name)
        env.setenv("PERCEIVER_DATA_ROOT", str(root / "data"))
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(root / name.lower()))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("NETRC", str(root / "netrc"))
        yield env


def environment(**extra: str) -> dict[str, str]:
    """The environment a test's subprocess gets: the test's own (isolated) one with `extra` on top."""
    return {**os.environ, **extra}


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("class_0", "class_1", "class_2"),
    per_class: int = 4,
    size: tuple[int, int] | Callable[[int], tuple[int, int]] = (12, 10),
    colour: Colour = lambda c, i: (80 * c, 10 * i, 200 - 60 * c),
) -> Path:
    """`root/<class>/<i>.png`: real PNG files whose colour carries the class (`colour(class index, i)`);
    `size` may depend on i, to exercise resizing."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size(i) if callable(size) else size, colour(c, i)).save(folder / f"{i}.png")
    return root


def run_script(script: str, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGUMENTS...` from the repository root, as a user runs it; output captured."""
    return subprocess.run(
        [sys.executable, script, *arguments],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's job directories (named by Hydra's job number), in job order."""
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def offline_runs(directory: Path) -> list:
    """The W&B offline runs written below `directory`, decoded from their files."""
    return [read_offline_run(path) for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))]
