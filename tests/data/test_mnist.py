"""The MNIST family's data groups (data=fashion_mnist, mnist, kmnist): idx files written here in the real format,
where they are looked up, what a bad or missing file says, and a 1-channel model trained on them end to end."""

from __future__ import annotations

import gzip
import json
import struct
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import DictConfig
from PIL import Image

from perceiver.data import BatchAugment, DataError, MnistSource
from perceiver.data.mnist import read_idx
from perceiver.experiment.build import build_parts, load_data
from perceiver.experiment.config import ConfigError
from perceiver.inference import export, load_run
from tests.helpers import run_script

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # LeCun and Cortes: 0x00000803 and 0x00000801, big-endian
HOW_TO_GET = ("apt-get install dataset-fashion-mnist", "data.source.download=true", "data.source.path=")


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """The idx format written by hand: magic number and dimensions as big-endian 32-bit integers, then the bytes."""
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_folder(
    folder: Path, train: int = 40, test: int = 20, gz: bool = True, seed: int = 0, size: int = 28
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four files of an MNIST-like data set with a learnable class signal (a bright band at a class's rows);
    returns what was written: {"train": (images, labels), "test": (...)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, (count, size, size), dtype=np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[2 * label : 2 * label + 4] = 250
        for name, magic, array in (("images-idx3", IMAGE_MAGIC, images), ("labels-idx1", LABEL_MAGIC, labels)):
            data = idx_bytes(magic, array)
            path = folder / f"{prefix}-{name}-ubyte"
            if gz:
                path.with_suffix(".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)
        written[split] = (images, labels)
    return written


def source(folder: Path | None = None, **kwargs) -> MnistSource:
    return MnistSource("fashion_mnist", path=str(folder) if folder else None, **{"system_path": None, **kwargs})


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_reads_what_was_written_one_channel_uint8(tmp_path: Path, gz: bool) -> None:
    written = write_idx_folder(tmp_path / "idx", gz=gz)
    train, test = source(tmp_path / "idx").load()
    for dataset, (images, labels) in ((train, written["train"]), (test, written["test"])):
        assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (len(images), 1, 28, 28)
        assert dataset.labels.dtype == torch.int64
        assert np.array_equal(dataset.images[:, 0].numpy(), images)
        assert np.array_equal(dataset.labels.numpy(), labels)
        assert dataset.images.untyped_storage().nbytes() == images.size  # one byte a pixel: nothing tripled


def test_reader_agrees_with_torchvisions_on_the_same_file(tmp_path: Path) -> None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    write_idx_folder(tmp_path, train=13, test=3, gz=False, seed=5)
    images = read_idx(tmp_path / "train-images-idx3-ubyte", dims=3)
    labels = read_idx(tmp_path / "train-labels-idx1-ubyte", dims=1)
    assert torch.equal(torch.from_numpy(images), read_image_file(str(tmp_path / "train-images-idx3-ubyte")))
    assert torch.equal(torch.from_numpy(labels).long(), read_label_file(str(tmp_path / "train-labels-idx1-ubyte")))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_class_names_are_the_data_sets_own(name: str) -> None:
    reference = getattr(torchvision.datasets, MnistSource.families[name].torchvision_class).classes
    assert MnistSource(name).classes == reference and MnistSource(name).num_classes == 10


def test_lookup_order_path_then_torchvisions_folder_then_system_path(tmp_path: Path) -> None:
    root, system = tmp_path / "root", tmp_path / "debian"
    explicit = write_idx_folder(tmp_path / "explicit", seed=1)
    write_idx_folder(system, seed=2)
    from_system = MnistSource("fashion_mnist", root=str(root), system_path=str(system), download=False)
    assert from_system.find() == system
    torchvision_folder = write_idx_folder(root / "FashionMNIST" / "raw", gz=False, seed=3)
    assert from_system.find() == root / "FashionMNIST" / "raw"
    assert np.array_equal(from_system.load()[0].labels.numpy(), torchvision_folder["train"][1])
    chosen = MnistSource("fashion_mnist", str(tmp_path / "explicit"), str(root), str(system), download=False)
    assert np.array_equal(chosen.load()[0].labels.numpy(), explicit["train"][1])
    assert chosen.cache_key != from_system.cache_key  # two copies never share statistics


class FakeDownload:
    """torchvision's FashionMNIST as the source calls it: what it writes is what a real download unpacks."""

    calls: ClassVar[list[tuple[str, bool, bool]]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        FakeDownload.calls.append((root, train, download))
        write_idx_folder(Path(root) / "FashionMNIST" / "raw", gz=False, seed=7)


def test_download_through_torchvision_when_found_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)
    FakeDownload.calls = []
    train, _ = source(root=str(tmp_path), download=True).load()
    assert FakeDownload.calls == [(str(tmp_path), True, True)]
    assert len(train) == 40 and train.images.shape[1:] == (1, 28, 28)
    source(root=str(tmp_path), download=True).load()
    assert len(FakeDownload.calls) == 1  # found in torchvision's folder the second time


def test_failed_download_says_how_to_get_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as error:
        source(root=str(tmp_path), download=True).load()
    assert "no network" in str(error.value) and all(way in str(error.value) for way in HOW_TO_GET)


def test_missing_everywhere_fails_before_any_work_naming_the_places(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(
        "experiment=cpu_smoke",
        "data=fashion_mnist",
        f"paths.data_root={tmp_path}",
        f"data.source.system_path={tmp_path / 'no-debian'}",
        "data.source.download=false",
    )
    with pytest.raises(ConfigError) as error:
        build_parts(cfg)
    message = str(error.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and str(tmp_path / "no-debian") in message
    assert all(way in message for way in HOW_TO_GET)


@pytest.mark.parametrize("missing", ["folder", "file"])
def test_explicit_path_is_the_only_place_looked_in(tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "idx"
    if missing == "file":
        write_idx_folder(folder)
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as error:
        source(folder, root=str(tmp_path), download=True).check()
    message = str(error.value)
    assert str(folder) in message and all(way in message for way in HOW_TO_GET)
    assert ("lacks t10k-labels-idx1-ubyte" if missing == "file" else "does not exist") in message


def damage(folder: Path, how: str) -> tuple[Path, str]:
    """Spoil one file of a raw idx folder; returns it and a phrase its error must hold."""
    images = folder / "train-images-idx3-ubyte"
    labels = folder / "train-labels-idx1-ubyte"
    if how == "magic":
        images.write_bytes(b"\x00\x00\x0d\x03" + images.read_bytes()[4:])  # float elements, not unsigned bytes
        return images, "magic number is 00000d03"
    if how == "labels as images":
        images.write_bytes(labels.read_bytes())
        return images, "magic number is 00000801"
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        return images, "truncated"
    if how == "trailing bytes":
        images.write_bytes(images.read_bytes() + b"\x00")
        return images, "more bytes"
    if how == "count mismatch":
        labels.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(39, dtype=np.uint8)))
        return images, "40 images but"
    if how == "label out of range":
        labels.write_bytes(idx_bytes(LABEL_MAGIC, np.full(40, 10, dtype=np.uint8)))
        return labels, "label 10"
    images.with_suffix(".gz").write_bytes(b"not gzip at all")
    images.unlink()
    return images.with_suffix(".gz"), "could not be read"


@pytest.mark.parametrize(
    "how", ["magic", "labels as images", "truncated", "trailing bytes", "count mismatch", "label out of range", "gz"]
)
def test_bad_file_is_named_with_what_is_wrong_and_how_to_get_the_data(tmp_path: Path, how: str) -> None:
    write_idx_folder(tmp_path, gz=False)
    path, phrase = damage(tmp_path, how)
    with pytest.raises(DataError) as error:
        source(tmp_path).load()
    message = str(error.value)
    assert str(path) in message and phrase in message and all(way in message for way in HOW_TO_GET)


def test_truncated_gz_file_is_named(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(DataError, match=str(labels)):
        source(tmp_path).load()


@pytest.mark.parametrize("data", ["mnist", "kmnist", "fashion_mnist"])
def test_data_groups_compose_and_load_one_channel_statistics(
    compose_config: Callable[..., DictConfig], tmp_path: Path, data: str
) -> None:
    written = write_idx_folder(tmp_path / "idx", gz=data != "kmnist")
    cfg = compose_config(
        "experiment=cpu_smoke", f"data={data}", f"data.source.path={tmp_path / 'idx'}", f"paths.data_root={tmp_path}"
    )
    assert cfg.data.channels == cfg.model.in_channels == 1 and cfg.data.source.name == data
    parts = build_parts(cfg)
    assert parts.model.encoder.projection.in_features == 4 * 4 * 1  # the patch projection: patch 4, one channel
    splits = load_data(cfg, parts)
    assert len(splits.train) + len(splits.val) == 40 and len(splits.test) == 20
    assert len(splits.mean) == len(splits.std) == 1 == parts.augment.channels
    train_images = splits.train.images.numpy().astype(np.float64)
    assert train_images.shape == (len(splits.train), 1, 28, 28)
    assert splits.mean[0] == pytest.approx(train_images.mean()) and splits.std[0] == pytest.approx(train_images.std())
    assert sorted(splits.test.labels.tolist()) == sorted(written["test"][1].tolist())
    inputs, _ = parts.augment(splits.train.images[:8], splits.train.labels[:8])
    assert inputs.shape == (8, 1, 16, 16) and parts.model(inputs).shape == (8, 10)


def test_grey_images_through_randaugment_both_backends() -> None:
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for backend in ("device", "timm"):
        augment = BatchAugment(28, 10, randaugment="rand-m9-mstd0.5", randaugment_backend=backend)
        augment.set_statistics([72.9], [90.0])
        per_image = augment.sample_transform()
        batch = torch.stack([per_image(image) for image in images]) if per_image else images
        assert batch.shape == (16, 1, 28, 28) and batch.dtype == torch.uint8
        assert augment(batch, torch.zeros(16, dtype=torch.long))[0].shape == (16, 1, 28, 28)


@pytest.mark.slow
def test_train_py_on_idx_files_trains_a_one_channel_model_end_to_end(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "idx", train=200, test=50)
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        "experiment=cpu_smoke",
        "data=fashion_mnist",
        f"data.source.path={tmp_path / 'idx'}",
        "model.image_size=28",
        "trainer.epochs=2",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and 0.0 <= metrics["test"]["top1"] <= 1.0
    assert (run_dir / "attention" / "final.png").is_file()
    classifier = load_run(run_dir, device="cpu")
    assert classifier.in_channels == 1 and classifier.classes[0] == "T-shirt/top"
    assert classifier.preprocess.mean.shape == (1, 1, 1, 1)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 40), 200, dtype=np.uint8)).save(grey)
    assert classifier.as_batch(grey).shape == (1, 1, 28, 28)
    assert len(classifier.predict([grey, torch.zeros(1, 28, 28, dtype=torch.uint8)], k=2)) == 2
    program = torch.export.load(export(classifier, tmp_path / "model.pt2", format="torch_export")).module()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert torch.allclose(program(images), classifier.logits(images), atol=1e-4)
    assert "(batch, 1, 28, 28), L" in classifier.metadata()["input"]
