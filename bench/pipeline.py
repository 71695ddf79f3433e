"""The input pipeline: this project's device-resident batches against torchvision per-sample transforms in
DataLoader workers, and a training epoch against the model's step time x steps.

Data: CIFAR-sized random uint8 images (32 x 32 x 3), the Keras example's recipe (normalise, resize to the
model's size, random flip, random zoom +-20%).

`python -m bench augment [--images N] [--image-size S]` times the augmentation configs on in-memory data:
conf/augmentation/keras.yaml, randaugment.yaml (RandAugment batched on the device) and randaugment.yaml with
`randaugment_backend=timm` (timm's per-image PIL RandAugment in 2 DataLoader workers, then the batched rest).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.measure import make_torch_step, perceiver_kwargs, time_steps
from bench.settings import Setting
from perceiver.data import ArrayDataset, DeviceBatches
from perceiver.data.augment import BatchAugment
from perceiver.training import TrainingParts, TrainSettings, fit

MEAN, STD = [129.3, 124.1, 112.4], [68.2, 65.4, 70.4]  # CIFAR-100's, in 0-255 units


def random_cifar(count: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8))
    return ArrayDataset(images, torch.from_numpy(rng.integers(0, 100, count)))


def device_pipeline_rate(data: ArrayDataset, image_size: int, batch_size: int, **augmentation) -> float:
    """Images/s of DeviceBatches + BatchAugment (the Keras recipe, plus `augmentation`) over one shuffled pass."""
    augment = BatchAugment(image_size, 100, **augmentation)
    augment.set_statistics(MEAN, STD)
    batches = DeviceBatches(data, batch_size, torch.device("cpu"), shuffle=True)
    start = time.perf_counter()
    for images, labels in batches:
        augment(images, labels)
    return len(data) / (time.perf_counter() - start)


def timm_randaugment_rate(data: ArrayDataset, image_size: int, batch_size: int, workers: int = 2) -> float:
    """Images/s of `augmentation=randaugment augmentation.randaugment_backend=timm`: timm's RandAugment per image
    (PIL) in DataLoader workers, as `make_loader` runs it, then the batched Keras recipe."""
    from perceiver.data import make_loader

    augment = BatchAugment(image_size, 100, randaugment=RANDAUGMENT, randaugment_backend="timm")
    augment.set_statistics(MEAN, STD)
    loader = make_loader(data, batch_size, torch.device("cpu"), shuffle=True, num_workers=workers,
                         sample_transform=augment.sample_transform())  # fmt: skip
    start = time.perf_counter()
    for images, labels in loader:
        augment(images, labels)
    return len(data) / (time.perf_counter() - start)


RANDAUGMENT = "rand-m9-mstd0.5"  # conf/augmentation/randaugment.yaml


def augmentation_rates(images: int, image_size: int, batch_size: int = 64) -> dict[str, float]:
    torch.manual_seed(0)
    data = random_cifar(images)
    return {
        "keras (flip, zoom)": device_pipeline_rate(data, image_size, batch_size),
        "randaugment, device backend": device_pipeline_rate(
            data, image_size, batch_size, randaugment=RANDAUGMENT, randaugment_backend="device"
        ),
        "randaugment, timm backend (2 workers)": timm_randaugment_rate(data, image_size, batch_size),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench augment", description="images/s of the augmentations")
    parser.add_argument("--images", type=int, default=10_000, help="random 32x32 uint8 images, held in memory")
    parser.add_argument("--image-size", type=int, default=64, help="the model's input side (resize target)")
    args = parser.parse_args(argv)
    rates = augmentation_rates(args.images, args.image_size)
    print(f"command: python -m bench augment {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    size, threads = args.image_size, torch.get_num_threads()
    print(f"{args.images} images of 32x32 -> {size}x{size}, batch 64, {threads} threads\n")
    print("| augmentation | images/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()


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
    """One training epoch of `fit` (device batches, augmentation, metrics, the non-finite check; its epoch_seconds,
    which leave out the validation, here of nothing) against the same model's isolated step on a fixed batch, times
    the epoch's steps."""
    from perceiver import Perceiver

    torch.manual_seed(0)
    model = Perceiver(**perceiver_kwargs(setting))
    step_seconds, _ = time_steps(make_torch_step(model, setting, "fp32", False), 2, seconds, 3)
    augment = BatchAugment(setting.image_size, setting.num_classes)
    augment.set_statistics(MEAN, STD)
    batches = DeviceBatches(random_cifar(images, seed=1), setting.batch_size, torch.device("cpu"), shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=True)
    settings = TrainSettings(
        epochs=1, batch_size=setting.batch_size, device="cpu", progress_bar=False, save_checkpoints=False
    )
    parts = TrainingParts(model, augment, optimizer, None, setting.num_classes)
    with tempfile.TemporaryDirectory() as run_dir:
        epoch_seconds = fit(parts, batches, [], settings, Path(run_dir)).train_seconds
    return {
        "setting": setting.name,
        "steps": len(batches),
        "step_seconds": step_seconds,
        "epoch_seconds": epoch_seconds,
        "ratio": epoch_seconds / (step_seconds * len(batches)),
    }
