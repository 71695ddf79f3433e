"""Where images come from: CIFAR (torchvision), generated images, or a folder of class subfolders.

Every source yields uint8 (C, H, W) images and int64 labels; conversion to float, normalisation, resizing
and augmentation happen later, on whole batches on the training device (`augment.py`). CIFAR and synthetic
data load as in-memory tensors; an image folder is checked up front and read lazily.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from perceiver.data.dataset import ArrayDataset, DataError, split_indices

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


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


BAD_FILE_POLICIES = ("error", "skip")


def _is_readable_image(path: Path) -> bool:
    """PIL recognises the file and its structure checks out (`verify` reads it without decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for broken files
        return False
    return True


@dataclass
class FolderScan:
    """What a class-folder tree holds: usable images per class, and what cannot be used."""

    images: dict[str, list[str]]  # class name -> image paths, for classes that have any
    not_images: list[Path]  # files without an image extension
    unreadable: list[Path]  # image extension, but PIL cannot read them
    empty_classes: list[Path]  # class folders without one usable image

    def problems(self, limit: int = 10) -> str:
        lines = []
        for what, paths in (
            ("not image files", self.not_images),
            ("unreadable images", self.unreadable),
            ("class folders without images", self.empty_classes),
        ):
            if paths:
                more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
                lines.append(f"  {what} ({len(paths)}): {', '.join(str(p) for p in paths[:limit])}{more}")
        return "\n".join(lines)


def scan_image_folder(folder: Path) -> FolderScan:
    """Check every file below `folder/<class>/` once, before training, so a bad file is named up front
    instead of failing a DataLoader worker hours in. Hidden files (.DS_Store, ...) are ignored."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.datasets.folder import IMG_EXTENSIONS

    files: dict[str, list[Path]] = {}
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        found = (p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        files[class_dir.name] = sorted(found)
    candidates = [p for paths in files.values() for p in paths if p.suffix.lower() in IMG_EXTENSIONS]
    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads: threads overlap the waiting
        readable = dict(zip(candidates, pool.map(_is_readable_image, candidates), strict=True))
    scan = FolderScan({}, [], [], [])
    for name, paths in files.items():
        good = [str(p) for p in paths if readable.get(p)]
        scan.not_images += [p for p in paths if p not in readable]
        scan.unreadable += [p for p in paths if readable.get(p) is False]
        if good:
            scan.images[name] = good
        else:
            scan.empty_classes.append(folder / name)
    return scan


class ImageFolderSource:
    """A user's folder of class subfolders (`path/<class>/<image>`), read lazily with torchvision.

    Images are decoded and resized to `image_size` x `image_size` in DataLoader workers. Without a
    `test_path`, a seeded `test_fraction` of the images is held out as the test set. Every file is
    checked up front: non-image or unreadable files and classes without images are an error listing
    them, or with `bad_files=skip` are left out (with a warning that counts them).
    """

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        test_path: str | None = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        bad_files: str = "error",
    ) -> None:
        if bad_files not in BAD_FILE_POLICIES:
            raise ValueError(f"bad_files={bad_files!r} is invalid: choose one of {', '.join(BAD_FILE_POLICIES)}")
        self.path = Path(os.path.expanduser(str(path)))
        self.test_path = Path(os.path.expanduser(str(test_path))) if test_path else None
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.seed = seed
        self.bad_files = bad_files
        self.scans: dict[str, FolderScan] = {}
        self.check()
        self.classes = sorted(self.scans["data.source.path"].images)
        self.num_classes = len(self.classes)
        if self.num_classes < 2:
            raise DataError(
                f"data.source.path={str(self.path)!r} has {self.num_classes} class with images "
                f"({', '.join(self.classes)}); a classifier needs at least 2 classes: add a subfolder per class"
            )

    @property
    def cache_key(self) -> str:
        return f"folder-{hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]}-{self.image_size}"

    def check(self) -> None:
        for field, folder in (("data.source.path", self.path), ("data.source.test_path", self.test_path)):
            if folder is None:
                continue
            if not folder.is_dir():
                raise DataError(
                    f"{field}={str(folder)!r} does not exist or is not a folder; "
                    "point it at a folder of class subfolders"
                )
            if not any(d.is_dir() for d in folder.iterdir()):
                raise DataError(
                    f"{field}={str(folder)!r} has no class subfolders; expected {folder}/<class name>/<image files>"
                )
            if field not in self.scans:
                self.scans[field] = self._scan(field, folder)

    def _scan(self, field: str, folder: Path) -> FolderScan:
        scan = scan_image_folder(folder)
        problems = scan.problems()
        if problems and self.bad_files == "error":
            raise DataError(
                f"{field}={str(folder)!r} holds files or folders that cannot be used:\n{problems}\n"
                "  Fix: remove or move them, or set data.source.bad_files=skip to leave them out"
            )
        if problems:
            skipped = len(scan.not_images) + len(scan.unreadable)
            log.warning(
                "%s=%s: skipping %d non-image or unreadable file(s) and %d class folder(s) without images "
                "(data.source.bad_files=skip):\n%s",
                field,
                folder,
                skipped,
                len(scan.empty_classes),
                problems,
            )
        if not scan.images:
            raise DataError(f"{field}={str(folder)!r} has no readable images in its class subfolders")
        return scan

    def load(self) -> tuple[Dataset, Dataset]:
        transform = decode_transform(self.image_size)
        full = ScannedImages(self.scans["data.source.path"], transform)
        if self.test_path is not None:
            test = ScannedImages(self.scans["data.source.test_path"], transform)
            if test.classes != full.classes:
                raise DataError(
                    f"data.source.test_path classes {test.classes} differ from data.source.path classes {full.classes}"
                )
            return full, test
        keep, held_out = split_indices(len(full), self.test_fraction, self.seed)
        return Subset(full, keep.tolist()), Subset(full, held_out.tolist())


class ScannedImages(Dataset):
    """The usable images of a scanned class-folder tree as (transformed RGB image, class index) pairs, in
    ImageFolder's order (classes sorted, files sorted within each)."""

    def __init__(self, scan: FolderScan, transform: Callable) -> None:
        self.classes = sorted(scan.images)
        self.samples = [(path, label) for label, name in enumerate(self.classes) for path in scan.images[name]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(open_rgb(path)), label


def decode_transform(image_size: int) -> Callable:
    """PIL image -> uint8 (3, image_size, image_size): how an image folder's files become a data set's images
    (torchvision's Resize, bilinear with antialiasing); trained models read files the same way."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])


def open_rgb(path: str | Path) -> Image.Image:
    """The file's pixels as an RGB image, or DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ... for damaged or non-image files
        raise DataError(f"{path} could not be decoded ({error}); remove or replace it") from error
