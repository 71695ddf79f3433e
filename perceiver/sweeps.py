"""Hydra sweeps seen from one job and from the whole grid: which overrides are swept, what a job is
called in W&B, and the native W&B sweep config of a grid.

A sweep's grid is the union of `hydra.sweeper.params` (the named ablations in conf/ablation/) and the
comma-lists on the command line; Hydra records both in the sweep directory's `multirun.yaml`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

MAX_TAG_LENGTH = 64  # W&B rejects longer tags
MAX_NAME_LENGTH = 128


def split_override(override: str) -> tuple[str, str]:
    """`+model.latent_dim=32` -> (`model.latent_dim`, `32`); `~key` -> (`key`, ``)."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def key_of(override: str) -> str:
    return split_override(override)[0]


def grid_arguments(params: Mapping[str, Any] | None, task: Sequence[str]) -> list[str]:
    """The overrides a multirun expands: sweeper params first, then the command line (which wins)."""
    return [f"{key}={value}" for key, value in (params or {}).items()] + list(task)


def grid(arguments: Sequence[str]) -> dict[str, list[str]]:
    """Every key of the grid with its values, in Hydra's order (a later override of a key replaces it)."""
    axes: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override():
            axes[key] = [str(value) for value in override.sweep_string_iterator()]
        else:
            axes[key] = [override.get_value_element_as_str()]
    return axes


def recorded_sweep(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's own config (Hydra's multirun.yaml, unresolved); None for a directory without one."""
    path = Path(sweep_dir) / "multirun.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def swept_in(recorded: Mapping[str, Any]) -> list[str]:
    """The keys that take more than one value in a recorded sweep."""
    hydra = recorded["hydra"]
    arguments = grid_arguments((hydra.get("sweeper") or {}).get("params"), hydra["overrides"]["task"])
    return [key for key, values in grid(arguments).items() if len(values) > 1]


def swept_keys(sweep_dir: Path) -> list[str] | None:
    """The swept keys of the sweep in `sweep_dir`; None when it left no multirun.yaml."""
    recorded = recorded_sweep(sweep_dir)
    return swept_in(recorded) if recorded is not None else None


def short_key(key: str, keys: Iterable[str]) -> str:
    """`model.latent_dim` -> `latent_dim`, unless another key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    clashes = [other for other in keys if other.rsplit(".", 1)[-1] == last]
    return last if len(clashes) == 1 else key


def run_name(overrides: Sequence[str], swept: Sequence[str] | None) -> str | None:
    """`latent_dim=512,seed=1`: the swept overrides of a job (all of them outside a sweep); None if none."""
    pairs = [split_override(o) for o in overrides]
    if swept is not None:
        pairs = [(key, value) for key, value in pairs if key in swept]
    keys = [key for key, _ in pairs]
    name = ",".join(f"{short_key(key, keys)}={value}" for key, value in pairs)
    return name[:MAX_NAME_LENGTH] or None


def run_tags(overrides: Sequence[str], extra: Iterable[str] = ()) -> list[str]:
    """The job's overrides and any extra tags, each cut to W&B's tag length, without duplicates."""
    tags = [*extra, *overrides]
    return list(dict.fromkeys(tag[:MAX_TAG_LENGTH] for tag in tags if tag))


def parse_value(text: str) -> Any:
    """`32` -> 32, `1e-3` -> 0.001, `true` -> True, `adam` -> 'adam' (YAML rules, as Hydra reads them)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, int | float | bool | str) or value is None else text


def wandb_sweep_config(
    arguments: Sequence[str], name: str, project: str | None = None, method: str = "grid"
) -> dict[str, Any]:
    """A native W&B sweep over the same grid: its agent runs `train.py` with Hydra overrides (key=value)."""
    swept = {key: values for key, values in grid(arguments).items() if len(values) > 1}
    parsed = OverridesParser.create().parse_overrides(list(arguments))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and key_of(o.input_line) not in swept]
    config: dict[str, Any] = {
        "name": name,
        "program": "train.py",
        "method": method,
        "metric": {"name": "test/top1", "goal": "maximize"},
        "parameters": {key: {"values": [parse_value(v) for v in values]} for key, values in swept.items()},
        "command": ["${env}", "${interpreter}", "${program}", *fixed, "${args_no_hyphens}"],
    }
    if project:
        config["project"] = project
    return config
