"""Finding and reading what a run left: its model file (best.pt) in a run or sweep job directory, or a folder
`save_pretrained` wrote; `load_run` turns either into a `Classifier`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from perceiver.inference.classifier import Classifier, model_class
from perceiver.training.checkpoint import FOLDER, load_file
from perceiver.training.device import resolve_device
from perceiver.training.state import BestModel, CheckpointError, TrainState

MODEL_FILE = "best.pt"


def model_file(path: str | os.PathLike) -> Path:
    """The model file of a run directory, a sweep job directory or a model file itself; CheckpointError saying
    what is there instead."""
    location = Path(os.path.expanduser(str(path)))
    if not location.exists():
        raise CheckpointError(
            f"{location} does not exist; give a run directory (outputs/runs/<date>/<time>), "
            f"a sweep job directory (outputs/sweeps/<name>/<job number>) or a {MODEL_FILE} file"
        )
    if location.is_file():
        return location
    if (location / MODEL_FILE).is_file():
        return location / MODEL_FILE
    jobs = sorted(p.parent.name for p in location.glob(f"*/{MODEL_FILE}"))
    if jobs:
        listed = ", ".join(str(location / job) for job in jobs[:5]) + (" ..." if len(jobs) > 5 else "")
        raise CheckpointError(f"{location} is a sweep directory of {len(jobs)} jobs; give one of them: {listed}")
    has_checkpoints = (location / FOLDER).is_dir() or (location / "last.pt").exists()
    why = "it has resumable checkpoints but no finished epoch's best weights" if has_checkpoints else "nothing saved"
    raise CheckpointError(
        f"{location} holds no {MODEL_FILE} ({why}); was it run with trainer.save_checkpoints=false, or is it "
        "not a run directory?"
    )


def read_model_file(path: Path) -> BestModel:
    """A model file's contents; CheckpointError for a damaged file, a resumable checkpoint or another program's."""
    state = load_file(path)
    if isinstance(state, dict) and state.get("format") == TrainState.FORMAT:
        raise CheckpointError(
            f"{path} is a resumable checkpoint, not a model file; give its run directory, or its {MODEL_FILE}"
        )
    if not isinstance(state, dict) or state.get("format") != BestModel.FORMAT:
        what = "a plain state dict or another program's checkpoint" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not {BestModel.WHAT} (it holds {what}); give a run's {MODEL_FILE}")
    return BestModel.from_dict(state, path)


def is_pretrained_folder(path: Path) -> bool:
    """A folder `save_pretrained` wrote (config.json + model.safetensors)."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def classifier_from(best: BestModel, source: object) -> Classifier:
    """A model file's classifier; CheckpointError when the file lacks its description or its weights do not fit."""
    missing = best.missing_card()
    if missing:
        raise CheckpointError(
            f"{source} lacks {', '.join(missing)}: it was written by `fit` without a model card "
            "(RunRecord.model_card); a run of train.py writes them"
        )
    model_class(best.model_config.get("_target_"), source)
    try:
        classifier = Classifier(best.model_config, best.classes, best.mean, best.std, best.data_image_size)
        classifier.model.load_state_dict(best.model)
    except (RuntimeError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{source}: its weights do not fit the model its config describes ({detail})") from error
    return classifier.eval()


def load_run(path: str | os.PathLike, device: str | torch.device = "auto") -> Classifier:
    """The classifier a run trained, ready to use: `path` is a run directory, a sweep job directory, a model file
    (best.pt) or a folder `save_pretrained` wrote. `device`: auto (CUDA when present), cpu, cuda, cuda:N.

    >>> classifier = load_run("outputs/runs/2025-01-01/12-00-00")
    >>> classifier.predict(["cat.png", "dog.jpg"], k=3)  # [[(class, probability), ...], ...]
    """
    target = resolve_device(str(device))
    location = Path(os.path.expanduser(str(path)))
    if is_pretrained_folder(location):
        return Classifier.from_pretrained(location, map_location=str(target))
    file = model_file(location)
    return classifier_from(read_model_file(file), file).to(target)
