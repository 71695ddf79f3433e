"""The suite isolates itself from the caller's environment: a test, a module's fixture and a test's subprocess
see none of the caller's Hydra, W&B or project variables, whatever the caller exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, environment

CALLERS = {  # what a user's shell may hold, each of which changed how the suite's runs behaved
    "HYDRA_FULL_ERROR": "0",
    "WANDB_MODE": "online",
    "WANDB_PROJECT": "the-callers-project",
    "WANDB_DIR": "/the-callers-wandb",
    "PERCEIVER_DATA_ROOT": "/the-callers-data",
    "PERCEIVER_SOMETHING": "else",
}
PROBE = "import json, os; print(json.dumps(dict(os.environ)))"


def callers_values(variables: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in CALLERS.items() if variables.get(name) == value}


@pytest.fixture(scope="module")
def module_environment() -> dict[str, str]:
    """What a module-scoped fixture sees (these are made before each test's own isolation applies)."""
    return dict(os.environ)


def test_the_callers_variables_reach_no_test_fixture_or_subprocess(module_environment: dict[str, str]) -> None:
    """Run by the test below in a pytest started with CALLERS exported; passes trivially without them."""
    child = subprocess.run([sys.executable, "-c", PROBE], env=environment(), capture_output=True, text=True, check=True)
    for seen in (dict(os.environ), module_environment, json.loads(child.stdout)):
        assert callers_values(seen) == {}
        assert "HYDRA_FULL_ERROR" not in seen and "WANDB_MODE" not in seen


@pytest.mark.slow
def test_the_suite_passes_whatever_the_caller_exported(tmp_path: Path) -> None:
    node = f"{Path(__file__).relative_to(REPO)}::test_the_callers_variables_reach_no_test_fixture_or_subprocess"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        cwd=REPO,
        env=environment(**CALLERS),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed" in done.stdout
