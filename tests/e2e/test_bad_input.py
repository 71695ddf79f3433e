"""Bad command lines and bad files through the real entry point: each case is its own `python train.py`
process that must exit non-zero within seconds, with a message naming the problem and no traceback.
The processes run three at a time (start-up is mostly waiting on imports), each case checked on its own.

(tests/experiment/test_config.py checks more bad values in-process, through compose + build.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from perceiver.experiment.run import train
from tests.helpers import REPO, compose_config, isolated, write_image_folder

SMOKE = "experiment=cpu_smoke"
TINY = ["data.source.num_train=200", "logger=none"]

# (id, arguments, words the message must contain, exit code). {files} is a folder of prepared inputs.
CASES = [
    # wrong types
    ("epochs-not-a-number", [SMOKE, "trainer.epochs=abc"], ["trainer.epochs='abc'", "positive integer"], 2),
    ("seed-not-a-number", [SMOKE, "seed=abc"], ["seed='abc'", "integer"], 2),
    ("iterations-a-word", [SMOKE, "model.num_iterations=two"], ["model.num_iterations='two'"], 2),
    ("override-syntax", [SMOKE, "model.latent_dim=["], ["no viable alternative at input '['"], 1),
    # out-of-range and inconsistent values
    ("batch-size-zero", [SMOKE, "trainer.batch_size=0"], ["trainer.batch_size=0", "positive integer"], 2),
    ("val-fraction-above-one", [SMOKE, "data.val_fraction=1.5"], ["data.val_fraction=1.5", "(0, 1)"], 2),
    ("patch-does-not-tile", [SMOKE, "model.patch_size=3"], ["model.image_size=16 is not divisible by patch_size=3"], 2),
    ("lr-a-word", [SMOKE, "optimizer.lr=abc"], ["optimizer.lr='abc'", "must be a number"], 2),
    ("negative-lr", [SMOKE, "optimizer.lr=-1"], ["optimizer: Invalid learning rate: -1"], 2),
    ("classes-disagree", [SMOKE, "model.num_classes=7"], ["model.num_classes=7", "10 classes"], 2),
    ("checkpoint-every-zero", [SMOKE, "trainer.checkpoint_every_n_steps=0"], ["checkpoint_every_n_steps=0"], 2),
    ("keep-no-checkpoints", [SMOKE, "trainer.keep_checkpoints=0"], ["trainer.keep_checkpoints=0"], 2),
    ("lr-so-high-the-loss-is-nan", [SMOKE, *TINY, "optimizer.lr=1e30"], ["training loss became", "at epoch 1"], 1),
    # unknown choices, options and keys
    ("precision-unknown", [SMOKE, "trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16"], 2),
    ("nonfinite-policy-unknown", [SMOKE, "trainer.nonfinite_loss=ignore"], ["nonfinite_loss='ignore'", "skip"], 2),
    ("logger-mode-unknown", [SMOKE, "logger.mode=sometimes"], ["logger.mode='sometimes'", "offline"], 2),
    ("optimizer-option-unknown", [SMOKE, "optimizer=adamx"], ["Could not find 'optimizer/adamx'", "lamb"], 1),
    ("experiment-option-unknown", ["experiment=tiny"], ["Could not find 'experiment/tiny'", "cpu_smoke"], 1),
    ("trainer-key-misspelt", [SMOKE, "trainer.epoch=3"], ["Could not override 'trainer.epoch'"], 1),
    # missing or bad data
    (
        "cifar-missing-offline",
        ["data=cifar100", "data.source.download=false", "paths.data_root={files}/empty"],
        ["cifar-100-python", "data=synthetic"],
        2,
    ),
    ("image-folder-path-missing", [SMOKE, "data=imagefolder"], ["Missing mandatory value: data.source.path"], 2),
    ("image-folder-one-class", [SMOKE, "data=imagefolder", "data.source.path={files}/one"], ["at least 2 classes"], 2),
    ("image-folder-nowhere", [SMOKE, "data=imagefolder", "data.source.path={files}/nowhere"], ["does not exist"], 2),
    (
        "image-folder-bad-files",
        [SMOKE, "data=imagefolder", "data.source.path={files}/images"],
        ["{files}/images/cat/notes.txt", "{files}/images/dog/broken.png", "{files}/images/yak", "bad_files=skip"],
        2,
    ),
    # checkpoints
    ("resume-nowhere", [SMOKE, "resume={files}/no-such-run"], ["resume=", "no-such-run", "does not exist"], 2),
    ("resume-empty-dir", [SMOKE, "resume={files}/empty"], ["holds no checkpoint", "resume=null"], 2),
    (
        "resume-newest-truncated",
        ["resume={files}/damaged"],
        ["step-00000006.pt is truncated or corrupt", "resume={files}/damaged/checkpoints/step-00000004.pt"],
        2,
    ),
    ("resume-garbage-file", ["resume={files}/garbage.pt"], ["garbage.pt is truncated or corrupt"], 2),
    ("resume-weights-only", ["resume={files}/run/best.pt"], ["not a resumable checkpoint"], 2),
    (
        "resume-other-model",
        ["resume={files}/run", "model.latent_dim=32"],
        ["model.latent_dim (16 in the checkpoint, 32 now)", "resume=null"],
        2,
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished-but-for-metrics tiny run with checkpoints, a copy whose newest checkpoint is truncated,
    a garbage .pt file, an empty folder, and an image folder with bad files and an empty class."""
    root = tmp_path_factory.mktemp("files")
    with isolated(root):
        options = ["trainer.epochs=2", "trainer.checkpoint_every_n_steps=2", "trainer.keep_checkpoints=5"]
        cfg = compose_config("train", SMOKE, *TINY, *options)
        (root / "run").mkdir()
        train(cfg, run_dir=root / "run")
    (root / "run" / "metrics.json").unlink()  # as if it had died during the test evaluation
    shutil.copytree(root / "run", root / "damaged")
    newest = root / "damaged" / "checkpoints" / "step-00000006.pt"
    truncated = newest.read_bytes()[:2000]
    newest.unlink()  # last.pt is a hard link to it: keep that one whole
    newest.write_bytes(truncated)
    (root / "garbage.pt").write_bytes(os.urandom(5000))
    (root / "empty").mkdir()
    write_image_folder(root / "images", ["cat", "dog"], 3, (8, 8), lambda c, i: (40 * i, 90, 200))
    (root / "images" / "cat" / "notes.txt").write_text("not an image")
    (root / "images" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "images" / "yak").mkdir()
    write_image_folder(root / "one", ["cat"], 3, (8, 8), lambda c, i: (40 * i, 90, 200))
    return root


@dataclass
class Outcome:
    code: int
    output: str
    seconds: float
    run_dir: Path


def run_case(arguments: list[str], run_dir: Path) -> Outcome:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "train.py", *arguments, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Outcome(result.returncode, result.stdout + result.stderr, time.monotonic() - started, run_dir)


@pytest.fixture(scope="module")
def outcomes(files: Path) -> dict[str, Outcome]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(run_case, [a.format(files=files) for a in arguments], files / "runs" / name)
            for name, arguments, _, _ in CASES
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name, words, code", [(c[0], c[2], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_fast_naming_the_problem(
    files: Path, outcomes: dict[str, Outcome], name: str, words: list[str], code: int
) -> None:
    outcome = outcomes[name]
    assert outcome.code == code, outcome.output[-3000:]
    for word in words:
        assert word.format(files=files) in outcome.output, outcome.output[-3000:]
    assert "Traceback" not in outcome.output
    assert outcome.seconds < 30, f"took {outcome.seconds:.0f} s to refuse"
    assert not (outcome.run_dir / "metrics.json").exists()


def test_the_table_has_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.slow
def test_a_run_dir_that_cannot_be_made_is_one_line_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    outcome = run_case([SMOKE, *TINY], blocker / "run")
    assert outcome.code == 2, outcome.output[-3000:]
    assert f"cannot create {blocker / 'run'}" in outcome.output and "Traceback" not in outcome.output
