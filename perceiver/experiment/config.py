"""The config as an interface: schemas that Hydra checks when it composes, the checks no constructor makes,
and the one error type for a bad setting.

The `trainer` group's schema is derived from `TrainSettings`, so its fields and types have one home; the
values it takes are still checked by `TrainSettings` itself (positive, one of, ...).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Union

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from perceiver.training.settings import TrainSettings

# What a config read back from a file (a checkpoint's, a run's, a sweep's multirun.yaml) may instantiate: the
# classes of this project and the optimizers and schedulers of torch and timm, and the optimizer factories (the
# functions of the modules below; this project's other functions, perceiver.files' writers among them, are not).
# Anything else, whatever Hydra itself would allow, is refused naming it: a config from a file is data, never code.
ALLOWED_TARGET_PACKAGES = ("perceiver", "torch.optim", "timm.optim", "timm.scheduler")
ALLOWED_FUNCTION_MODULES = ("perceiver.training.optimizers", "timm.optim")
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
    lr = (cfg.get("optimizer") or {}).get("lr")
    if lr is not None and not lr > 0:  # torch says so only once the model is built, without naming the field
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: the learning rate must be a positive number")


def composition_message(error: BaseException, options_label: str = "choose one of") -> str:
    """One line for a config Hydra could not compose. A missing option (`optimizer=adamx`, `ablation=nope`,
    `hydra/launcher=nope`) names the valid ones; Hydra's own lines (its config search path, the options one per
    line) are left out."""
    message = str(error).split("\nConfig search path:")[0].split("\nSearch path:")[0]
    options = getattr(error, "options", None)
    if isinstance(error, MissingConfigException) and options:
        first = message.split("\n")[0].strip()
        return f"{first}: {options_label} {', '.join(options)}"
    cause = error.__cause__
    return " ".join(" ".join(filter(None, [message, str(cause or "")])).split())


def _within(name: object, packages: tuple[str, ...]) -> bool:
    return isinstance(name, str) and any(name == p or name.startswith(f"{p}.") for p in packages)


def allowed_target(target: object) -> bool:
    """True for a class of ALLOWED_TARGET_PACKAGES or a function of ALLOWED_FUNCTION_MODULES, judged by its name
    and by what the name resolves to (`perceiver.files.os.remove` is os.remove: refused). Only names inside the
    allowed packages are ever imported."""
    if not _within(target, ALLOWED_TARGET_PACKAGES):
        return False
    from hydra._internal.utils import _locate  # what instantiate resolves; hydra.utils.get_object also logs errors

    try:
        found = _locate(str(target))
    except Exception:  # an unknown name: nothing of it may run
        return False
    module = getattr(found, "__module__", None)
    if inspect.isclass(found):
        return _within(module, ALLOWED_TARGET_PACKAGES)
    return inspect.isfunction(found) and _within(module, ALLOWED_FUNCTION_MODULES)


def targets(node: Any, path: str = "") -> list[tuple[str, object]]:
    """(config path, `_target_`) of every node that Hydra's `instantiate` would build, at any depth."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    found: list[tuple[str, object]] = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((f"{path}._target_" if path else "_target_", node["_target_"]))
        for key, value in node.items():
            found += targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += targets(value, f"{path}[{index}]")
    return found


def check_targets(config: Any, source: str) -> None:
    """Refuse a config read from a file (`source` names it) that would instantiate anything outside the
    allowlist (ALLOWED_TARGET_PACKAGES), before anything of it is built."""
    for where, target in targets(config):
        if not allowed_target(target):
            raise ConfigError(
                f"{source}: {where}={target!r} is refused: a config read from a file may only instantiate classes "
                f"of {', '.join(ALLOWED_TARGET_PACKAGES)} and the optimizer factories of "
                f"{', '.join(ALLOWED_FUNCTION_MODULES)}. Do not use a file you do not trust"
            )


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
