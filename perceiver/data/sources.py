"""Where images come from: CIFAR (torchvision), the MNIST family's idx files (`mnist.py`), generated images, or a
folder of class subfolders (`folders.py`).

Every source yields uint8 (C, H, W) images and int64 labels; conversion to float, normalisation, resizing
and augmentation happen later, on whole batches on the training device (`augment.py`). CIFAR, MNIST and synthetic
data load as in-memory tensors; an image folder is checked up front, decoded once into a cache and held in
memory when it fits, else read lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from perceiver.data.dataset import ArrayDataset, DataError
from perceiver.data.folders import ImageFolderSource
from perceiver.data.mnist import MnistSource

__all__ = ["CifarSource", "DataSource", "ImageFolderSource", "MnistSource", "SyntheticSource"]


# ----------------------------------------------------------------------------- sources


class DataSource(Protocol):
    """What `prepare_splits` needs from a data set: cheap checks first, the loading after."""

    num_classes: int
    classes: list[str] | None  # class names by label index (CIFAR's are known once loaded)
    image_size: int  # the side the images come in: what a trained model's inputs are decoded to

    @property
    def cache_key(self) -> str:
        """Names the data for the statistics cache."""
        ...

    def check(self) -> None:
        """Raise DataError, without loading anything, when the data cannot be had."""
        ...

    def load(self) -> tuple[Dataset, Dataset]:
        """(train, test) data sets of (uint8 CHW image, label) pairs."""
        ...


class CifarSource:
    """CIFAR-10/100 through torchvision's dataset classes, downloaded into `root` when absent. The class names
    are the data set's own (its meta file), known once it is loaded."""

    image_size = 32

    archives: ClassVar[dict[str, tuple[str, str, str, int]]] = {
        "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz", 10),
        "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz", 100),
    }

    def __init__(self, name: str = "cifar100", root: str = "~/.cache/perceiver/data", download: bool = True) -> None:
        if name not in self.archives:
            raise ValueError(f"name={name!r} is invalid: choose one of {', '.join(self.archives)}")
        self.name = name
        self.root = Path(os.path.expanduser(str(root)))
        self.download = download
        self.num_classes = self.archives[name][3]
        self.classes: list[str] | None = None

    @property
    def cache_key(self) -> str:
        return self.name

    def check(self) -> None:
        """Fail before any work when the data can be neither found nor downloaded."""
        folder = self.archives[self.name][1]
        if not self.download and not (self.root / folder).is_dir():
            raise DataError(self._missing_message(f"{self.root / folder} does not exist and data.download=false"))

    def load(self) -> tuple[ArrayDataset, ArrayDataset]:
        import torchvision

        dataset_class = getattr(torchvision.datasets, self.archives[self.name][0])
        try:
            train = dataset_class(str(self.root), train=True, download=self.download)
            test = dataset_class(str(self.root), train=False, download=self.download)
        except Exception as error:  # torchvision raises URLError, RuntimeError, OSError, ...
            raise DataError(self._missing_message(f"{type(error).__name__}: {error}")) from error
        self.classes = list(train.classes)
        return _to_arrays(train.data, train.targets), _to_arrays(test.data, test.targets)

    def _missing_message(self, reason: str) -> str:
        _, folder, archive, _ = self.archives[self.name]
        return (
            f"could not load {self.name} from {self.root} ({reason}).\n"
            f"  Looked for: {self.root / folder}/ (the extracted archive)\n"
            f"  Fix: download {archive} from https://www.cs.toronto.edu/~kriz/{archive} and place it in "
            f"{self.root}/ (torchvision verifies and extracts it when data.source.download=true), or extract it "
            "there yourself; or set paths.data_root (or the PERCEIVER_DATA_ROOT environment variable) to a "
            "folder that holds it.\n"
            "  Offline alternative: data=synthetic (generated on the spot, no files)."
        )


def _to_arrays(images_nhwc: np.ndarray, labels: list[int]) -> ArrayDataset:
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(images, torch.as_tensor(labels, dtype=torch.long))


class SyntheticSource:
    """Generated images with a learnable class signal, for tests and smoke runs (no files).

    Each class owns a random smooth colour template; an image is its class template under a random
    brightness plus pixel noise, so the class is learnable but no single pixel gives it away.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        num_train: int = 2000,
        num_test: int = 500,
        noise: float = 0.25,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("num_train", num_train),
            ("num_test", num_test),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} is invalid: a classification task needs >= 2")
        self.num_classes = num_classes
        self.classes = [f"class_{label}" for label in range(num_classes)]
        self.image_size = image_size
        self.num_train = num_train
        self.num_test = num_test
        self.noise = noise
        self.seed = seed

    @property
    def cache_key(self) -> str:
        return (
            f"synthetic-{self.num_classes}-{self.image_size}-{self.num_train}-{self.num_test}-{self.noise}-{self.seed}"
        )

    def check(self) -> None:
        return None

    def load(self) -> tuple[ArrayDataset, ArrayDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.rand(self.num_classes, 3, 4, 4, generator=generator)
        templates = torch.nn.functional.interpolate(coarse, size=self.image_size, mode="bicubic", align_corners=False)
        train = self._sample(templates, self.num_train, generator)
        test = self._sample(templates, self.num_test, generator)
        return train, test

    def _sample(self, templates: torch.Tensor, count: int, generator: torch.Generator) -> ArrayDataset:
        labels = torch.randint(0, self.num_classes, (count,), generator=generator)
        images = templates[labels]
        brightness = 0.75 + 0.5 * torch.rand(count, 1, 1, 1, generator=generator)
        images = images * brightness + self.noise * torch.randn(images.shape, generator=generator)
        return ArrayDataset((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)
