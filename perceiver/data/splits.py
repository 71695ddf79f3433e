"""The seeded validation split and the normalisation statistics of what is left for training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from perceiver.data.cache import CacheDir
from perceiver.data.dataset import ArrayDataset, DataError, split_indices
from perceiver.data.sources import DataSource


def subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(indices)
    return Subset(dataset, indices.tolist())


def channel_stats(dataset: Dataset, max_images: int = 50_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 255] units over (up to max_images of) a data set."""
    if isinstance(dataset, ArrayDataset):
        images = dataset.images[:max_images].double()
        mean = images.mean(dim=(0, 2, 3))
        std = images.std(dim=(0, 2, 3), unbiased=False)
        return mean.tolist(), std.tolist()
    total = total_sq = None
    pixels = 0
    # Its own generator: creating an iterator draws a seed, and the global RNG belongs to training.
    loader = DataLoader(dataset, batch_size=256, num_workers=0, generator=torch.Generator().manual_seed(0))
    seen = 0
    for images, _ in loader:
        x = images[: max_images - seen].double()  # the last batch may overshoot max_images
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
        seen += x.shape[0]
        if seen >= max_images:
            break
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def cached_channel_stats(dataset: Dataset, key: str, cache_dir: Path | None) -> tuple[list[float], list[float]]:
    """`channel_stats`, stored as JSON under cache_dir so later runs on the same split skip the pass. A cache folder
    that cannot be written only costs the recomputation next time (`CacheDir` says so once)."""
    cache = CacheDir(cache_dir)
    stored = cache.read_json(f"stats-{key}.json")
    if stored is not None:
        try:
            return [float(m) for m in stored["mean"]], [float(s) for s in stored["std"]]
        except (KeyError, TypeError, ValueError):
            pass  # not a statistics file: recompute and overwrite
    mean, std = channel_stats(dataset)
    cache.write_json(f"stats-{key}.json", {"mean": mean, "std": std})
    return mean, std


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    mean: list[float]
    std: list[float]


def prepare_splits(
    source: DataSource,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: Path | None = None,
    train_size: int | None = None,
) -> Splits:
    """Load a source, hold out a seeded validation split of its training set, and compute
    normalisation statistics on what remains (the example's `Normalization.adapt`). `train_size` keeps a seeded
    sample of that many training images (a reduced setting); the validation and test sets stay whole. A failed load
    raises DataError itself; callers that want to fail before other work call `source.check()` first."""
    train_full, test = source.load()
    train, val = split_validation(train_full, val_fraction, seed, train_size)
    key = f"{source.cache_key}-n{len(train_full)}-val{val_fraction}-seed{seed}"
    key += f"-train{train_size}" if train_size is not None else ""
    mean, std = cached_channel_stats(train, key, cache_dir)
    return Splits(train, val, test, source.num_classes, mean, std)


def split_validation(
    train_full: Dataset, val_fraction: float, seed: int, train_size: int | None = None
) -> tuple[Dataset, Dataset]:
    """(train, validation): the seeded split a run trains and validates on, the same for every later use of it."""
    train_idx, val_idx = split_indices(len(train_full), val_fraction, seed, "data.val_fraction", "training images")
    if train_size is not None:
        train_idx = sample_indices(train_idx, train_size, seed)
    return subset(train_full, train_idx), subset(train_full, val_idx)


def sample_indices(indices: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """A seeded sample of `size` of `indices` (sorted), for `data.train_size`; an error when there are fewer."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"data.train_size={size!r} is invalid: it must be a number of images >= 1, or null for all")
    if size > len(indices):
        raise DataError(
            f"data.train_size={size} asks for more training images than the split leaves ({len(indices)}): "
            f"lower it to at most {len(indices)}, or set it to null for all of them"
        )
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))  # apart from the split's
    return indices[order[:size]].sort().values
