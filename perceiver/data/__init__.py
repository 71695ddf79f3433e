"""Data: sources -> uint8 tensors or lazy data sets, the seeded splits and statistics, loaders, and the
batched augmentation that turns uint8 batches into model inputs on the training device."""

from perceiver.data.augment import BatchAugment, Preprocess
from perceiver.data.dataset import ArrayDataset, DataError, split_indices
from perceiver.data.folders import decode_transform, open_rgb
from perceiver.data.loaders import DeviceBatches, EpochSampler, Shard, make_loader
from perceiver.data.sources import CifarSource, DataSource, ImageFolderSource, MnistSource, SyntheticSource
from perceiver.data.splits import Splits, channel_stats, prepare_splits, split_validation

__all__ = [
    "ArrayDataset",
    "BatchAugment",
    "CifarSource",
    "DataError",
    "DataSource",
    "DeviceBatches",
    "EpochSampler",
    "ImageFolderSource",
    "MnistSource",
    "Preprocess",
    "Shard",
    "Splits",
    "SyntheticSource",
    "channel_stats",
    "decode_transform",
    "make_loader",
    "open_rgb",
    "prepare_splits",
    "split_indices",
    "split_validation",
]
