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
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from perceiver.experiment.config import composition_message
from perceiver.experiment.tracking import has_wandb_credentials

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


# ----------------------------------------------------------------------------- the sweep command line


class SweepError(Exception):
    """A bad command line or sweep directory: one message, no traceback."""


def ablations(conf_dir: Path) -> dict[str, str]:
    """Named grids and the one-line comment that says what each reproduces."""
    named = {}
    for path in sorted((Path(conf_dir) / "ablation").glob("*.yaml")):
        comments = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("# ")]
        named[path.stem] = next((c for c in comments if not c.startswith("@package")), "")
    return named


def compose_sweep(conf_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The sweep's config with its Hydra node, composed from the non-sweep overrides (fails fast on typos)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose("train", overrides=fixed, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        grids = str(getattr(error, "missing_cfg_file", "")).startswith("ablation/")
        raise SweepError(composition_message(error, "named grids:" if grids else "choose one of")) from error
    finally:
        GlobalHydra.instance().clear()


def recorded_command(sweep_dir: Path) -> list[str]:
    """The overrides a sweep was launched with (its multirun.yaml), without its directory and mode."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        raise SweepError(f"{path} not found: resume needs a sweep directory made by train.py --multirun or sweep.py")
    recorded = OmegaConf.load(path).hydra.overrides
    launcher = [o for o in recorded.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    return [*recorded.task, *launcher]


def write_wandb_sweep(conf_dir: Path, overrides: Sequence[str]) -> int:
    """A native W&B grid sweep over the same grid; created on the server when credentials exist."""
    config = compose_sweep(conf_dir, overrides)
    arguments = grid_arguments(config.hydra.sweeper.get("params"), overrides)
    name = config.ablation.name or "sweep"
    sweep = wandb_sweep_config(arguments, name=name, project=config.logger.get("project"))
    out = Path(config.hydra.sweep.dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "wandb_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    print(f"W&B sweep config: {path}")
    if not has_wandb_credentials():
        print(f"no W&B credentials: create it later with `wandb sweep {path}`, then run `wandb agent SWEEP_ID`")
        return 0
    import wandb

    sweep_id = wandb.sweep(sweep, project=config.logger.get("project"), entity=config.logger.get("entity"))
    print(f"created W&B sweep {sweep_id}: run agents with `wandb agent {sweep_id}`")
    return 0
