"""The MNIST family (MNIST, Fashion-MNIST, KMNIST): 28x28 grayscale images in the original idx files.

The files are read here, not by torchvision, so that a folder of the four `.gz` files as published (Debian's
`dataset-fashion-mnist` installs one) works as it is; torchvision's dataset classes only download them. The idx
format (LeCun and Cortes' MNIST page): a big-endian magic number whose third byte is the element type (0x08 =
unsigned byte) and fourth the number of dimensions, one big-endian int32 per dimension, then the elements.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import BinaryIO, ClassVar, NamedTuple

import numpy as np
import torch

from perceiver.data.dataset import ArrayDataset, DataError

SPLITS = {"train": "train", "test": "t10k"}
UNSIGNED_BYTE = 0x08
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Family(NamedTuple):
    torchvision_class: str  # its torchvision dataset class, which downloads it into root/<class>/raw/
    debian_package: str | None  # the Debian package that installs its .gz files, if any
    classes: list[str]  # the data set's own class names (torchvision's, checked in tests)


class MnistSource:
    """One of the MNIST family as uint8 (N, 1, 28, 28) images, from the first place that holds its idx files:
    `path` when given (and only there), else torchvision's folder `root/<class>/raw/`, else `system_path` (where a
    Debian package installs it), else torchvision's download into `root` when `download`, else a DataError that
    says how to get it. Each of the four files may be gzipped (`.gz`) or not."""

    image_size = 28
    families: ClassVar[dict[str, Family]] = {
        "mnist": Family("MNIST", None, [f"{d} - {w}" for d, w in enumerate(DIGITS)]),
        "fashion_mnist": Family(
            "FashionMNIST",
            "dataset-fashion-mnist",
            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        ),
        "kmnist": Family("KMNIST", None, ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
    }

    def __init__(
        self,
        name: str = "fashion_mnist",
        path: str | None = None,
        root: str = "~/.cache/perceiver/data",
        system_path: str | None = None,
        download: bool = True,
    ) -> None:
        if name not in self.families:
            raise ValueError(f"name={name!r} is invalid: choose one of {', '.join(self.families)}")
        self.name = name
        self.family = self.families[name]
        self.path = Path(os.path.expanduser(str(path))) if path else None
        self.root = Path(os.path.expanduser(str(root)))
        self.system_path = Path(system_path) if system_path else None
        self.download = download
        self.classes: list[str] | None = list(self.family.classes)
        self.num_classes = len(self.family.classes)

    @property
    def torchvision_folder(self) -> Path:
        return self.root / self.family.torchvision_class / "raw"

    @property
    def cache_key(self) -> str:
        """The data set and the folder it is read from: two copies never share statistics."""
        folder = self.find() or self.torchvision_folder
        return f"{self.name}-{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]}"

    def find(self) -> Path | None:
        """The folder the files are read from, by the lookup order above; None when only a download can help."""
        if self.path is not None:
            return self.path
        for folder in (self.torchvision_folder, self.system_path):
            if folder is not None and all(idx_file(folder, stem) for stem in file_stems()):
                return folder
        return None

    def check(self) -> None:
        """Fail before any work when the data can be neither found nor downloaded."""
        folder = self.find()
        if folder is not None:
            if not folder.is_dir():
                raise DataError(self._missing_message(f"{folder} does not exist"))
            missing = [stem for stem in file_stems() if idx_file(folder, stem) is None]
            if missing:
                raise DataError(self._missing_message(f"{folder} lacks {', '.join(missing)} (.gz or uncompressed)"))
        elif not self.download:
            raise DataError(
                self._missing_message("it is in none of the places looked in and data.source.download=false")
            )

    def load(self) -> tuple[ArrayDataset, ArrayDataset]:
        self.check()
        folder = self.find()
        if folder is None:
            self._download()
            folder = self.torchvision_folder
        return self._read_split(folder, SPLITS["train"]), self._read_split(folder, SPLITS["test"])

    def _read_split(self, folder: Path, prefix: str) -> ArrayDataset:
        image_path = idx_file(folder, f"{prefix}-images-idx3-ubyte")
        label_path = idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        assert image_path is not None and label_path is not None  # check() made sure
        try:
            images = read_idx(image_path, dims=3)
            labels = read_idx(label_path, dims=1)
        except DataError as error:
            raise DataError(f"{error}; {self._how_to_get()}") from error
        if len(images) != len(labels):
            raise DataError(
                f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels: the two files are "
                f"of different data sets or one is damaged; {self._how_to_get()}"
            )
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise DataError(
                f"{label_path} holds label {int(labels.max())}, outside {self.name}'s {self.num_classes} classes "
                f"(0-{self.num_classes - 1}): it is not {self.name}'s label file; {self._how_to_get()}"
            )
        pixels = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W): a view, no copy
        return ArrayDataset(pixels, torch.from_numpy(labels.astype(np.int64)))

    def _download(self) -> None:
        import torchvision

        dataset_class = getattr(torchvision.datasets, self.family.torchvision_class)
        try:
            dataset_class(str(self.root), train=True, download=True)  # fetches, verifies and unpacks all four files
        except Exception as error:  # torchvision raises URLError, RuntimeError, OSError, ...
            raise DataError(self._missing_message(f"the download failed: {type(error).__name__}: {error}")) from error

    def _places(self) -> list[str]:
        places = [f"data.source.path={self.path}"] if self.path else []
        places.append(f"{self.torchvision_folder}/ (torchvision's folder under paths.data_root)")
        if self.system_path:
            places.append(f"{self.system_path}/ (data.source.system_path)")
        return places

    def _how_to_get(self) -> str:
        package = self.family.debian_package
        ways = [f"`apt-get install {package}` (installs it into data.source.system_path)"] if package else []
        ways.append(f"data.source.download=true (torchvision fetches it into {self.root})")
        ways.append("data.source.path=DIR, a folder holding the four idx files (.gz or uncompressed)")
        return "get it by " + "; or ".join(ways)

    def _missing_message(self, reason: str) -> str:
        files = ", ".join(f"{stem}.gz" for stem in file_stems())
        return (
            f"could not load {self.name} ({reason}).\n"
            f"  Looked in: {'; '.join(self._places())}\n"
            f"  Files: {files}\n"
            f"  Fix: {self._how_to_get()}.\n"
            "  Offline alternative: data=synthetic (generated on the spot, no files)."
        )


def file_stems() -> list[str]:
    return [f"{prefix}-{kind}" for prefix in SPLITS.values() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def idx_file(folder: Path, stem: str) -> Path | None:
    """The file `stem` in `folder`, uncompressed (read faster) or gzipped; None when neither is there."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx file of unsigned bytes with `dims` dimensions as one uint8 array, read straight into place; a file
    that is not one (wrong magic number, truncated, trailing bytes, not gzip) raises DataError naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            shape = _read_header(file, path, dims)
            array = np.empty(shape, dtype=np.uint8)
            got = file.readinto(memoryview(array).cast("B"))
            if got != array.size:
                raise DataError(f"{path} is truncated: its header promises {array.size} bytes of data, it holds {got}")
            if file.read(1):
                raise DataError(f"{path} holds more bytes than its header's shape {shape}: it is damaged")
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; EOFError: a cut-off .gz
        raise DataError(f"{path} could not be read as an idx file ({type(error).__name__}: {error})") from error
    return array


def _read_header(file: BinaryIO, path: Path, dims: int) -> tuple[int, ...]:
    magic = file.read(4)
    expected = bytes([0, 0, UNSIGNED_BYTE, dims])
    if magic != expected:
        raise DataError(
            f"{path} is not an idx file of unsigned bytes with {dims} dimension(s): its magic number is "
            f"{magic.hex() or 'missing'}, expected {expected.hex()}; replace it with the original file"
        )
    header = file.read(4 * dims)
    if len(header) != 4 * dims:
        raise DataError(f"{path} is truncated: its header is cut off")
    shape = tuple(int(size) for size in np.frombuffer(header, dtype=">i4"))
    if min(shape) < 0:
        raise DataError(f"{path} is damaged: its header gives the negative shape {shape}")
    return shape
