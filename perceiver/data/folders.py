"""A user's folder of class subfolders (`path/<class>/<image>`): checked up front, decoded once, trained from memory.

- **The scan** lists every file and checks that PIL can read each image, so a bad file is named before training
  instead of failing a DataLoader worker hours in. Its result is cached per file (size, mtime): a sweep's 40 jobs
  over one folder stat its files 40 times but open them once; a changed or added file is checked again.
- **The decoded images**: every usable image converted to RGB and resized to `image_size` exactly as the lazy path
  does it (the same `ScannedImages` items), stored as one uint8 `.npy` plus a JSON manifest. The manifest names the
  folder, the image size, a fingerprint of the files (paths, sizes, mtimes) and a CRC-32 of the array, so a cache
  of a changed folder, of another folder, or a truncated or corrupt one is rebuilt, never trusted.
- **In memory** when the decoded images fit `memory_budget_gb` (`in_memory=auto`): the source then returns
  `ArrayDataset`s, which train on the device-resident path that CIFAR uses. Larger folders are read lazily, decoded
  by DataLoader workers in every epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from perceiver.data.cache import CacheDir, checksum
from perceiver.data.dataset import ArrayDataset, DataError, split_indices

log = logging.getLogger(__name__)

BAD_FILE_POLICIES = ("error", "skip")
IN_MEMORY_CHOICES = ("auto", True, False)
SCAN_VERSION = 1
IMAGES_VERSION = 1
THREADS = 8  # file reads and PIL decoding release the GIL: threads overlap them
# torchvision.datasets.folder.IMG_EXTENSIONS (ImageFolder's), kept here so that a warm start need not import
# torchvision (seconds); tests/data/test_folder_cache.py checks that the two agree
OS_JUNK = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})  # lower-cased; see is_os_junk
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- the scan


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
    fingerprint: str = ""  # of the usable images' paths, sizes and mtimes: changes when any of them does

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


def is_os_junk(name: str) -> bool:
    """Files and folders an operating system makes by itself, not the user's data: hidden ones (.DS_Store, macOS's
    ._* AppleDouble files, .Trashes, .ipynb_checkpoints), Windows' Thumbs.db and desktop.ini, macOS's __MACOSX."""
    return name.startswith(".") or name.lower() in OS_JUNK


def list_class_files(folder: Path) -> dict[str, dict[Path, tuple[int, int]]]:
    """class name -> {file: (size, mtime_ns)} below `folder/<class>/`, sorted; OS junk (`is_os_junk`) left out,
    silently, as a folder or a file at any depth."""
    files: dict[str, dict[Path, tuple[int, int]]] = {}
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not is_os_junk(d.name)):
        found: dict[Path, tuple[int, int]] = {}
        for path in sorted(class_dir.rglob("*")):
            if any(is_os_junk(part) for part in path.relative_to(class_dir).parts):
                continue
            info = path.stat()
            if stat.S_ISREG(info.st_mode):
                found[path] = (info.st_size, info.st_mtime_ns)
        files[class_dir.name] = found
    return files


def folder_key(folder: Path) -> str:
    """Names a folder's cache files: a hash of its resolved path."""
    return hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]


def fingerprint(entries: list[tuple[str, int, int]]) -> str:
    """SHA-256 of (path, size, mtime_ns) lines: any changed, added or removed file changes it."""
    digest = hashlib.sha256()
    for path, size, mtime in entries:
        digest.update(f"{path}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def _cached_readability(folder: Path, cache: CacheDir) -> dict[str, list]:
    """relative path -> [size, mtime_ns, readable] from this folder's scan cache; {} when absent or not its own."""
    stored = cache.read_json(f"scan-{folder_key(folder)}.json")
    if stored is None or stored.get("version") != SCAN_VERSION:
        return {}
    if stored.get("folder") != str(folder.resolve()) or not isinstance(stored.get("files"), dict):
        log.warning("scan cache of %s belongs to another folder (%s): it is rebuilt", folder, stored.get("folder"))
        return {}
    return stored["files"]


def scan_image_folder(folder: Path, cache: CacheDir | None = None) -> FolderScan:
    """Check every file below `folder/<class>/` once, before training; with a cache, only the files that are new
    or changed since the last scan are opened."""
    cache = cache or CacheDir(None)
    files = list_class_files(folder)
    stats = {path: info for found in files.values() for path, info in found.items()}
    candidates = [path for path in stats if path.suffix.lower() in IMG_EXTENSIONS]
    known = _cached_readability(folder, cache)
    readable: dict[Path, bool] = {}
    for path in candidates:
        entry = known.get(str(path.relative_to(folder)))
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == list(stats[path]):
            readable[path] = bool(entry[2])
    to_check = [path for path in candidates if path not in readable]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        readable.update(zip(to_check, pool.map(_is_readable_image, to_check), strict=True))
    if to_check or len(known) != len(readable):  # something new, changed or gone: store the scan as it is now
        entries = {str(path.relative_to(folder)): [*stats[path], ok] for path, ok in readable.items()}
        stored = {"version": SCAN_VERSION, "folder": str(folder.resolve()), "files": entries}
        cache.write_json(f"scan-{folder_key(folder)}.json", stored)
    return _summarise(folder, files, readable)


def _summarise(folder: Path, files: dict[str, dict[Path, tuple[int, int]]], readable: dict[Path, bool]) -> FolderScan:
    scan = FolderScan({}, [], [], [])
    usable = []
    for name, found in files.items():
        good = [p for p in found if readable.get(p)]
        scan.not_images += [p for p in found if p not in readable]
        scan.unreadable += [p for p in found if readable.get(p) is False]
        if good:
            scan.images[name] = [str(p) for p in good]
            usable += [(str(p.relative_to(folder)), *found[p]) for p in good]
        else:
            scan.empty_classes.append(folder / name)
    scan.fingerprint = fingerprint(usable)
    return scan


# ----------------------------------------------------------------------------- images


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

    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)


class ResizeToTensor:
    """PIL image -> uint8 (3, size, size): torchvision's Resize (PIL, antialiased bilinear), then PILToTensor.
    torchvision is imported at the first image, so a run served from the decoded cache never imports it."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.transform: Callable | None = None

    def __call__(self, image) -> torch.Tensor:
        if self.transform is None:
            from torchvision import transforms

            size = (self.image_size, self.image_size)
            self.transform = transforms.Compose([transforms.Resize(size), transforms.PILToTensor()])
        return self.transform(image)


def decode_all(images: ScannedImages) -> np.ndarray:
    """Every item of `images` decoded once (threads overlap PIL's work) into one uint8 (N, 3, H, W) array."""
    first = images[0][0].numpy()
    out = np.empty((len(images), *first.shape), dtype=np.uint8)
    out[0] = first

    def decode(index: int) -> None:
        out[index] = images[index][0].numpy()

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(decode, range(1, len(images))))
    return out


@dataclass(frozen=True)
class DecodedCache:
    """One folder's decoded images at one size under the cache folder: `images-<key>.npy` and its manifest."""

    folder: Path
    image_size: int
    scan: FolderScan
    cache: CacheDir

    @property
    def name(self) -> str:
        return f"images-{folder_key(self.folder)}-{self.image_size}"

    def manifest(self, array: np.ndarray) -> dict:
        return {
            "version": IMAGES_VERSION,
            "folder": str(self.folder.resolve()),
            "image_size": self.image_size,
            "fingerprint": self.scan.fingerprint,
            "shape": list(array.shape),
            "crc32": checksum(array),
        }

    def load(self) -> np.ndarray | None:
        """The cached array when its manifest and its bytes say it is this folder's, as it is now; else None
        (with a warning when the cache is damaged or another folder's)."""
        manifest = self.cache.read_json(f"{self.name}.json")
        path = self.cache.file(f"{self.name}.npy")
        if manifest is None or path is None or manifest.get("version") != IMAGES_VERSION:
            return None
        if manifest.get("folder") != str(self.folder.resolve()) or manifest.get("image_size") != self.image_size:
            log.warning("decoded-image cache %s belongs to another folder or size: it is rebuilt", path)
            return None
        if manifest.get("fingerprint") != self.scan.fingerprint:
            log.info(
                "%s changed since its images were decoded (files added, removed or modified): decoding again",
                self.folder,
            )
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            log.warning("decoded-image cache %s is damaged (%s): it is rebuilt", path, error)
            return None
        if (
            list(array.shape) != manifest.get("shape")
            or array.dtype != np.uint8
            or checksum(array) != manifest.get("crc32")
        ):
            log.warning(
                "decoded-image cache %s does not match its manifest (truncated or corrupt): it is rebuilt", path
            )
            return None
        return array

    def store(self, array: np.ndarray) -> None:
        """The array first, its manifest last: a manifest is only ever next to the array it describes."""
        if self.cache.write_bytes(f"{self.name}.npy", lambda file: np.save(file, array, allow_pickle=False)):
            self.cache.write_json(f"{self.name}.json", self.manifest(array))


def decoded_images(
    folder: Path, images: ScannedImages, scan: FolderScan, image_size: int, cache: CacheDir
) -> ArrayDataset:
    """All of `images` as an in-memory ArrayDataset: from the cache when it is valid, else decoded (and cached)."""
    cached = DecodedCache(folder, image_size, scan, cache)
    array = cached.load()
    if array is None:
        array = decode_all(images)
        cached.store(array)
    return ArrayDataset(torch.from_numpy(array), images.labels())


# ----------------------------------------------------------------------------- the source


class ImageFolderSource:
    """A user's folder of class subfolders (`path/<class>/<image>`), decoded once and held in memory when it fits.

    Images are converted to RGB and resized to `image_size` x `image_size`. Without a `test_path`, a seeded
    `test_fraction` of the images is held out as the test set. Every file is checked up front: non-image or
    unreadable files and classes without images are an error listing them, or with `bad_files=skip` are left out
    (with a warning that counts them). `in_memory`: `auto` holds the decoded images in memory when they fit
    `memory_budget_gb` GiB, `True` always, `False` never (DataLoader workers decode them every epoch).
    `cache_dir`: where the scan and the decoded images are cached (None: nowhere).
    """

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        test_path: str | None = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        bad_files: str = "error",
        in_memory: bool | str = "auto",
        memory_budget_gb: float = 4.0,
        cache_dir: str | None = None,
    ) -> None:
        if bad_files not in BAD_FILE_POLICIES:
            raise ValueError(f"bad_files={bad_files!r} is invalid: choose one of {', '.join(BAD_FILE_POLICIES)}")
        if in_memory not in IN_MEMORY_CHOICES or (isinstance(in_memory, int) and not isinstance(in_memory, bool)):
            raise ValueError(f"in_memory={in_memory!r} is invalid: choose auto, true or false")
        if not memory_budget_gb >= 0:
            raise ValueError(f"memory_budget_gb={memory_budget_gb!r} is invalid: it must be >= 0 (GiB)")
        self.path = Path(os.path.expanduser(str(path)))
        self.test_path = Path(os.path.expanduser(str(test_path))) if test_path else None
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.seed = seed
        self.bad_files = bad_files
        self.in_memory = in_memory
        self.memory_budget_gb = memory_budget_gb
        self.cache = CacheDir(cache_dir)
        self.scans: dict[str, FolderScan] = {}
        self.check()
        self.classes = sorted(self.scans["data.source.path"].images)
        self.num_classes = len(self.classes)
        if self.num_classes < 2:
            raise DataError(
                f"data.source.path={str(self.path)!r} has {self.num_classes} class with images "
                f"({', '.join(self.classes)}); a classifier needs at least 2 classes: add a subfolder per class"
            )
        count = sum(len(paths) for paths in self.scans["data.source.path"].images.values())
        needed = 2 if self.test_path is not None else 3  # one image each to train, validate (and test) on
        if count < needed:
            held_out = "a validation image" if self.test_path is not None else "a test and a validation image"
            raise DataError(
                f"data.source.path={str(self.path)!r} holds {count} image(s), too few to hold out {held_out} "
                f"and train on the rest: add images (at least {needed}, more to learn anything)"
            )

    @property
    def cache_key(self) -> str:
        """Names the statistics: this folder as it is now (its fingerprint) at this size."""
        scan = self.scans["data.source.path"]
        return f"folder-{folder_key(self.path)[:12]}-{scan.fingerprint[:12]}-{self.image_size}"

    def check(self) -> None:
        for name, folder in (("data.source.path", self.path), ("data.source.test_path", self.test_path)):
            if folder is None:
                continue
            if not folder.is_dir():
                raise DataError(
                    f"{name}={str(folder)!r} does not exist or is not a folder; "
                    "point it at a folder of class subfolders"
                )
            if not any(d.is_dir() for d in folder.iterdir()):
                raise DataError(
                    f"{name}={str(folder)!r} has no class subfolders; expected {folder}/<class name>/<image files>"
                )
            if name not in self.scans:
                self.scans[name] = self._scan(name, folder)

    def _scan(self, name: str, folder: Path) -> FolderScan:
        scan = scan_image_folder(folder, self.cache)
        problems = scan.problems()
        if problems and self.bad_files == "error":
            raise DataError(
                f"{name}={str(folder)!r} holds files or folders that cannot be used:\n{problems}\n"
                "  Fix: remove or move them, or set data.source.bad_files=skip to leave them out"
            )
        if problems:
            skipped = len(scan.not_images) + len(scan.unreadable)
            log.warning(
                "%s=%s: skipping %d non-image or unreadable file(s) and %d class folder(s) without images "
                "(data.source.bad_files=skip):\n%s",
                name,
                folder,
                skipped,
                len(scan.empty_classes),
                problems,
            )
        if not scan.images:
            raise DataError(f"{name}={str(folder)!r} has no readable images in its class subfolders")
        return scan

    def decoded_bytes(self) -> int:
        """What the decoded uint8 images of both folders take in memory."""
        count = sum(len(paths) for scan in self.scans.values() for paths in scan.images.values())
        return count * 3 * self.image_size**2

    def held_in_memory(self) -> bool:
        if self.in_memory != "auto":
            return bool(self.in_memory)
        size, budget = self.decoded_bytes(), self.memory_budget_gb * 2**30
        if size > budget:
            log.info(
                "image folder: %.2f GiB decoded, over data.source.memory_budget_gb=%s: read lazily, decoded by "
                "DataLoader workers every epoch (raise the budget to hold it in memory)",
                size / 2**30,
                self.memory_budget_gb,
            )
        return size <= budget

    def load(self) -> tuple[Dataset, Dataset]:
        transform = ResizeToTensor(self.image_size)
        in_memory = self.held_in_memory()
        folders = [("data.source.path", self.path), ("data.source.test_path", self.test_path)]
        loaded = []
        for name, folder in folders[: 2 if self.test_path is not None else 1]:
            images = ScannedImages(self.scans[name], transform)
            if name == "data.source.test_path" and images.classes != self.classes:
                raise DataError(
                    f"data.source.test_path classes {images.classes} differ from "
                    f"data.source.path classes {self.classes}"
                )
            loaded.append(
                decoded_images(folder, images, self.scans[name], self.image_size, self.cache) if in_memory else images
            )
        if self.test_path is not None:
            return loaded[0], loaded[1]
        full = loaded[0]
        keep, held_out = split_indices(len(full), self.test_fraction, self.seed, "data.source.test_fraction")
        if isinstance(full, ArrayDataset):
            return full.subset(keep), full.subset(held_out)
        return Subset(full, keep.tolist()), Subset(full, held_out.tolist())


def decode_transform(image_size: int) -> Callable:
    """PIL image -> uint8 (3, image_size, image_size): how an image folder's files become a data set's images;
    trained models read files the same way."""
    return ResizeToTensor(image_size)


def open_rgb(path: str | Path) -> Any:
    """The file's pixels as an RGB PIL image, or DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ... for damaged or non-image files
        raise DataError(f"{path} could not be decoded ({error}); remove or replace it") from error
