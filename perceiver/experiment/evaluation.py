"""A trained run, evaluated or put to use: what `python evaluate.py run=DIR ...` does.

`evaluate_run` measures the run's model on a split (its own data set's test split by default, through the same
loader, preprocessing and `evaluate` as training, so the test top-1 is the one training wrote), writes
metrics.json, per-class accuracy, the confusion matrix and the most confident mistakes, and logs them as a W&B run
(job_type=eval, in the training run's group, its id in the config). `predict_files` classifies image files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch.utils.data import ConcatDataset, Dataset

from perceiver.data import ArrayDataset, DataError, make_loader, open_rgb, split_validation
from perceiver.experiment.build import build
from perceiver.experiment.config import ConfigError, check_targets
from perceiver.experiment.job import job_overrides
from perceiver.experiment.report import Observations, per_class_rows, write_evaluation_files, write_predictions
from perceiver.files import write_text_atomic
from perceiver.inference import Classifier, is_pretrained_folder, model_file, read_model_file
from perceiver.inference.runs import classifier_from
from perceiver.training import evaluate
from perceiver.training.checkpoint import finished_metrics, run_dir_of
from perceiver.training.device import resolve_device
from perceiver.training.state import BestModel

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")
MAX_LISTED_CLASSES = 25


@dataclass
class TrainedRun:
    """A run's model and what the run recorded about it."""

    classifier: Classifier
    run_dir: Path
    model_file: Path | None  # None for a folder save_pretrained wrote
    best: BestModel | None
    config: dict[str, Any]  # the run's resolved config ({} without one)
    metrics: dict[str, Any] | None  # its metrics.json, once it finished

    @property
    def train_run_id(self) -> str | None:
        return (self.metrics or {}).get("wandb_run_id")


def eval_device(requested: str | None, run_config: dict[str, Any]) -> torch.device:
    """`device`, or (null) the run's own where this machine has it: the same device gives the same numbers."""
    try:
        if requested:
            return resolve_device(str(requested))
        try:
            return resolve_device(str(run_config.get("trainer", {}).get("device", "auto")))
        except ValueError:
            return resolve_device("auto")
    except ValueError as error:
        raise ConfigError(str(error).replace("trainer.device", "device")) from error


def open_run(reference: str, device: str | None) -> TrainedRun:
    """The run `run=` names (a run directory, a sweep job directory, a best.pt, or a save_pretrained folder)."""
    location = Path(os.path.expanduser(str(reference)))
    if is_pretrained_folder(location):
        classifier = Classifier.from_pretrained(location, map_location="cpu")
        return TrainedRun(classifier.to(eval_device(device, {})), location, None, None, {}, None)
    file = model_file(location)
    best = read_model_file(file)
    config = best.config or {}
    classifier = classifier_from(best, file).to(eval_device(device, config))
    run_dir = run_dir_of(file) or file.parent
    return TrainedRun(classifier, run_dir, file, best, config, finished_metrics(run_dir))


def data_config(cfg: DictConfig, trained: TrainedRun) -> DictConfig:
    """The data set to evaluate on: `data=<group>` from the command line (decoded at the model's input side unless
    `data.source.image_size` is given), else the run's own."""
    if cfg.get("data") is None:
        own = trained.config.get("data")
        if not own:
            raise ConfigError(f"{trained.run_dir} records no data set; give one: data=imagefolder data.source.path=DIR")
        check_targets(own, f"the data config of {trained.model_file}")
        return OmegaConf.create(own)
    try:
        chosen = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key if error.full_key.startswith("data.") else f"data.{error.full_key}"
        raise ConfigError(f"{key} is required: give {key}=...") from error
    except OmegaConfBaseException as error:
        raise ConfigError(f"data: {str(error).splitlines()[0]}") from error
    given = any(o.lstrip("+").startswith("data.source.image_size=") for o in job_overrides())
    if "image_size" in chosen.get("source", {}) and not given:
        chosen["source"]["image_size"] = trained.classifier.input_size
    return OmegaConf.create(chosen)


def check_classes(data_classes: list[str] | None, model_classes: list[str], where: str) -> None:
    """Refuse data whose classes are not the model's, in the same order, naming both lists."""
    if data_classes is None or list(data_classes) == list(model_classes):
        return

    def listed(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED_CLASSES else ""
        return ", ".join(names[:MAX_LISTED_CLASSES]) + more

    raise ConfigError(
        f"the classes of {where} differ from the model's: data [{listed(list(data_classes))}], "
        f"model [{listed(list(model_classes))}]; evaluate on data with the model's classes, "
        "or fine-tune the model on these (init_from=RUN_DIR)"
    )


def load_split(node: DictConfig, split: str, seed: int, model_classes: list[str]) -> Any:
    """The split `split` of the data set `node` describes: its test set, the run's seeded validation split (or
    what was left for training) of its training set, or all of it."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid: choose one of {', '.join(SPLITS)}")
    source = build("data.source", node.source)
    try:
        source.check()
        train_full, test = source.load()
    except DataError as error:
        raise ConfigError(str(error)) from error
    check_classes(getattr(source, "classes", None), model_classes, describe_data(node))
    if split == "test":
        return test
    if split == "all":
        return whole(train_full, test)
    train, val = split_validation(train_full, node.get("val_fraction", 0.1), seed, node.get("train_size"))
    return val if split == "val" else train


def whole(train: Dataset, test: Dataset) -> Dataset:
    """Every image of a data set, its training set then its test set (in memory when both are)."""
    if isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset):
        return ArrayDataset(torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]))
    return ConcatDataset([train, test])


def describe_data(node: DictConfig) -> str:
    source = node.source
    name = source.get("path") or source.get("name") or str(source.get("_target_", "?")).rpartition(".")[2]
    return f"the data ({name})"


def evaluate_classifier(
    classifier: Classifier,
    dataset: Dataset,
    run_config: dict[str, Any],
    precision: str | None = None,
    batch_size: int | None = None,
    num_workers: int = 2,
    observe: Observations | None = None,
    mirror: bool | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 of `classifier` on `dataset` as its training run evaluated its test split: the same
    loader, preprocessing and `evaluate`, in the run's precision (fp16 only on CUDA), batch size and test-time
    flip averaging (`augmentation.test_hflip`) unless given."""
    trainer = run_config.get("trainer", {})
    mirror = bool((run_config.get("augmentation") or {}).get("test_hflip", False)) if mirror is None else mirror
    device = classifier.device
    precision = precision or trainer.get("precision", "fp32")
    precision = "fp32" if precision == "fp16" and device.type != "cuda" else precision
    batch_size = int(batch_size or trainer.get("batch_size", 64))
    loader = make_loader(dataset, batch_size, device, num_workers=num_workers)
    model, preprocess, classes = classifier.model, classifier.preprocess, classifier.num_classes
    return evaluate(model, preprocess, loader, device, precision, classes, observe, mirror)


def evaluate_run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate the run on `cfg.split`, write the outputs into `out_dir` and log them; returns metrics.json."""
    trained = open_run(cfg.run, cfg.get("device"))
    classifier, run_config = trained.classifier, trained.config
    node = data_config(cfg, trained)
    split = load_split(node, cfg.split, int(run_config.get("seed", 0)), classifier.classes)
    observations = Observations(classifier.num_classes, int(cfg.get("mistakes", 16)))
    numbers = evaluate_classifier(
        classifier,
        split,
        run_config,
        cfg.get("precision"),
        cfg.get("batch_size"),
        int(cfg.get("num_workers", 2)),
        observations,
        cfg.get("test_hflip"),
    )
    title = f"{cfg.split} split, {observations.seen} images, top-1 {numbers['top1']:.4f}"
    files = write_evaluation_files(out_dir, observations, classifier.classes, title)
    metrics = evaluation_metrics(cfg, trained, node, numbers, observations, files)
    log_to_wandb(cfg, trained, metrics, observations, out_dir)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def evaluation_metrics(
    cfg: DictConfig,
    trained: TrainedRun,
    node: DictConfig,
    numbers: dict[str, float],
    observations: Observations,
    files: dict[str, str],
) -> dict[str, Any]:
    """metrics.json: the numbers (also under the split's name, as training's metrics.json has `test`), counts,
    and where they come from."""
    own_data = cfg.get("data") is None
    trained_test = (trained.metrics or {}).get("test") if own_data and cfg.split == "test" else None
    return {
        "split": cfg.split,
        **numbers,
        cfg.split: dict(numbers),
        "num_images": observations.seen,
        "correct": int(observations.confusion.diag().sum()),
        "training_metrics": trained_test,  # what the training run wrote for the same split, for comparison
        "run_dir": str(trained.run_dir),
        "model_file": str(trained.model_file) if trained.model_file else None,
        "best_epoch": trained.best.epoch if trained.best else None,
        "train_run_id": trained.train_run_id,
        "data": OmegaConf.to_container(node, resolve=True),
        "classes": trained.classifier.classes,
        "per_class": per_class_rows(observations.confusion, trained.classifier.classes),
        "files": files,
        "wandb_run_id": None,
    }


def log_to_wandb(
    cfg: DictConfig, trained: TrainedRun, metrics: dict[str, Any], observations: Observations, out_dir: Path
) -> None:
    """The eval run: job_type=eval in the training run's group, its id in the config; the metrics in the summary,
    the confusion matrix (a W&B plot and the PNG), the mistakes as a table of images, per-class accuracy."""
    logger = cfg.logger
    train_logger = trained.config.get("logger", {})
    train_id = trained.train_run_id
    config = {
        "train_run_id": train_id,
        "train_run_dir": str(trained.run_dir),
        "model_file": metrics["model_file"],
        "split": cfg.split,
        "data": metrics["data"],
        "model": trained.classifier.card["model"],
        "best_epoch": metrics["best_epoch"],
    }
    identity = {
        "project": logger.get("project") or train_logger.get("project") or "perceiver",
        "entity": logger.get("entity") or train_logger.get("entity"),
        "group": logger.get("group") or (trained.metrics or {}).get("wandb_group"),
        "job_type": logger.get("job_type") or "eval",
        "name": logger.get("name") or f"eval-{cfg.split}-{train_id or trained.run_dir.name}",
        "tags": [*(logger.get("tags") or []), "eval", cfg.split],
    }
    tracker = build("logger", logger)(config=config, run_dir=out_dir, run_id=None, **identity)
    summary = {f"{cfg.split}/{key}": metrics[key] for key in ("top1", "top5", "loss")}
    tracker.summarize({**summary, "num_images": metrics["num_images"]})
    tracker.log_media(lambda wandb: wandb_media(wandb, trained.classifier.classes, observations, metrics))
    metrics["wandb_run_id"] = tracker.run_id
    tracker.finish(exit_code=0)


def wandb_media(wandb: Any, classes: list[str], observations: Observations, metrics: dict[str, Any]) -> dict:
    """The W&B objects of an evaluation: built only when a W&B run takes them."""
    confusion = observations.confusion
    truth = [t for t in range(len(classes)) for p in range(len(classes)) for _ in range(int(confusion[t, p]))]
    predicted = [p for t in range(len(classes)) for p in range(len(classes)) for _ in range(int(confusion[t, p]))]
    mistakes = wandb.Table(columns=["image", "true", "predicted", "confidence", "index"])
    for m in observations.mistakes:
        image = wandb.Image(m.image.permute(1, 2, 0).numpy(), caption=f"{classes[m.true]} -> {classes[m.predicted]}")
        mistakes.add_data(image, classes[m.true], classes[m.predicted], m.confidence, m.index)
    rows = metrics["per_class"]
    per_class = wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
    files = metrics["files"]
    return {
        "confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=predicted, class_names=list(classes)),
        "confusion_matrix_image": wandb.Image(files["confusion_matrix_plot"]),
        "mistakes": mistakes,
        "mistakes_grid": wandb.Image(files["mistakes_plot"]),
        "per_class": per_class,
    }


def predict_files(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    """The top-k classes of every image file `cfg.predict` names, written as predictions.csv and .json."""
    trained = open_run(cfg.run, cfg.get("device"))
    files = image_files(cfg.predict)
    if not files:
        raise ConfigError(
            f"predict={cfg.predict!r} names no file; give an image file, a folder of images or a quoted glob "
            "such as 'photos/*.jpg'"
        )
    bad = unreadable_images(files)
    if bad:
        raise ConfigError(
            f"predict: {len(bad)} of {len(files)} file(s) cannot be read as images: {'; '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; remove them or narrow predict="
        )
    k, batch_size = int(cfg.get("top_k", 5)), int(cfg.get("batch_size") or 64)
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for path, top in zip(chunk, trained.classifier.predict(chunk, k=k), strict=True):
            rows.append({"file": str(path), "predictions": [{"class": c, "probability": p} for c, p in top]})
    write_predictions(out_dir, rows, min(k, trained.classifier.num_classes))
    return rows


def image_files(pattern: str | os.PathLike) -> list[Path]:
    """The files a file name, a folder (its image files, recursively) or a glob pattern names, sorted."""
    import glob

    from torchvision.datasets.folder import IMG_EXTENSIONS

    path = Path(os.path.expanduser(str(pattern)))
    if path.is_file():
        return [path]
    if path.is_dir():
        found: Iterable[Path] = (p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    else:
        found = (Path(p) for p in glob.glob(str(path), recursive=True))
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def unreadable_images(paths: Sequence[Path]) -> list[str]:
    """'path (why)' for each file PIL cannot decode, so a prediction run names every bad file before any work."""
    bad = []
    for path in paths:
        try:
            open_rgb(path)
        except DataError as error:
            bad.append(f"{path} ({' '.join(str(error.__cause__ or error).split())[:200]})")
    return bad
