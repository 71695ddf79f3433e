"""Perceiver (Jaegle et al., 2021) image classification: model, data, augmentation, training loop.

A library first: `from perceiver import Perceiver` needs no Hydra; `train.py` wires it to configs.
"""

from perceiver.augment import BatchAugment
from perceiver.data import ArrayDataset, CifarSource, DataError, ImageFolderSource, SyntheticSource
from perceiver.engine import TrainSettings, evaluate, fit
from perceiver.model import Perceiver
from perceiver.permutation import FixedPermutation
from perceiver.tracking import NullTracker, WandbTracker
from perceiver.vit import ViT

__all__ = [
    "ArrayDataset",
    "BatchAugment",
    "CifarSource",
    "DataError",
    "FixedPermutation",
    "ImageFolderSource",
    "NullTracker",
    "Perceiver",
    "SyntheticSource",
    "TrainSettings",
    "ViT",
    "WandbTracker",
    "evaluate",
    "fit",
]
