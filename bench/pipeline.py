"""The input pipeline: this project's device-resident batches against torchvision per-sample transforms in
DataLoader workers, and a training epoch against the model's step time x steps.

Data: CIFAR-sized random uint8 images (32 x 32 x 3), the Keras example's recipe (normalise, resize to the
model's size, random flip, random zoom +-20%).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.measure import make_torch_step, perceiver_kwargs, time_steps
from bench.settings import Setting
from perceiver.data import ArrayDataset, DeviceBatches
from perceiver.data.augment import BatchAugment
from perceiver.training import TrainSettings
from perceiver.training.loop import TrainStep, train_one_epoch
from perceiver.training.metrics import RunningMetrics

MEAN, STD = [129.3, 124.1, 112.4], [68.2, 65.4, 70.4]  # CIFAR-100's, in 0-255 units


def random_cifar(count: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8))
    return ArrayDataset(images, torch.from_numpy(rng.integers(0, 100, count)))


def device_pipeline_rate(data: ArrayDataset, image_size: int, batch_size: int) -> float:
    """Images/s of DeviceBatches + BatchAugment over one shuffled pass."""
    augment = BatchAugment(image_size, 100)
    augment.set_statistics(MEAN, STD)
    batches = DeviceBatches(data, batch_size, torch.device("cpu"), shuffle=True)
    start = time.perf_counter()
    for images, labels in batches:
        augment(images, labels)
    return len(data) / (time.perf_counter() - start)


class PerSampleCifar(torch.utils.data.Dataset):
    """What a torchvision user writes: a PIL image per index, transformed one at a time."""

    def __init__(self, data: ArrayDataset, transform) -> None:
        self.images = data.images.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision's CIFAR holds them
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def dataloader_rate(data: ArrayDataset, image_size: int, batch_size: int, workers: int) -> float:
    """Images/s of torchvision transforms (the same recipe) in a DataLoader with `workers` processes."""
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize(image_size),
            T.RandomHorizontalFlip(),
            T.RandomAffine(degrees=0, scale=(0.8, 1.2)),
            T.ToTensor(),
            T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD]),
        ]
    )
    loader = torch.utils.data.DataLoader(
        PerSampleCifar(data, transform), batch_size=batch_size, shuffle=True, num_workers=workers
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(data) / (time.perf_counter() - start)


def epoch_against_steps(setting: Setting, images: int, seconds: float = 10.0) -> dict[str, float]:
    """One training epoch through perceiver.training.loop (device batches, augmentation, metrics, the non-finite
    check) against the same model's isolated step on a fixed batch, times the epoch's steps."""
    from perceiver import Perceiver

    torch.manual_seed(0)
    model = Perceiver(**perceiver_kwargs(setting))
    step_seconds, _ = time_steps(make_torch_step(model, setting, "fp32", False), 2, seconds, 3)
    augment = BatchAugment(setting.image_size, setting.num_classes)
    augment.set_statistics(MEAN, STD)
    batches = DeviceBatches(random_cifar(images, seed=1), setting.batch_size, torch.device("cpu"), shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=True)
    settings = TrainSettings(batch_size=setting.batch_size, device="cpu", progress_bar=False)
    metrics = RunningMetrics(torch.device("cpu"), setting.num_classes)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    start = time.perf_counter()
    train_one_epoch(TrainStep(model, augment, optimizer, scaler, settings, torch.device("cpu")), batches, metrics)
    metrics.compute()  # the epoch's one read of the device-side sums
    epoch_seconds = time.perf_counter() - start
    return {
        "setting": setting.name,
        "steps": len(batches),
        "step_seconds": step_seconds,
        "epoch_seconds": epoch_seconds,
        "ratio": epoch_seconds / (step_seconds * len(batches)),
    }
