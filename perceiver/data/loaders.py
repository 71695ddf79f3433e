"""Batches for the training loop: device-resident slices of in-memory data, or a DataLoader, each serving
a seeded order per epoch that can start mid-epoch (exact resume) and be sharded across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from perceiver.data.dataset import ArrayDataset, Batch


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed of its own for each (run seed, epoch): an epoch's order does not depend on the epochs before it,
    so a run resumed at any epoch sees the batches an uninterrupted run would."""
    return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1)[0])


def epoch_order(count: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


@dataclass(frozen=True)
class Shard:
    """This rank's share of every epoch: every `world_size`-th index of the epoch's order from `rank` on.

    All ranks draw the same order, so the shards are disjoint, and global batch i (batch size x world
    size) is exactly batch i of a single process with that batch size. `even` cuts every shard to the
    same length (training: every rank must take the same number of steps); evaluation keeps every image.
    """

    rank: int = 0
    world_size: int = 1
    even: bool = True

    def length(self, count: int) -> int:
        if self.even:
            return count // self.world_size
        return len(range(self.rank, count, self.world_size))

    def select(self, order: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return order
        return order[self.rank :: self.world_size][: self.length(len(order))]


class DeviceBatches:
    """Batches sliced from a device-resident ArrayDataset; no workers, no per-sample Python.

    Each pass serves the next epoch (from 1) unless `set_epoch` picks one, and a part of one, to serve.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        device: torch.device,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        shard: Shard | None = None,
    ) -> None:
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.shard = shard or Shard()
        self.epoch, self.start_batch = 1, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next pass serves `epoch`'s batches from `start_batch` on (a resumed run skips those done)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches in a whole epoch (of this rank's shard)."""
        count = self.shard.length(len(self.labels))
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self.shard.select(epoch_order(len(self.labels), self.shuffle, self.seed, self.epoch))
        order = order.to(self.images.device)
        first = self.start_batch
        self.epoch, self.start_batch = self.epoch + 1, 0
        for start in range(first * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


class EpochSampler(Sampler[int]):
    """DataLoader indices in a per-epoch seeded order, like DeviceBatches: each pass serves the next epoch
    unless `set_epoch` picks one, from a start index on. Its length is always a whole epoch's."""

    def __init__(self, size: int, shuffle: bool, seed: int, shard: Shard | None = None) -> None:
        self.size, self.shuffle, self.seed, self.shard = size, shuffle, seed, shard or Shard()
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.shard.length(self.size)

    def __iter__(self) -> Iterator[int]:
        order = self.shard.select(epoch_order(self.size, self.shuffle, self.seed, self.epoch))
        first = self.start
        self.epoch, self.start = self.epoch + 1, 0
        yield from order[first:].tolist()


class EpochDataLoader(DataLoader):
    """A DataLoader over an EpochSampler that can serve a given epoch from a given batch (resuming)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        self.generator.manual_seed(epoch_seed(self.sampler.seed + 1, epoch))  # worker seeds, per epoch


class TransformedDataset(Dataset):
    """Applies a per-sample transform (e.g. timm RandAugment on PIL images) in DataLoader workers."""

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Batch:
        image, label = self.dataset[index]
        return self.transform(image), label


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int = 2,
    sample_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shard: Shard | None = None,
):
    """Device-resident batches for in-memory data; a DataLoader for folders and per-sample transforms.
    `shard`: this rank's part of every epoch in a distributed run."""
    if isinstance(dataset, ArrayDataset) and sample_transform is None:
        return DeviceBatches(dataset, batch_size, device, shuffle, drop_last, seed, shard)
    if sample_transform is not None:
        dataset = TransformedDataset(dataset, sample_transform)
    return EpochDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle, seed, shard),
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
