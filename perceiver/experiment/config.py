"""The config as an interface: schemas that Hydra checks when it composes, the checks no constructor makes,
and the one error type for a bad setting.

The `trainer` group's schema is derived from `TrainSettings`, so its fields and types have one home; the
values it takes are still checked by `TrainSettings` itself (positive, one of, ...).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from perceiver.training.settings import TrainSettings

TRAINER_SCHEMA = "trainer_schema"  # conf/train.yaml's defaults list merges it under `trainer`
NUMBER_FIELDS = {"optimizer": ("lr", "weight_decay", "momentum", "eps")}  # `_target_` groups: no schema


class ConfigError(Exception):
    """A bad setting or missing data: reported as one message, without a traceback."""


def _schema_type(annotation: Any) -> Any:
    """OmegaConf takes plain types and Optional ones; other unions (float | str) become Any."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and others[0] in (int, float, str, bool):
            return typing.Optional[others[0]]  # noqa: UP045 - OmegaConf reads typing.Optional
        return Any
    return annotation if annotation in (int, float, str, bool) else Any


def trainer_schema() -> type:
    """A structured-config dataclass with TrainSettings' fields, types and defaults."""
    hints = typing.get_type_hints(TrainSettings)
    specs = [
        (f.name, _schema_type(hints[f.name]), dataclasses.field(default=f.default))
        for f in dataclasses.fields(TrainSettings)
    ]
    return dataclasses.make_dataclass("TrainerSchema", specs)


def register_schemas() -> None:
    """Put the schemas into Hydra's ConfigStore; the entry points call it before composing."""
    ConfigStore.instance().store(name=TRAINER_SCHEMA, node=trainer_schema(), package="trainer")


def train_settings(cfg: DictConfig) -> TrainSettings:
    from omegaconf import OmegaConf

    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    known = [f.name for f in dataclasses.fields(TrainSettings)]
    unknown = sorted(set(trainer) - set(known))
    if unknown:
        raise ConfigError(f"unknown trainer setting(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    try:
        return TrainSettings(**trainer)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_run_settings(cfg: DictConfig) -> None:
    """Top-level fields that no constructor checks, and numbers of groups that timm or torch build."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} is invalid: it must be an integer")
    fraction = cfg.data.val_fraction
    if not is_number(fraction) or not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction={fraction!r} is invalid: it must be a number in (0, 1)")
    rows = (cfg.get("logger") or {}).get("prediction_rows", 0)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ConfigError(f"logger.prediction_rows={rows!r} is invalid: a number of table rows >= 0 (0 = no table)")
    for group, names in NUMBER_FIELDS.items():
        node = cfg.get(group) or {}
        for name in names:
            value = node.get(name)
            if value is not None and not is_number(value):
                raise ConfigError(f"{group}.{name}={value!r} is invalid: it must be a number")


def invalid_value_message(key: str, value: object) -> str:
    """A one-line message for a value Hydra refused while composing (`trainer.epochs=abc`): the field's own
    check says what is valid when it has one, else the schema's type does."""
    group, _, name = key.partition(".")
    if group == "trainer" and name in {f.name for f in dataclasses.fields(TrainSettings)}:
        try:
            TrainSettings(**{name: value, "device": "cpu"} if name != "device" else {name: value})
        except (ValueError, TypeError) as error:
            return str(error)
    return f"{key}={value!r} is invalid: it has the wrong type"


register_schemas()  # on import: whoever composes conf/train.yaml (train.py, sweep.py, tests) has them
