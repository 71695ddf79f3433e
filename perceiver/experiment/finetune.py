"""`init_from`: a new run that starts from a trained model's weights instead of a random initialisation.

`init_from` names a run directory, a sweep job directory, a model file (best.pt) or a W&B artifact
(`wandb:entity/project/model-<run id>:latest`, recorded as the run's input). The model may differ from the trained
one in its number of classes (the classifier's last layer starts afresh, with a warning) and in its image size
(the learned position embedding is interpolated to the new patch grid, and the log says so); anything else that
changes the weights' shapes, the patch size included, is refused naming the fields.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from perceiver.experiment.config import ConfigError
from perceiver.inference import model_file, read_model_file
from perceiver.models.transfer import transfer_weights
from perceiver.training.state import BestModel

log = logging.getLogger(__name__)

ARTIFACT_PREFIX = "wandb:"
IGNORED_DIFFERENCES = ("num_classes", "image_size", "permutation_seed")  # adapted, or not a weight's shape


def is_artifact(reference: object) -> bool:
    return str(reference).startswith(ARTIFACT_PREFIX)


def locate_weights(reference: str, tracker: Any = None) -> Path:
    """The model file `init_from` names; an artifact is downloaded first (through the tracker's run)."""
    if is_artifact(reference):
        if tracker is None:
            raise ValueError("a W&B artifact is downloaded once the run's tracker has started")
        try:
            folder = tracker.use_artifact(reference.removeprefix(ARTIFACT_PREFIX))
        except ValueError as error:
            raise ConfigError(f"init_from={reference}: {error}") from error
        return model_file(folder)
    return model_file(reference)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """Constructor fields that differ between the trained model and this run's: name -> `model.name (old there,
    new here)`."""
    names = sorted((set(saved) | set(current)) - {"_target_"})
    return {
        name: f"model.{name} ({saved.get(name)!r} there, {current.get(name)!r} here)"
        for name in names
        if saved.get(name) != current.get(name)
    }


def check_compatible(reference: str, best: BestModel, model_config: dict[str, Any]) -> None:
    """Refuse, before any weight is touched, another model type or another patch size."""
    saved = best.model_config or (best.config or {}).get("model") or {}
    if saved.get("_target_") != model_config.get("_target_"):
        raise ConfigError(
            f"init_from={reference} holds a {saved.get('_target_')}, this run trains a {model_config.get('_target_')}; "
            "start from a model of the same type, or drop init_from"
        )
    old, new = saved.get("patch_size"), model_config.get("patch_size")
    if old != new:
        raise ConfigError(
            f"init_from={reference}: model.patch_size={new} differs from the trained model's {old}, and its patch "
            f"projection cannot be carried over; keep model.patch_size={old} (model.image_size may change: the "
            "position embedding is interpolated)"
        )


def start_from(reference: str, model: nn.Module, model_config: dict[str, Any], tracker: Any = None) -> Path:
    """Load the weights `init_from` names into `model`, adapting what may differ; returns the model file used."""
    path = locate_weights(str(reference), tracker)
    best = read_model_file(path)
    check_compatible(reference, best, model_config)
    try:
        done = transfer_weights(best.model, model)
    except ValueError as error:
        changed = differences(best.model_config or {}, model_config)
        named = [text for name, text in changed.items() if name not in IGNORED_DIFFERENCES]
        fields = f"the models differ in {', '.join(named)}: " if named else ""
        raise ConfigError(
            f"init_from={reference}: {fields}{error}. Only model.num_classes and model.image_size may differ"
        ) from None
    report(reference, path, best, done, model_config)
    return path


def report(reference: str, path: Path, best: BestModel, done: Any, model_config: dict[str, Any]) -> None:
    log.info(
        "init_from=%s: %d tensors from %s (epoch %d, val loss %.4f)",
        reference,
        len(done.copied),
        path,
        best.epoch,
        (best.val or {}).get("loss", float("nan")),
    )
    if done.reinitialised:
        log.warning(
            "init_from: the trained model has %d classes, this run %s: its last classifier layer (%s) starts afresh",
            len(best.classes or []),
            model_config.get("num_classes"),
            ", ".join(done.reinitialised),
        )
    elif best.classes and len(best.classes) == model_config.get("num_classes"):
        log.info(
            "init_from: the classifier is carried over (the trained model's classes: %s)", ", ".join(best.classes[:10])
        )
    for key, old, new in done.interpolated:
        log.info(
            "init_from: interpolated the learned position embedding %s from a %dx%d to a %dx%d patch grid "
            "(model.image_size %s -> %s; bicubic, timm)",
            key,
            old,
            old,
            new,
            new,
            (best.model_config or {}).get("image_size"),
            model_config.get("image_size"),
        )
    for key in done.kept:
        log.info("init_from: %s is this model's own (another number of inputs)", key)
