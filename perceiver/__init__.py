"""Perceiver (Jaegle et al., 2021) image classification: models, data, the training loop, and the Hydra/W&B
experiment layer on top.

`import perceiver` is cheap: names load on first use, and `perceiver.models` never pulls in Hydra or W&B.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Perceiver": "perceiver.models",
    "ViT": "perceiver.models",
    "FixedPermutation": "perceiver.models",
    "BatchAugment": "perceiver.data",
    "ArrayDataset": "perceiver.data",
    "CifarSource": "perceiver.data",
    "DataError": "perceiver.data",
    "ImageFolderSource": "perceiver.data",
    "SyntheticSource": "perceiver.data",
    "TrainSettings": "perceiver.training",
    "TrainingParts": "perceiver.training",
    "evaluate": "perceiver.training",
    "fit": "perceiver.training",
    "Classifier": "perceiver.inference",
    "export": "perceiver.inference",
    "load_run": "perceiver.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'perceiver' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
