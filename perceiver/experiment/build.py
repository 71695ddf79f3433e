"""Config -> parts: every part is built with Hydra's `instantiate`, cheapest first, and every error is turned
into a ConfigError that names the config path it came from."""

from __future__ import annotations

import inspect
import logging
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from perceiver.data import DataError, DataSource, Shard, Splits, make_loader, prepare_splits
from perceiver.experiment.config import ConfigError, check_run_settings, train_settings
from perceiver.experiment.tracking import resolve_mode
from perceiver.models.registry import registered_models
from perceiver.training import TrainingParts, TrainSettings, distributed
from perceiver.training.device import PeakCache, matmul_peak, peak_signature, resolve_device
from perceiver.training.metrics import training_flops

log = logging.getLogger(__name__)

# (device, dtype) -> FLOP/s: timed once per process, so the jobs of a sweep run in one process share the ~1 s
_matmul_peaks: dict[tuple[str, torch.dtype], float] = {}
PEAK_CACHE_FILE = "matmul_peak.json"  # below paths.cache_dir: the jobs and runs of other processes share it too


def with_group(group: str, error: BaseException) -> str:
    """Prefix an error with its config group: `model.image_size=63 ...` or `optimizer: Invalid lr`."""
    message = str(error)
    if message.startswith(f"{group}.") or isinstance(error, DataError):
        return message
    return f"{group}.{message}" if re.match(r"^\w+=", message) else f"{group}: {message}"


def build(group: str, node: DictConfig, *call_args: Any, **kwargs: Any) -> Any:
    """`instantiate` (then call a `_partial_` with `call_args`), with errors that name the config group."""
    try:
        made = instantiate(node, **kwargs)
        return made(*call_args) if call_args else made
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ValueError | TypeError | DataError):
            raise ConfigError(with_group(group, cause)) from error
        raise
    except (ValueError, TypeError, OmegaConfBaseException) as error:
        raise ConfigError(with_group(group, error)) from error


def foreign_fields(target: type, names: Any) -> list[str]:
    """Those of `names` that another known model takes and `target` does not (latent_dim for a ViT, ...)."""
    own = set(inspect.signature(target).parameters)
    models = registered_models()  # a preset's fields for one of these are skipped, with a warning, by the others
    others = {name for model in models if model is not target for name in inspect.signature(model).parameters}
    return sorted(set(names) & (others - own))


def model_fields(node: DictConfig, num_classes: int) -> dict[str, Any]:
    """`_target_` and the resolved constructor arguments the model is built with (best.pt records them, so that
    the model can be rebuilt without Hydra): the group's fields less those of other models, and the data set's
    number of classes."""
    target = get_class(node._target_)
    skipped = foreign_fields(target, node)
    if skipped:
        log.warning("model=%s ignores the setting(s) %s of other models", target.__name__, ", ".join(skipped))
    try:
        fields = OmegaConf.to_container(node, resolve=True)  # resolved: interpolations need the whole config
    except OmegaConfBaseException as error:
        raise ConfigError(with_group("model", error)) from error
    return {**{key: value for key, value in fields.items() if key not in skipped}, "num_classes": num_classes}


def check_num_classes(configured: int | None, actual: int) -> int:
    if configured is None:
        return actual
    if configured != actual:
        raise ConfigError(
            f"model.num_classes={configured} disagrees with the data set, which has {actual} classes; "
            f"drop the override or set model.num_classes={actual}"
        )
    return configured


@dataclass
class Parts(TrainingParts):
    """What is trained (`fit` takes it as it is), and what the run around it needs."""

    settings: TrainSettings | None = None
    source: DataSource | None = None
    model_config: dict[str, Any] = field(default_factory=dict)  # how the model was built (`model_fields`)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def configured_device(cfg: DictConfig) -> torch.device:
    """`trainer.device` resolved (auto = CUDA when there is one); ConfigError for a device that is not there."""
    try:
        return resolve_device(cfg.trainer.device)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_parts(cfg: DictConfig, device: torch.device | None = None) -> Parts:
    """Everything cheap, in the order that fails fastest, so a bad setting costs seconds, not a data download;
    the random generators are seeded with `seed` before the first part is built. `device`: this rank's (a run
    resolves it once, `RunSetup`); by default `trainer.device`'s."""
    check_run_settings(cfg)
    settings = train_settings(cfg)
    if device is None:
        device = distributed.rank_device(configured_device(cfg), distributed.current())
    try:
        resolve_mode(cfg.logger.get("mode", "disabled"))
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    seed_everything(cfg.seed)
    source = build("data.source", cfg.data.source)
    try:
        source.check()
    except DataError as error:
        raise ConfigError(str(error)) from error
    num_classes = check_num_classes(cfg.model.get("num_classes"), source.num_classes)
    model_config = model_fields(cfg.model, num_classes)
    model = build("model", OmegaConf.create(model_config)).to(device)
    augment = build("augmentation", cfg.augmentation, num_classes=num_classes).to(device)
    optimizer = build("optimizer", cfg.optimizer, model)
    scheduler = build("scheduler", cfg.scheduler, optimizer)
    return Parts(model, augment, optimizer, scheduler, num_classes, settings, source, model_config)


def shared_cache_dir(cfg: DictConfig) -> Path | None:
    """`paths.cache_dir`, where runs on this machine share what they derived; configs saved before it existed
    (a resumed run's) get its default, `<data root>/.cache`."""
    folder = cfg.paths.get("cache_dir", str(Path(cfg.paths.data_root) / ".cache"))
    return Path(folder) if folder else None


def load_data(cfg: DictConfig, parts: Parts) -> Splits:
    """Load, split and measure the data; the first step that can take long (a download)."""
    try:
        size = cfg.data.get("train_size")  # configs saved before it existed (a resumed run's) have none
        splits = prepare_splits(parts.source, cfg.data.val_fraction, cfg.seed, shared_cache_dir(cfg), size)
    except (DataError, ValueError) as error:
        raise ConfigError(str(error)) from error
    sizes = (len(splits.train), len(splits.val), len(splits.test), splits.num_classes)
    log.info("data: %d train / %d val / %d test images, %d classes", *sizes)
    parts.augment.set_statistics(splits.mean, splits.std)
    return splits


def make_loaders(
    splits: Splits, parts: Parts, seed: int, context: distributed.Context | None = None
) -> tuple[Any, Any, Any]:
    """Each rank gets its shard of every epoch: equal shares for training, all images for evaluation."""
    settings, device, context = parts.settings, parts.device, context or distributed.Context()
    train_loader = make_loader(
        splits.train,
        settings.batch_size,
        device,
        shuffle=True,
        drop_last=parts.augment.mixes_batches,
        seed=seed,
        num_workers=settings.num_workers,
        sample_transform=parts.augment.sample_transform(),
        shard=Shard(context.rank, context.world_size, even=True),
    )
    val_loader, test_loader = (
        make_loader(
            split,
            settings.batch_size,
            device,
            num_workers=settings.num_workers,
            shard=Shard(context.rank, context.world_size, even=False),
        )
        for split in (splits.val, splits.test)
    )
    return train_loader, val_loader, test_loader


def with_measured_peak(
    settings: TrainSettings, model: torch.nn.Module, device: torch.device, cache_dir: str | Path | None = None
) -> TrainSettings:
    """`trainer.peak_tflops=auto` measured: the device's matmul peak in the run's precision, the reference of
    perf/mfu, timed once per process and, with a `cache_dir`, once per machine. A model without a FLOP count has
    no utilisation figures, so nothing is measured for it."""
    try:
        per_image = training_flops(model, settings.batch_size) / settings.batch_size
    except TypeError as error:
        log.warning("%s; perf/tflops and perf/mfu are not logged", error)
        return replace(settings, peak_tflops=None)
    log.info("model: %.4g GFLOP per training image (forward and backward)", per_image / 1e9)
    if settings.peak_tflops != "auto":
        return settings
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision, torch.float32)
    peak, source = device_peak(device, dtype, cache_dir)
    log.info("%s matmul peak of %s: %.2f TFLOP/s (the reference of perf/mfu; %s)", dtype, device, peak / 1e12, source)
    return replace(settings, peak_tflops=peak / 1e12)


def device_peak(device: torch.device, dtype: torch.dtype, cache_dir: str | Path | None) -> tuple[float, str]:
    """(FLOP/s, where it came from): this process's timing, else the machine's cache, else timed now (~1 s)."""
    key = (str(device), dtype)
    if key in _matmul_peaks:
        return _matmul_peaks[key], "timed earlier in this process"
    cache = PeakCache(Path(cache_dir) / PEAK_CACHE_FILE) if cache_dir else None
    signature = peak_signature(device, dtype)
    peak = cache.get(signature) if cache is not None else None
    source = f"timed before, read from {cache.path}" if peak is not None else "timed now"
    if peak is None:
        peak = matmul_peak(device, dtype)
        if cache is not None:
            cache.put(signature, peak)
    _matmul_peaks[key] = peak
    return peak, source
