"""Image folders decoded once: the cache equals the lazy path, is reused while the folder stays as it is, and is
rebuilt (never trusted) when the folder changes or the cache is damaged or another folder's; a read-only data root
still trains. Runs with a cold and a warm cache give the same numbers."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from perceiver.data import ArrayDataset, ImageFolderSource, folders
from perceiver.data.cache import CacheDir
from perceiver.experiment.build import build, build_parts, load_data, make_loaders
from perceiver.experiment.run import train
from tests import helpers

SIZES = lambda i: (9 + 3 * i, 7 + i)  # noqa: E731 - non-square and of several sizes: the resize matters


def colourful(c: int, i: int) -> tuple[int, int, int]:
    return (40 * c + 7 * i, 255 - 30 * i, 90 + 50 * c)


def write_folder(root: Path, per_class: int = 4, classes=("ant", "bee", "cow")) -> Path:
    """Real PNGs with a gradient each (a solid colour would survive any resize unchanged)."""
    helpers.write_image_folder(root, classes, per_class, SIZES, colourful)
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            pixels = np.array(image)
        pixels[:, : pixels.shape[1] // 2] //= 2  # a vertical edge, so interpolation shows
        Image.fromarray(pixels).save(path)
    return root


def items(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([int(label) for _, label in pairs])


def source(folder: Path, cache: Path | None, **kwargs) -> ImageFolderSource:
    return ImageFolderSource(str(folder), image_size=6, cache_dir=str(cache) if cache else None, **kwargs)


def cache_files(cache: Path, pattern: str) -> list[Path]:
    return sorted(cache.glob(pattern))


def assert_same(a: Dataset, b: Dataset) -> None:
    images_a, labels_a = items(a)
    images_b, labels_b = items(b)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


# ----------------------------------------------------------------------------- what the cache holds


@pytest.mark.parametrize("with_test_path", [False, True], ids=["held-out test", "test folder"])
def test_cached_arrays_equal_the_lazy_items(tmp_path: Path, with_test_path: bool) -> None:
    train_folder = write_folder(tmp_path / "train")
    test_path = str(write_folder(tmp_path / "test", per_class=2)) if with_test_path else None
    lazy = source(train_folder, None, in_memory=False, test_path=test_path).load()
    cold = source(train_folder, tmp_path / "cache", in_memory=True, test_path=test_path).load()
    warm = source(train_folder, tmp_path / "cache", in_memory=True, test_path=test_path).load()
    for split in (0, 1):
        assert isinstance(cold[split], ArrayDataset) and not isinstance(lazy[split], ArrayDataset)
        assert_same(cold[split], lazy[split])
        assert_same(warm[split], lazy[split])
    assert len(cache_files(tmp_path / "cache", "images-*.npy")) == (2 if with_test_path else 1)


def test_a_warm_cache_neither_decodes_nor_opens_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_folder(tmp_path / "images")
    first = source(folder, tmp_path / "cache").load()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a warm cache was not used")

    monkeypatch.setattr(folders, "_is_readable_image", must_not_run)  # the scan's check of each file
    monkeypatch.setattr(folders, "decode_all", must_not_run)
    again = source(folder, tmp_path / "cache").load()
    assert_same(again[0], first[0]) and assert_same(again[1], first[1])


def test_a_changed_added_or_removed_file_invalidates_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    source(folder, cache).load()
    opened: list[Path] = []
    readable = folders._is_readable_image
    monkeypatch.setattr(folders, "_is_readable_image", lambda path: opened.append(path) or readable(path))

    changed = folder / "bee" / "1.png"
    Image.new("RGB", (9, 9), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(1, 1))  # another mtime even on a coarse clock
    added = folder / "cow" / "9.png"
    Image.new("RGB", (5, 8), (200, 10, 10)).save(added)
    (folder / "ant" / "0.png").unlink()
    for _ in range(2):  # the first load sees the change, the second its cache
        opened.clear()
        current = source(folder, cache, in_memory=True, test_fraction=0.25)
        assert sorted(opened) == ([] if _ else sorted([changed, added]))  # only new or changed files re-checked
        fresh = source(folder, None, in_memory=False, test_fraction=0.25)
        for got, expected in zip(current.load(), fresh.load(), strict=True):
            assert_same(got, expected)
    assert len(cache_files(cache, "images-*.npy")) == 1  # rebuilt in place, not one more cache per change


def test_a_new_folder_state_gets_new_statistics(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images")
    before = source(folder, None).cache_key
    Image.new("RGB", (9, 9), (1, 2, 3)).save(folder / "bee" / "1.png")
    os.utime(folder / "bee" / "1.png", ns=(1, 1))
    assert source(folder, None).cache_key != before  # same file count, other pixels: not the old statistics


# ----------------------------------------------------------------------------- caches that must not be trusted


def cached_array(cache: Path) -> Path:
    (npy,) = cache_files(cache, "images-*.npy")
    return npy


def test_a_truncated_cache_file_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    expected = source(folder, cache).load()
    npy = cached_array(cache)
    size = npy.stat().st_size
    with open(npy, "r+b") as file:
        file.truncate(size - 50)
    again = source(folder, cache).load()
    assert "is damaged" in caplog.text and "rebuilt" in caplog.text
    assert_same(again[0], expected[0])
    assert npy.stat().st_size == size  # the rebuilt file is whole again
    caplog.clear()
    source(folder, cache).load()
    assert "rebuilt" not in caplog.text


def test_corrupt_bytes_of_the_same_size_are_caught_by_the_checksum(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    expected = source(folder, cache).load()
    npy = cached_array(cache)
    data = bytearray(npy.read_bytes())
    data[-10] ^= 0xFF  # one pixel, inside the array
    npy.write_bytes(bytes(data))
    again = source(folder, cache).load()
    assert "does not match its manifest" in caplog.text
    assert_same(again[0], expected[0])


def test_a_cache_of_another_folder_is_rebuilt_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another folder's files under this folder's names (a copied cache, a hash collision): never trusted."""
    first, second = write_folder(tmp_path / "first"), write_folder(tmp_path / "second", classes=("ant", "bee"))
    cache = tmp_path / "cache"
    source(first, cache).load()
    for kind in ("scan", "images"):
        for path in cache.glob(f"{kind}-{folders.folder_key(first)}*"):
            shutil.copy(path, cache / path.name.replace(folders.folder_key(first), folders.folder_key(second)))
    got = source(second, cache, in_memory=True)
    assert got.classes == ["ant", "bee"]  # the scan is its own
    assert "scan cache of" in caplog.text and "belongs to another folder" in caplog.text
    for loaded, expected in zip(got.load(), source(second, None, in_memory=False).load(), strict=True):
        assert_same(loaded, expected)
    assert "decoded-image cache" in caplog.text


def test_an_unreadable_scan_cache_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    source(folder, cache)
    (scan_file,) = cache_files(cache, "scan-*.json")
    scan_file.write_text('{"version": 1, "folder": ')
    assert source(folder, cache).classes == ["ant", "bee", "cow"]
    assert "unreadable: it is rebuilt" in caplog.text
    assert json.loads(scan_file.read_text())["folder"] == str(folder.resolve())


# ----------------------------------------------------------------------------- memory budget and settings


def test_the_scan_takes_the_image_extensions_torchvision_does() -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert folders.IMG_EXTENSIONS == IMG_EXTENSIONS


def test_in_memory_auto_holds_the_folder_in_memory_only_within_the_budget(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images")
    decoded = 12 * 3 * 6 * 6  # bytes
    fits = source(folder, None, memory_budget_gb=decoded / 2**30).load()
    over = source(folder, None, memory_budget_gb=(decoded - 1) / 2**30).load()
    assert isinstance(fits[0], ArrayDataset) and not isinstance(over[0], ArrayDataset)
    assert isinstance(source(folder, None, in_memory=True, memory_budget_gb=0).load()[0], ArrayDataset)


@pytest.mark.parametrize(("field", "value"), [("in_memory", "yes"), ("in_memory", 1), ("memory_budget_gb", -1.0)])
def test_bad_in_memory_settings_are_refused(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        source(write_folder(tmp_path / "images"), None, **{field: value})


def test_the_imagefolder_config_caches_under_the_data_root_and_trains_on_device_batches(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "images", per_class=10)
    cfg = compose_config("experiment=cpu_smoke", "data=imagefolder", f"data.source.path={folder}", "logger=none")
    parts = build_parts(cfg)
    train_loader, val_loader, test_loader = make_loaders(load_data(cfg, parts), parts, seed=0)
    assert all(type(loader).__name__ == "DeviceBatches" for loader in (train_loader, val_loader, test_loader))
    root = Path(os.environ["PERCEIVER_DATA_ROOT"]) / ".cache"
    assert len(list(root.glob("images-*.npy"))) == 1 and len(list(root.glob("scan-*.json"))) == 1
    lazy = compose_config(
        "experiment=cpu_smoke", "data=imagefolder", f"data.source.path={folder}", "data.source.in_memory=false"
    )
    lazy_parts = build_parts(lazy)
    assert type(make_loaders(load_data(lazy, lazy_parts), lazy_parts, seed=0)[0]).__name__ != "DeviceBatches"


# ----------------------------------------------------------------------------- reproducible first runs


def global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


@pytest.mark.parametrize("augmentation", ["keras", "randaugment"])
def test_start_up_after_the_model_draws_nothing_from_the_global_rngs(
    compose_config: Callable[..., DictConfig], tmp_path: Path, augmentation: str
) -> None:
    """Data (cold and warm caches), loaders, their first batch and the W&B start leave torch's, NumPy's and
    Python's global generators where the seed put them: they belong to initialisation, dropout and augmentation."""
    folder = write_folder(tmp_path / "images", per_class=10)
    for _ in ("cold", "warm"):
        cfg = compose_config(
            "experiment=cpu_smoke",
            "data=imagefolder",
            f"data.source.path={folder}",
            f"augmentation={augmentation}",
            "logger.mode=offline",
            "trainer.num_workers=0",
        )
        parts = build_parts(cfg)
        before = global_rng_states()
        splits = load_data(cfg, parts)
        loaders = make_loaders(splits, parts, seed=0)
        for loader in loaders:
            next(iter(loader))
        tracker = build("logger", cfg.logger)(config={}, run_dir=tmp_path, run_id=None)
        tracker.finish()
        assert_same_states(before, global_rng_states())


@pytest.mark.parametrize("in_memory", [True, False], ids=["in memory", "lazy"])
def test_cold_and_warm_cache_runs_give_identical_metrics(
    compose_config: Callable[..., DictConfig], tmp_path: Path, in_memory: bool
) -> None:
    folder = write_folder(tmp_path / "images", per_class=12)
    cfg = compose_config(
        "experiment=cpu_smoke",
        "data=imagefolder",
        f"data.source.path={folder}",
        "data.source.image_size=16",
        f"data.source.in_memory={str(in_memory).lower()}",
        "logger=none",
        "trainer.epochs=2",
        "trainer.num_workers=0",
        "trainer.save_checkpoints=false",
    )
    cache = Path(os.environ["PERCEIVER_DATA_ROOT"]) / ".cache"
    assert not cache.exists()
    (tmp_path / "cold").mkdir(), (tmp_path / "warm").mkdir()
    cold = train(cfg, run_dir=tmp_path / "cold")
    assert list(cache.glob("stats-*.json")) and list(cache.glob("scan-*.json"))
    assert bool(list(cache.glob("images-*.npy"))) == in_memory
    warm = train(cfg, run_dir=tmp_path / "warm")
    assert cold["test"] == warm["test"]
    drop_timing = lambda row: {k: v for k, v in row.items() if "second" not in k and not k.startswith("perf")}  # noqa: E731
    assert [drop_timing(r) for r in cold["history"]] == [drop_timing(r) for r in warm["history"]]


# ----------------------------------------------------------------------------- a read-only data root


def read_only_command(root: Path, command: list[str]) -> list[str]:
    """`command` with `root` read-only: plain permissions for a normal user; root ignores those, so it runs in a
    user and mount namespace of its own with `root` bind-mounted read-only (nothing outside that process changes)."""
    if os.geteuid() != 0:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return command
    if shutil.which("unshare") is None:
        pytest.fail("running as root without `unshare`: no way to make a read-only folder here")
    mount = f'mount --bind "{root}" "{root}" && mount -o remount,bind,ro "{root}" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh", *command]


@pytest.mark.slow
def test_a_read_only_data_root_still_trains_without_a_cache_and_says_so_once(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images", per_class=10)
    root = tmp_path / "data_root"
    root.mkdir()
    probe = subprocess.run(read_only_command(root, ["touch", str(root / "probe")]), capture_output=True, check=False)
    assert probe.returncode != 0 and not (root / "probe").exists()  # it really is read-only for the command
    arguments = ["experiment=cpu_smoke", "data=imagefolder", f"data.source.path={folder}", "logger=none"]
    arguments += ["trainer.epochs=1", f"paths.data_root={root}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(
        read_only_command(root, [sys.executable, "train.py", *arguments]),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("cannot be written") == 1, log[-3000:]
    assert "training goes on without caching" in log and "test: top1" in log
    assert list(root.iterdir()) == []  # nothing was written there
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_run"] == 1


def test_a_cache_folder_that_cannot_be_written_warns_once_for_all_its_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a file where the cache folder should be makes every write fail; one warning in all."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    folder = write_folder(tmp_path / "images")
    loaded = source(folder, blocked / "cache").load()
    assert isinstance(loaded[0], ArrayDataset)  # decoded in memory all the same
    assert CacheDir(blocked / "cache").writable is False
    source(folder, blocked / "cache").load()
    assert caplog.text.count("cannot be written") == 1
