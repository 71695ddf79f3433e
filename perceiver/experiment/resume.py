"""Resuming from the command line: the checkpoint's config with this command's Hydra overrides on top, and
a refusal, naming the fields, when the overrides would change what is being trained."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from perceiver.experiment.config import check_targets
from perceiver.training.state import CheckpointError

# What may differ between a checkpoint's config and the run resuming it; everything else (model, data,
# optimizer, scheduler, augmentation, seed, batch size) defines the training being continued.
CHANGEABLE = ("trainer.", "logger.", "paths.", "resume")
FIXED_TRAINER_FIELDS = ("trainer.batch_size",)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def fixed_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between a checkpoint's config and this run's, other than those a resume may change."""
    old, new = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        changeable = key.startswith(CHANGEABLE) and not key.startswith(FIXED_TRAINER_FIELDS)
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if not changeable and before != after:
            differences.append(f"{key} ({before!r} in the checkpoint, {after!r} now)")
    return differences


def resumed_config(
    saved: dict[str, Any], current: Any, overrides: Sequence[str] | None, saved_overrides: Sequence[str]
) -> Any:
    """The config to continue with. From the command line (`overrides` given) it is the checkpoint's config
    with this command's overrides on top, so `python train.py resume=DIR` needs no repeated settings;
    in-process (`overrides=None`) it is `current` as given. Either way, changing what is being trained
    (model, data, optimizer, ...) is refused, naming the fields, as is a checkpoint whose config would
    instantiate anything outside the allowlist (`check_targets`)."""
    check_targets(saved, "the checkpoint's config (resume=)")
    if overrides is None:
        config = current
    else:
        config = OmegaConf.create(saved)
        absent = object()
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            key = override.key_or_group
            if key == "resume":
                continue
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(config, parent) if parent else config
                if node is not None and leaf in node:
                    node.pop(leaf)
                continue
            value = OmegaConf.select(current, key, default=absent)
            if value is absent:  # a group placed at the top level (experiment=...): its fields are unknown here
                if override.input_line not in saved_overrides:
                    raise CheckpointError(
                        f"{override.input_line} cannot be changed when resuming (the checkpoint was made with "
                        f"{', '.join(saved_overrides) or 'no overrides'}); drop it, or start a new run with resume=null"
                    )
                continue
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(config, key, value, merge=False, force_add=True)
        config.resume = current.get("resume")
    differences = fixed_differences(saved, OmegaConf.to_container(config, resolve=True))
    if differences:
        raise CheckpointError(
            "the checkpoint was trained with other settings: "
            + "; ".join(differences)
            + ". Only trainer.* (not batch_size), logger.* and paths.* may change when resuming: drop the "
            "conflicting overrides, or start a new run with resume=null"
        )
    return config


def carried_overrides(saved_overrides: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """The overrides a resumed run's checkpoints record: the original run's, then this command's new ones
    (not resume=; a sweep job re-run in its own directory repeats its overrides, which are kept once)."""
    return list(dict.fromkeys([*saved_overrides, *(o for o in overrides if not o.startswith("resume="))]))
