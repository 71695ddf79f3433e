"""Bad command lines and bad files through the real entry point: each case is its own `python train.py`
process that must exit non-zero before any training step, with a one-line message naming the problem and no
traceback. The processes run three at a time (start-up is mostly waiting on imports), each case checked on its own.

(tests/experiment/test_config.py checks more bad values in-process, through compose + build.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from perceiver.experiment.run import train
from tests.helpers import REPO, compose_config, environment, isolated, write_image_folder

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
    ("negative-lr", [SMOKE, "optimizer.lr=-1"], ["optimizer.lr=-1", "positive number"], 2),
    ("zero-lr-lamb", [SMOKE, "optimizer=lamb", "optimizer.lr=0"], ["optimizer.lr=0", "positive number"], 2),
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
    (
        "launcher-option-unknown",
        ["--multirun", SMOKE, "hydra/launcher=nope"],
        ["Could not find 'hydra/launcher/nope'", "choose one of", "joblib, local, parallel"],
        1,
    ),
    (
        "grid-option-unknown",
        ["--multirun", SMOKE, "ablation=nope"],
        ["Could not find 'ablation/nope'", "num_latents"],
        1,
    ),
    # missing or bad data
    (
        "cifar-missing-offline",
        ["data=cifar100", "data.source.download=false", "paths.data_root={files}/empty"],
        ["cifar-100-python", "data=synthetic"],
        2,
    ),
    ("image-folder-path-missing", [SMOKE, "data=imagefolder"], ["Missing mandatory value: data.source.path"], 2),
    ("image-folder-one-class", [SMOKE, "data=imagefolder", "data.source.path={files}/one"], ["at least 2 classes"], 2),
    (
        "image-folder-two-images",
        [SMOKE, "data=imagefolder", "data.source.path={files}/two"],
        ["holds 2 image(s), too few to hold out a test and a validation image", "add images (at least 3"],
        2,
    ),
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
    write_image_folder(root / "two", ["cat", "dog"], 1, (8, 8))
    return root


TRAINS = {"lr-so-high-the-loss-is-nan"}  # the cases refused once training has shown the problem
EPOCH_LINE = re.compile(r"\bepoch +\d+ +train loss")  # what every trained epoch logs


@dataclass
class Outcome:
    code: int
    output: str
    run_dir: Path

    def started_training(self) -> bool:
        """An epoch line in the output, or a checkpoint written in the run dir."""
        return bool(EPOCH_LINE.search(self.output)) or any(self.run_dir.rglob("*.pt"))


def run_case(arguments: list[str], run_dir: Path, **variables: str) -> Outcome:
    result = subprocess.run(
        [sys.executable, "train.py", *arguments, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=environment(**variables),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Outcome(result.returncode, result.stdout + result.stderr, run_dir)


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
def test_bad_input_is_refused_before_any_training_step_naming_the_problem(
    files: Path, outcomes: dict[str, Outcome], name: str, words: list[str], code: int
) -> None:
    outcome = outcomes[name]
    assert outcome.code == code, outcome.output[-3000:]
    for word in words:
        assert word.format(files=files) in outcome.output, outcome.output[-3000:]
    assert "Traceback" not in outcome.output
    assert "search path" not in outcome.output.lower(), outcome.output[-3000:]  # Hydra's internals, not the user's
    assert name in TRAINS or not outcome.started_training(), outcome.output[-3000:]
    assert not (outcome.run_dir / "metrics.json").exists()


def test_a_diverging_fp32_run_is_not_advised_to_use_fp32(outcomes: dict[str, Outcome]) -> None:
    output = outcomes["lr-so-high-the-loss-is-nan"].output
    assert "lower optimizer.lr" in output.lower() and "trainer.precision=fp32" not in output, output[-3000:]


def test_the_table_has_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.slow
def test_a_run_dir_that_cannot_be_made_is_one_line_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    outcome = run_case([SMOKE, *TINY], blocker / "run")
    assert outcome.code == 2, outcome.output[-3000:]
    assert f"cannot create {blocker / 'run'}" in outcome.output and "Traceback" not in outcome.output


@pytest.mark.slow
@pytest.mark.parametrize("full_error", ["0", "1"])
def test_errors_are_one_line_whatever_the_callers_hydra_full_error_says(tmp_path: Path, full_error: str) -> None:
    """HYDRA_FULL_ERROR is Hydra's own switch between its short and full tracebacks: neither reaches a user."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        ([SMOKE, *TINY], blocker / "run", 2, f"error: cannot create {blocker / 'run'}"),
        ([SMOKE, "trainer.epochs=abc"], tmp_path / "run", 2, "error: trainer.epochs='abc' is invalid"),
        ([SMOKE, "optimizer=adamx"], tmp_path / "run", 1, "error: In 'train': Could not find 'optimizer/adamx'"),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda c: run_case(c[0], c[1], HYDRA_FULL_ERROR=full_error), cases))
    for (_, _, code, line), outcome in zip(cases, outcomes, strict=True):
        assert outcome.code == code, outcome.output[-3000:]
        lines = outcome.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), outcome.output[-3000:]
