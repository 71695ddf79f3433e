"""The in-memory form every source can take: uint8 image tensors with labels, and the seeded split of one."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(RuntimeError):
    """The data a run asked for is missing or unusable; the message says how to fix it."""


class ArrayDataset(Dataset):
    """Images (N, C, H, W) uint8 and labels (N,) int64 held as two tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.labels[index]

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[indices], self.labels[indices])


def split_indices(
    count: int, fraction: float, seed: int, setting: str = "the split fraction", of: str = "images"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of range(count) into (1 - fraction, fraction) parts. `setting` names the fraction
    and `of` what is split, for the error when too few are given to keep at least one on each side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction {fraction!r} is invalid: it must be in (0, 1)")
    held = max(1, round(count * fraction))
    if held >= count:
        lower = f", or lower {setting}" if held > 1 else ""
        raise DataError(
            f"{setting}={fraction} holds out {held} of the {count} {of}, which leaves none for training: "
            f"add images (at least {held + 1} here){lower}"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values
