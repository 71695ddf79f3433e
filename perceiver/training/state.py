"""The checkpoint format, defined once: a resumable `TrainState` and the `BestModel` derived from it.

Both are written as `torch.save`d dicts of tensors and plain values (what `torch.load(weights_only=True)`
reads) and only ever read back through `from_dict`, which names what is missing from a damaged or
foreign file. Adding a field means adding it here.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which one and what to do instead."""


def check_header(state: Any, kind: str, version: int, source: object, what: str) -> None:
    """`state` is a dict written as `kind` at `version`, else CheckpointError naming `source` and saying `what`
    it should have been."""
    if not isinstance(state, dict) or state.get("format") != kind:
        raise CheckpointError(f"{source} is not {what}")
    if state.get("version") != version:
        raise CheckpointError(f"{source} has checkpoint version {state.get('version')}; this code reads {version}")


def _missing(state: dict[str, Any], names: list[str], source: object) -> None:
    absent = [name for name in names if name not in state]
    if absent:
        raise CheckpointError(f"{source} lacks {', '.join(absent)}: it is incomplete or from another program")


@dataclass
class RunRecord:
    """What a checkpoint records about the run besides its training state: how it was configured."""

    config: dict[str, Any] | None = None
    overrides: list[str] = field(default_factory=list)
    wandb_run_id: str | None = None
    # What best.pt needs to be used outside the run and that the loop cannot know: BestModel's model_config,
    # classes, data_image_size and data (the loop adds the normalisation its input pipeline applied).
    model_card: dict[str, Any] | None = None


@dataclass
class TrainState:
    """Everything a run needs to continue at (`next_epoch`, `next_batch`) as if it had never stopped."""

    FORMAT: ClassVar[str] = "perceiver-checkpoint"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = (
        "a resumable checkpoint (best.pt holds weights only); resume from the run directory or its last.pt"
    )
    ADDED: ClassVar[tuple[str, ...]] = ("ema",)  # fields added since version 1: an older file lacks them (defaults)

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any]
    early_stopping: dict[str, Any]
    best_model: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    next_epoch: int = 1
    next_batch: int = 0
    global_step: int = 0
    epoch_progress: dict[str, Any] | None = None  # a part-done epoch's metric sums and seconds
    ema: dict[str, Any] | None = None  # the weight EMA's state (WeightEMA.state_dict); None = no EMA
    rng: dict[str, Any] = field(default_factory=lambda: rng_states())
    run: RunRecord = field(default_factory=RunRecord)

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.next_epoch - 1

    @property
    def best_epoch(self) -> int:
        return self.early_stopping.get("best_epoch", 0)

    def last_val(self) -> dict[str, float] | None:
        if not self.history:
            return None
        return {k.removeprefix("val/"): v for k, v in self.history[-1].items() if k.startswith("val/")}

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"}
        derived = {"epoch": self.epoch, "best_epoch": self.best_epoch, "val": self.last_val()}
        run = self.run
        record = {"config": run.config, "overrides": list(run.overrides), "wandb_run_id": run.wandb_run_id}
        return {"format": self.FORMAT, "version": self.VERSION, **own, **derived, **record}

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: object = "the checkpoint") -> TrainState:
        check_header(state, cls.FORMAT, cls.VERSION, source, cls.WHAT)
        names = [f.name for f in fields(cls) if f.name != "run"]
        required = [name for name in names if name not in cls.ADDED]
        _missing(state, [*required, "config", "overrides", "wandb_run_id"], source)
        record = RunRecord(state["config"], list(state["overrides"]), state["wandb_run_id"])
        return cls(**{name: state[name] for name in names if name in state}, run=record)


@dataclass
class BestModel:
    """The weights with the lowest validation loss (best.pt), and everything needed to use them outside the run:
    how to build the model, how its inputs were prepared and what its outputs mean.

    Version 2 added the fields after `config`; a version-1 file is refused, naming them (`from_dict`).
    """

    FORMAT: ClassVar[str] = "perceiver-model"
    VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "a model file (best.pt) of this project"

    model: dict[str, torch.Tensor]
    epoch: int
    val: dict[str, float]
    config: dict[str, Any] | None = None  # the run's resolved config
    model_config: dict[str, Any] | None = None  # `_target_` and the constructor arguments it was built with
    classes: list[str] | None = None  # class names, by label index
    mean: list[float] | None = None  # per-channel normalisation the training applied (0-255 units)
    std: list[float] | None = None
    data_image_size: int | None = None  # side S of the images as the data set decoded them (the model's input)
    image_size: int | None = None  # side the model sees: images are resized from S to it after normalising
    data: dict[str, Any] | None = None  # the data set's config: where the images came from

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": self.FORMAT, "version": self.VERSION, **own}

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: object = "the model file") -> BestModel:
        if isinstance(state, dict) and state.get("format") == cls.FORMAT and state.get("version") == 1:
            added = ", ".join(f.name for f in fields(cls)[4:])
            raise CheckpointError(
                f"{source} is a version-1 model file: it holds the weights and the run's config but not {added}, "
                "which using the model outside its run needs; train the run again with this version"
            )
        check_header(state, cls.FORMAT, cls.VERSION, source, cls.WHAT)
        names = [f.name for f in fields(cls)]
        _missing(state, names, source)
        return cls(**{name: state[name] for name in names})

    def missing_card(self) -> list[str]:
        """Which of the fields that rebuilding and feeding the model needs are empty: a `fit` called without
        `RunRecord.model_card` knows the normalisation but not how the model was built or what its classes are."""
        needed = ("model_config", "classes", "mean", "std", "image_size")
        return [name for name in needed if getattr(self, name) is None]


# ----------------------------------------------------------------------------- random number generators


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and CUDA generator states, in types `torch.load(weights_only=True)` reads."""
    version, keys, gauss = random.getstate()
    kind, array, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [kind, torch.from_numpy(array.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    version, keys, gauss = states["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, array, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, array.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            log.warning(
                "the checkpoint saved %d CUDA generator states, this machine has %d GPUs: not restored",
                len(states["cuda"]),
                torch.cuda.device_count(),
            )
