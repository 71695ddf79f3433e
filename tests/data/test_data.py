"""Tests for perceiver/data.py: sources, splits, normalisation statistics and loaders.

Everything runs offline on tiny data: CIFAR is exercised through torchvision's real reader on a small
data set written here in the archive's on-disk format.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
import struct
import urllib.error
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from perceiver.data import (
    ArrayDataset,
    CifarSource,
    DataError,
    DeviceBatches,
    ImageFolderSource,
    SyntheticSource,
    channel_stats,
    make_loader,
    prepare_splits,
    split_indices,
    splits,
)
from perceiver.data.splits import cached_channel_stats
from tests import helpers

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- helpers


def py2_pickle(obj: object, py2_strings: set[str]) -> bytes:
    """Pickle `obj` the way the Python 2 CIFAR archives were written: the strings in `py2_strings` are
    stored as Python 2 byte strings (SHORT_BINSTRING/BINSTRING), so `pickle.load(..., encoding="bytes")`
    yields bytes keys as in the real files and torchvision's `encoding="latin1"` yields str keys.

    (A Python 3 pickle with bytes keys would NOT be read by torchvision: bytes stay bytes under any
    encoding, and torchvision indexes entries with str keys.)"""
    raw = pickle.dumps(obj, protocol=2)
    ops = list(pickletools.genops(raw))
    ends = [pos for _, _, pos in ops[1:]] + [len(raw)]
    out = bytearray()
    for (op, arg, pos), end in zip(ops, ends, strict=True):
        if op.name == "BINUNICODE" and arg in py2_strings:
            encoded = arg.encode("latin1")
            header = b"U" + bytes([len(encoded)]) if len(encoded) < 256 else b"T" + struct.pack("<I", len(encoded))
            out += header + encoded
        else:
            out += raw[pos:end]
    return bytes(out)


def write_py2_pickle(path: Path, obj: dict, extra_strings: Iterable[str] = ()) -> str:
    """Write `obj` as a Python-2-style pickle and return the file's md5 (what torchvision checks)."""
    payload = py2_pickle(obj, set(obj) | set(extra_strings))
    path.write_bytes(payload)
    assert set(pickle.loads(payload, encoding="bytes")) == {key.encode() for key in obj}  # bytes keys, as the archive
    return hashlib.md5(payload).hexdigest()


def cifar_rows(count: int, seed: int) -> np.ndarray:
    """(count, 3072) uint8 rows, each 3 channel-first 32x32 planes, with a distinct value per channel at
    pixel (0, 0) (10, 20, 30 plus 100 * image index mod 2) so a wrong layout is caught."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    for n in range(count):
        planes[n, :, 0, 0] = [10 + 100 * (n % 2), 20 + 100 * (n % 2), 30 + 100 * (n % 2)]
    return planes.reshape(count, 3072)


def patch_md5(monkeypatch: pytest.MonkeyPatch, cls: type, train: list, test: list, meta: dict) -> None:
    """Let torchvision's real integrity check accept the fake files (and only them) by their md5."""
    monkeypatch.setattr(cls, "train_list", train)
    monkeypatch.setattr(cls, "test_list", test)
    monkeypatch.setattr(cls, "meta", meta)


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch, num_train: int = 6, num_test: int = 4) -> dict:
    """A tiny cifar-100-python/ folder (train, test, meta) in the real archive's format."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    written = {}
    md5 = {}
    for split, count, seed in (("train", num_train, 1), ("test", num_test, 2)):
        rows = cifar_rows(count, seed)
        fine = [int(v) for v in np.random.default_rng(seed).integers(0, 100, size=count)]
        filenames = [f"{split}_{i}.png" for i in range(count)]
        entry = {
            "filenames": filenames,
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "data": rows,
        }
        md5[split] = write_py2_pickle(folder / split, entry, [*filenames, entry["batch_label"]])
        written[split] = (rows, fine)
    meta = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    meta_md5 = write_py2_pickle(folder / "meta", meta, fine_names + coarse_names)
    patch_md5(
        monkeypatch,
        torchvision.datasets.CIFAR100,
        [["train", md5["train"]]],
        [["test", md5["test"]]],
        {"filename": "meta", "key": "fine_label_names", "md5": meta_md5},
    )
    return written


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A tiny cifar-10-batches-py/ folder: five training batches of 2 images and a test batch of 3."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class_{i}" for i in range(10)]
    batches = [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]
    written, md5 = {}, {}
    for seed, (name, count) in enumerate(batches):
        rows = cifar_rows(count, seed + 10)
        labels = [(seed * 3 + i) % 10 for i in range(count)]
        filenames = [f"{name}_{i}.png" for i in range(count)]
        entry = {"batch_label": name, "labels": labels, "data": rows, "filenames": filenames}
        md5[name] = write_py2_pickle(folder / name, entry, [*filenames, name])
        written[name] = (rows, labels)
    meta = {"num_cases_per_batch": 2, "label_names": names, "num_vis": 3072}
    meta_md5 = write_py2_pickle(folder / "batches.meta", meta, names)
    patch_md5(
        monkeypatch,
        torchvision.datasets.CIFAR10,
        [[name, md5[name]] for name, _ in batches[:5]],
        [["test_batch", md5["test_batch"]]],
        {"filename": "batches.meta", "key": "label_names", "md5": meta_md5},
    )
    return written


def numpy_channel_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Reference per-channel mean and population std of (N, C, H, W) images, in plain numpy."""
    array = images.numpy().astype(np.float64)
    per_channel = array.transpose(1, 0, 2, 3).reshape(array.shape[1], -1)
    return per_channel.mean(axis=1), per_channel.std(axis=1)


def indexed_dataset(count: int, num_classes: int = 3) -> ArrayDataset:
    """Images whose pixel (0, 0, 0) holds their index, so each batch row can be traced to its sample."""
    images = torch.zeros(count, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(count) % num_classes)


def epoch_ids(loader: Iterable) -> list[int]:
    """Sample indices in the order one pass over `loader` yields them; checks labels travel with images."""
    ids: list[int] = []
    for images, labels in loader:
        batch_ids = images[:, 0, 0, 0].long()
        assert torch.equal(labels, batch_ids % 3)
        ids += batch_ids.tolist()
    return ids


class PlainDataset(Dataset):
    """A lazy (non-ArrayDataset) view of an ArrayDataset, to take the DataLoader code paths."""

    def __init__(self, source: ArrayDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return self.source[index]


# ----------------------------------------------------------------------------- CIFAR


def test_cifar100_loads_pixels_in_chw_layout_and_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torchvision reader plus our HWC -> CHW conversion must give back exactly the written planes."""
    written = write_cifar100(tmp_path, monkeypatch)
    source = CifarSource(name="cifar100", root=str(tmp_path), download=False)
    source.check()
    train, test = source.load()

    assert source.num_classes == 100
    for dataset, (rows, fine) in ((train, written["train"]), (test, written["test"])):
        assert isinstance(dataset, ArrayDataset)
        assert dataset.images.dtype == torch.uint8
        assert dataset.images.shape == (len(rows), 3, 32, 32)
        assert dataset.images.is_contiguous()
        expected = torch.from_numpy(rows.reshape(-1, 3, 32, 32))
        assert torch.equal(dataset.images, expected)
        assert dataset.labels.dtype == torch.int64
        assert dataset.labels.tolist() == fine
    # the distinct per-channel marker at pixel (0, 0) sits in the channel dimension
    assert train.images[0, :, 0, 0].tolist() == [10, 20, 30]
    assert train.images[1, :, 0, 0].tolist() == [110, 120, 130]
    image, label = train[3]
    assert image.shape == (3, 32, 32) and int(label) == written["train"][1][3]


def test_cifar10_loads_all_five_training_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR-10 concatenates data_batch_1..5 in order and reads labels from the b"labels" key."""
    written = write_cifar10(tmp_path, monkeypatch)
    train, test = CifarSource(name="cifar10", root=tmp_path, download=False).load()

    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    assert torch.equal(train.images, torch.from_numpy(train_rows.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == train_labels
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == written["test_batch"][1]
    assert test.images[1, :, 0, 0].tolist() == [110, 120, 130]


def test_cifar_corrupted_file_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's md5 check is live: a file that no longer matches its checksum must not load silently."""
    write_cifar100(tmp_path, monkeypatch)
    with (tmp_path / "cifar-100-python" / "test").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(DataError, match="corrupted"):
        CifarSource(root=tmp_path, download=False).load()


def assert_helpful_cifar100_message(message: str, root: Path) -> None:
    assert str(root / "cifar-100-python") in message  # where it looked
    assert "cifar-100-python.tar.gz" in message  # what to fetch
    assert "data=synthetic" in message  # the offline alternative


def test_missing_cifar_check_names_path_archive_and_offline_alternative(tmp_path: Path) -> None:
    """Without files and without download, check() fails up front with a message that says how to fix it."""
    source = CifarSource(name="cifar100", root=tmp_path, download=False)
    with pytest.raises(DataError) as caught:
        source.check()
    assert_helpful_cifar100_message(str(caught.value), tmp_path)
    assert "data.download=false" in str(caught.value)


def test_missing_cifar_load_without_download_is_a_data_error(tmp_path: Path) -> None:
    """load() turns torchvision's RuntimeError into the same helpful DataError."""
    with pytest.raises(DataError) as caught:
        CifarSource(name="cifar100", root=tmp_path, download=False).load()
    assert_helpful_cifar100_message(str(caught.value), tmp_path)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_cifar_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed download (no network) surfaces as a DataError with the fix, not a bare URLError."""
    calls = []

    def no_network(url: str, *args, **kwargs) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    source = CifarSource(name="cifar100", root=tmp_path, download=True)
    source.check()  # download allowed: nothing to complain about yet
    with pytest.raises(DataError) as caught:
        source.load()
    message = str(caught.value)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert_helpful_cifar100_message(message, tmp_path)
    assert "URLError" in message and "no network" in message
    assert isinstance(caught.value.__cause__, urllib.error.URLError)


def test_cifar_source_rejects_unknown_name_and_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"name='imagenet'.*cifar10, cifar100"):
        CifarSource(name="imagenet")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert CifarSource(root="~/cifar").root == tmp_path / "cifar"


# ----------------------------------------------------------------------------- synthetic


def small_synthetic(seed: int = 0, **overrides) -> SyntheticSource:
    settings = {"num_classes": 4, "image_size": 8, "num_train": 200, "num_test": 100, "seed": seed} | overrides
    return SyntheticSource(**settings)


def test_synthetic_shapes_dtypes_and_all_classes_present() -> None:
    train, test = small_synthetic().load()
    for dataset, count in ((train, 200), (test, 100)):
        assert isinstance(dataset, ArrayDataset)
        assert dataset.images.shape == (count, 3, 8, 8) and dataset.images.dtype == torch.uint8
        assert dataset.labels.shape == (count,) and dataset.labels.dtype == torch.int64
        assert set(dataset.labels.tolist()) == {0, 1, 2, 3}


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    first_train, first_test = small_synthetic(seed=3).load()
    again_train, again_test = small_synthetic(seed=3).load()
    other_train, _ = small_synthetic(seed=4).load()
    assert torch.equal(first_train.images, again_train.images) and torch.equal(first_train.labels, again_train.labels)
    assert torch.equal(first_test.images, again_test.images)
    assert not torch.equal(first_train.images, other_train.images)
    assert not torch.equal(first_train.images[:100], first_test.images)  # test is a fresh draw, not a copy
    assert small_synthetic(seed=3).cache_key != small_synthetic(seed=4).cache_key


def test_synthetic_class_signal_is_learnable_by_nearest_class_mean() -> None:
    """A nearest-class-mean classifier fit on train must beat chance (1/4) by far on the test split."""
    train, test = small_synthetic().load()
    x_train = train.images.flatten(1).float()
    x_test = test.images.flatten(1).float()
    means = torch.stack([x_train[train.labels == k].mean(0) for k in range(4)])
    predictions = torch.cdist(x_test, means).argmin(1)
    accuracy = (predictions == test.labels).float().mean().item()
    assert accuracy > 0.8


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_classes", 1), ("num_classes", 0), ("image_size", 0), ("num_train", -1), ("num_test", 2.5)],
)
def test_synthetic_rejects_invalid_sizes(field: str, value) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}={value!r} is invalid"):
        small_synthetic(**{field: value})


# ----------------------------------------------------------------------------- splits


def test_split_indices_are_disjoint_covering_and_ten_percent() -> None:
    keep, held = split_indices(250, 0.1, seed=0)
    assert len(held) == 25 and len(keep) == 225
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(250))
    assert torch.equal(keep, keep.sort().values) and torch.equal(held, held.sort().values)


def test_split_indices_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    keep_a, held_a = split_indices(100, 0.1, seed=7)
    keep_b, held_b = split_indices(100, 0.1, seed=7)
    _, held_c = split_indices(100, 0.1, seed=8)
    assert torch.equal(keep_a, keep_b) and torch.equal(held_a, held_b)
    assert not torch.equal(held_a, held_c)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_indices_rejects_fractions_outside_open_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_indices(100, fraction, seed=0)


def test_split_indices_refuses_to_hold_out_everything() -> None:
    """With one image, any held-out part leaves nothing to train on."""
    with pytest.raises(DataError):
        split_indices(1, 0.5, seed=0)


# ----------------------------------------------------------------------------- statistics


def random_array_dataset(count: int = 300, seed: int = 0) -> ArrayDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 4, 5), generator=generator, dtype=torch.uint8)
    images[:, 1] //= 2  # give the channels different statistics
    images[:, 2] = images[:, 2] // 4 + 100
    return ArrayDataset(images, torch.zeros(count, dtype=torch.long))


def test_channel_stats_matches_numpy_per_channel_mean_and_std() -> None:
    dataset = random_array_dataset()
    mean, std = channel_stats(dataset)
    ref_mean, ref_std = numpy_channel_stats(dataset.images)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-12)
    assert len(mean) == len(std) == 3


def test_channel_stats_lazy_dataset_path_agrees_with_array_path() -> None:
    """300 images span two DataLoader batches of 256, so the streaming sums are exercised."""
    dataset = random_array_dataset()
    ref_mean, ref_std = numpy_channel_stats(dataset.images)
    for lazy in (Subset(dataset, list(range(len(dataset)))), PlainDataset(dataset)):
        mean, std = channel_stats(lazy)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-9)
        np.testing.assert_allclose(std, ref_std, rtol=1e-9)


def test_channel_stats_max_images_limits_both_paths_to_the_first_images() -> None:
    """'Up to max_images' must mean the same images whether the data is in memory or read lazily."""
    dataset = random_array_dataset(count=300)
    ref_mean, ref_std = numpy_channel_stats(dataset.images[:100])
    for candidate in (dataset, PlainDataset(dataset)):
        mean, std = channel_stats(candidate, max_images=100)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-9)
        np.testing.assert_allclose(std, ref_std, rtol=1e-9)


def test_cached_channel_stats_writes_json_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = random_array_dataset()
    cache = tmp_path / "cache"
    mean, std = cached_channel_stats(dataset, "unit", cache)
    stored = json.loads((cache / "stats-unit.json").read_text())
    assert stored == {"mean": mean, "std": std}
    np.testing.assert_allclose(mean, numpy_channel_stats(dataset.images)[0], rtol=1e-12)

    def must_not_run(*args, **kwargs):
        raise AssertionError("channel_stats was recomputed despite a cached result")

    monkeypatch.setattr(splits, "channel_stats", must_not_run)
    assert cached_channel_stats(dataset, "unit", cache) == (mean, std)
    assert list(cache.iterdir()) == [cache / "stats-unit.json"]  # no temporary files left behind


def test_cached_channel_stats_recomputes_an_unreadable_cache(tmp_path: Path) -> None:
    dataset = random_array_dataset()
    (tmp_path / "stats-broken.json").write_text("{not json")
    mean, std = cached_channel_stats(dataset, "broken", tmp_path)
    ref_mean, ref_std = numpy_channel_stats(dataset.images)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-12)
    assert json.loads((tmp_path / "stats-broken.json").read_text())["mean"] == mean


def test_cached_channel_stats_without_cache_dir_just_computes() -> None:
    dataset = random_array_dataset()
    mean, _ = cached_channel_stats(dataset, "none", None)
    np.testing.assert_allclose(mean, numpy_channel_stats(dataset.images)[0], rtol=1e-12)


# ----------------------------------------------------------------------------- prepare_splits


def rows_as_bytes(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


def test_prepare_splits_holds_out_val_and_uses_train_only_statistics(tmp_path: Path) -> None:
    source = small_synthetic(num_train=200, num_test=50)
    splits = prepare_splits(source, val_fraction=0.1, seed=0, cache_dir=tmp_path)
    full_train, full_test = small_synthetic(num_train=200, num_test=50).load()

    assert len(splits.train) + len(splits.val) == 200 and len(splits.val) == 20
    assert splits.num_classes == 4
    assert torch.equal(splits.test.images, full_test.images)
    # train and val together are exactly the original training images
    assert rows_as_bytes(torch.cat([splits.train.images, splits.val.images])) == rows_as_bytes(full_train.images)
    assert set(rows_as_bytes(splits.train.images)).isdisjoint(rows_as_bytes(splits.val.images))
    # statistics come from the training split alone, not from val or the whole training set
    ref_mean, ref_std = numpy_channel_stats(splits.train.images)
    np.testing.assert_allclose(splits.mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(splits.std, ref_std, rtol=1e-12)
    assert not np.allclose(splits.mean, numpy_channel_stats(full_train.images)[0], rtol=0, atol=1e-9)
    assert len(list(tmp_path.glob("stats-synthetic-*-val0.1-seed0.json"))) == 1


def test_prepare_splits_val_split_depends_on_seed() -> None:
    first = prepare_splits(small_synthetic(), seed=0)
    second = prepare_splits(small_synthetic(), seed=1)
    assert rows_as_bytes(first.val.images) != rows_as_bytes(second.val.images)


def test_prepare_splits_train_size_samples_the_training_split_only(tmp_path: Path) -> None:
    whole = prepare_splits(small_synthetic(num_train=200, num_test=50), seed=3)
    reduced = prepare_splits(small_synthetic(num_train=200, num_test=50), seed=3, cache_dir=tmp_path, train_size=60)
    again = prepare_splits(small_synthetic(num_train=200, num_test=50), seed=3, train_size=60)

    assert len(reduced.train) == 60 and len(whole.train) == 180
    assert rows_as_bytes(reduced.val.images) == rows_as_bytes(whole.val.images)  # validation and test stay whole
    assert torch.equal(reduced.test.images, whole.test.images)
    assert set(rows_as_bytes(reduced.train.images)) <= set(rows_as_bytes(whole.train.images))
    assert rows_as_bytes(reduced.train.images) != rows_as_bytes(whole.train.images[:60])  # a sample, not the head
    assert torch.equal(reduced.train.images, again.train.images)  # seeded
    np.testing.assert_allclose(reduced.mean, numpy_channel_stats(reduced.train.images)[0], rtol=1e-12)
    assert len(list(tmp_path.glob("stats-synthetic-*-seed3-train60.json"))) == 1  # not the whole split's statistics


@pytest.mark.parametrize("size, says", [(181, "at most 180"), (0, ">= 1"), (2.5, ">= 1")])
def test_prepare_splits_refuses_a_train_size_the_split_cannot_give(size: object, says: str) -> None:
    with pytest.raises((DataError, ValueError), match=rf"data\.train_size={size}.*{says}"):
        prepare_splits(small_synthetic(num_train=200, num_test=50), train_size=size)


# ----------------------------------------------------------------------------- loaders


def test_device_batches_shuffled_epoch_covers_every_sample_once() -> None:
    loader = DeviceBatches(indexed_dataset(23), batch_size=5, device=CPU, shuffle=True, seed=0)
    assert len(loader) == 5
    ids = epoch_ids(loader)
    assert sorted(ids) == list(range(23))
    assert ids != list(range(23))


def test_device_batches_order_changes_between_epochs_and_repeats_per_seed() -> None:
    dataset = indexed_dataset(23)
    loader = DeviceBatches(dataset, batch_size=5, device=CPU, shuffle=True, seed=1)
    twin = DeviceBatches(dataset, batch_size=5, device=CPU, shuffle=True, seed=1)
    other = DeviceBatches(dataset, batch_size=5, device=CPU, shuffle=True, seed=2)
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert first != second and sorted(second) == list(range(23))
    assert [first, second] == [epoch_ids(twin), epoch_ids(twin)]
    assert epoch_ids(other) != first


def test_device_batches_without_shuffle_keep_order_and_sizes() -> None:
    loader = DeviceBatches(indexed_dataset(23), batch_size=5, device=CPU)
    assert epoch_ids(loader) == list(range(23))
    assert [len(labels) for _, labels in loader] == [5, 5, 5, 5, 3]


def test_device_batches_drop_last_yields_only_full_batches() -> None:
    loader = DeviceBatches(indexed_dataset(23), batch_size=5, device=CPU, shuffle=True, drop_last=True, seed=0)
    assert len(loader) == 4
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [5, 5, 5, 5]
    ids = epoch_ids(loader)
    assert len(set(ids)) == 20
    exact = DeviceBatches(indexed_dataset(20), batch_size=5, device=CPU, drop_last=True)
    assert len(exact) == 4 and len(DeviceBatches(indexed_dataset(20), batch_size=5, device=CPU)) == 4


def test_make_loader_uses_device_batches_for_in_memory_data() -> None:
    loader = make_loader(indexed_dataset(10), batch_size=4, device=CPU, shuffle=True, seed=0)
    assert isinstance(loader, DeviceBatches)
    assert sorted(epoch_ids(loader)) == list(range(10))


def test_make_loader_applies_sample_transform_through_a_dataloader() -> None:
    dataset = indexed_dataset(10)
    loader = make_loader(
        dataset, batch_size=4, device=CPU, shuffle=True, num_workers=0, sample_transform=lambda image: 255 - image
    )
    assert isinstance(loader, DataLoader)
    assert len(loader) == 3
    seen = []
    for images, labels in loader:
        original = 255 - images[:, 0, 0, 0].long()
        assert torch.equal(labels, original % 3)
        assert (images[:, 1:] == 255).all()
        seen += original.tolist()
    assert sorted(seen) == list(range(10))


def test_make_loader_uses_a_dataloader_for_lazy_datasets() -> None:
    dataset = Subset(indexed_dataset(10), list(range(10)))
    loader = make_loader(dataset, batch_size=4, device=CPU, shuffle=False, drop_last=True, num_workers=0)
    assert isinstance(loader, DataLoader)
    assert len(loader) == 2
    assert epoch_ids(loader) == list(range(8))


# ----------------------------------------------------------------------------- image folders

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def write_image_folder(root: Path, per_class: int = 4) -> Path:
    """Class subfolders of small solid-colour PNGs (non-square, to exercise the resize)."""
    colours = list(COLOURS.values())
    return helpers.write_image_folder(root, list(COLOURS), per_class, lambda i: (7 + i, 5), lambda c, i: colours[c])


def test_image_folder_source_loads_resized_uint8_items_and_holds_out_test_fraction(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images")
    source = ImageFolderSource(str(folder), image_size=6, test_fraction=0.25, seed=0)
    assert source.num_classes == 3 and source.classes == ["cat", "dog", "emu"]
    train, test = source.load()
    assert len(train) == 9 and len(test) == 3
    for dataset in (train, test):
        for image, label in (dataset[i] for i in range(len(dataset))):
            assert image.dtype == torch.uint8 and image.shape == (3, 6, 6)
            expected = torch.tensor(COLOURS[source.classes[label]], dtype=torch.uint8).view(3, 1, 1)
            assert torch.equal(image, expected.expand(3, 6, 6))  # the label matches the image's class folder
    assert source.cache_key != ImageFolderSource(str(folder), image_size=8).cache_key


def test_image_folder_source_with_test_path_uses_both_folders(tmp_path: Path) -> None:
    train_folder = write_image_folder(tmp_path / "train", per_class=2)
    test_folder = write_image_folder(tmp_path / "test", per_class=1)
    train, test = ImageFolderSource(train_folder, image_size=4, test_path=str(test_folder)).load()
    assert len(train) == 6 and len(test) == 3

    (tmp_path / "odd" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "odd" / "cat" / "0.png")
    with pytest.raises(DataError, match="classes"):
        ImageFolderSource(train_folder, image_size=4, test_path=str(tmp_path / "odd")).load()


def test_image_folder_source_missing_path_is_a_data_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as caught:
        ImageFolderSource(str(missing))
    assert str(missing) in str(caught.value) and "path=" in str(caught.value)


def test_image_folder_source_without_class_subfolders_is_a_data_error(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "0.png")
    with pytest.raises(DataError, match="no class subfolders") as caught:
        ImageFolderSource(str(flat))
    assert str(flat) in str(caught.value)


def test_image_folder_bad_files_and_empty_classes_are_listed_before_any_work(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images")
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "cat" / ".DS_Store").write_bytes(b"\x00")  # hidden files are ignored
    (folder / "yak").mkdir()
    with pytest.raises(DataError) as caught:
        ImageFolderSource(str(folder))
    message = str(caught.value)
    assert "not image files (1): " + str(folder / "cat" / "notes.txt") in message
    assert "unreadable images (1): " + str(folder / "dog" / "broken.png") in message
    assert "class folders without images (1): " + str(folder / "yak") in message
    assert "data.source.bad_files=skip" in message and ".DS_Store" not in message


def test_image_folder_skip_policy_leaves_bad_files_out_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_image_folder(tmp_path / "images")
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "dog" / "broken.jpg").write_bytes(b"")
    (folder / "yak").mkdir()
    source = ImageFolderSource(str(folder), image_size=4, test_fraction=0.25, bad_files="skip")
    assert source.classes == ["cat", "dog", "emu"] and source.num_classes == 3
    assert "skipping 2 non-image or unreadable file(s) and 1 class folder(s) without images" in caplog.text
    train, test = source.load()
    assert len(train) + len(test) == 12
    assert all(image.shape == (3, 4, 4) for image, _ in (train[i] for i in range(len(train))))


def test_preparing_a_folder_draws_nothing_from_the_global_rng(tmp_path: Path) -> None:
    """A first run (cold statistics cache) and a rerun (warm) must see the same random numbers afterwards."""
    source = ImageFolderSource(str(write_image_folder(tmp_path / "images")), image_size=6, test_fraction=0.25)
    for _ in ("cold cache", "warm cache"):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        prepare_splits(source, 0.25, 0, tmp_path / "cache")
        assert torch.equal(torch.get_rng_state(), before)
