"""A trained run you can use: `load_run(path)` -> a `Classifier` that takes images of any size, PIL images or files
and gives logits or the top-k classes; `save_pretrained` / `from_pretrained` (safetensors, the Hugging Face Hub's
convention) to share it; `export` to ONNX or a `torch.export` program.

A run's best.pt (`BestModel`) carries everything used here: how to build the model, its weights, the normalisation
statistics, the class names and the side S its data were decoded at. Images reach the model exactly as in training's
evaluation path: decoded to S x S as an image folder decodes its files (PIL, torchvision's Resize), then normalised
and resized to the model's side (`BatchAugment.preprocess`). Nothing here knows about configs, Hydra or W&B.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import logging.handlers
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from huggingface_hub import PyTorchModelHubMixin
from PIL import Image
from torch import nn

from perceiver.data import BatchAugment, DataError, decode_transform, open_rgb
from perceiver.models import Perceiver, ViT
from perceiver.training.checkpoint import FOLDER, load_file
from perceiver.training.device import resolve_device
from perceiver.training.state import BestModel, CheckpointError, TrainState

MODEL_FILE = "best.pt"
KNOWN_MODELS: dict[str, type[nn.Module]] = {"Perceiver": Perceiver, "ViT": ViT}  # `_target_` perceiver.models.<name>
EXPORT_FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}

ImageLike = Union[torch.Tensor, Image.Image, str, os.PathLike]  # noqa: UP007 - a runtime alias
Images = Union[ImageLike, Sequence[ImageLike]]  # noqa: UP007


def model_class(target: object, source: object) -> type[nn.Module]:
    """The model class a `_target_` names; CheckpointError for anything that is not one of this project's models."""
    module, _, name = str(target).rpartition(".")
    if not module.startswith("perceiver.models") or name not in KNOWN_MODELS:
        known = ", ".join(f"perceiver.models.{name}" for name in KNOWN_MODELS)
        raise CheckpointError(f"{source} holds a model of another type ({target}); this project loads {known}")
    return KNOWN_MODELS[name]


class Classifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="perceiver",
    pipeline_tag="image-classification",
    paper_url="https://arxiv.org/abs/2103.03206",
    tags=["perceiver", "image-classification"],
):
    """A trained model with its input pipeline and class names.

    As a module it maps uint8 images (B, C, S, S) to logits (B, num_classes), normalising and resizing inside
    as training's evaluation did: the graph `export` writes. `logits` and `predict` take any images. Its
    constructor arguments are plain values, so `save_pretrained` writes them as config.json next to
    model.safetensors and `from_pretrained` rebuilds it from the two.
    """

    def __init__(
        self,
        model: dict[str, Any],
        classes: list[str],
        mean: list[float],
        std: list[float],
        input_size: int | None = None,
    ) -> None:
        """`model`: `_target_` and constructor arguments; `classes`: names by label; `mean`/`std`: per-channel
        statistics in 0-255 units; `input_size`: the side S images are decoded to (default: the model's side)."""
        super().__init__()
        fields = dict(model)
        target = model_class(fields.pop("_target_", None), "the model config")
        self.model = target(**fields)
        if len(classes) != self.model.num_classes:
            raise ValueError(f"{len(classes)} class names for a model of {self.model.num_classes} classes")
        defaults = inspect.signature(target).parameters
        self.classes = list(classes)
        self.image_size = int(fields.get("image_size", defaults["image_size"].default))
        self.input_size = int(input_size or self.image_size)
        self.in_channels = int(fields.get("in_channels", defaults["in_channels"].default))
        self.augment = BatchAugment(self.image_size, len(classes), hflip=False, zoom=0.0)
        self.augment.set_statistics(mean, std)
        self.card = {"model": model, "classes": self.classes, "mean": list(mean), "std": list(std)}
        self.eval()

    @classmethod
    def from_model_file(cls, best: BestModel, source: object) -> Classifier:
        """A model file's classifier; CheckpointError when the file lacks its description or its weights do not fit."""
        missing = best.missing_card()
        if missing:
            raise CheckpointError(
                f"{source} lacks {', '.join(missing)}: it was written by `fit` without a model card "
                "(RunRecord.model_card); a run of train.py writes them"
            )
        model_class(best.model_config.get("_target_"), source)
        try:
            classifier = cls(best.model_config, best.classes, best.mean, best.std, best.data_image_size)
            classifier.model.load_state_dict(best.model)
        except (RuntimeError, ValueError, TypeError) as error:
            detail = " ".join(str(error).split())[:300]
            raise CheckpointError(
                f"{source}: its weights do not fit the model its config describes ({detail})"
            ) from error
        return classifier.eval()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, strict: bool = True, **kwargs: Any) -> Classifier:
        """The Hub mixin's loader, strict by default: a weight that does not fit is an error, not left random."""
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints "Loading weights from local directory"
            return super()._from_pretrained(model_id=model_id, strict=strict, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) -> logits (B, num_classes): normalise, resize to the model's side, classify."""
        return self.model(self.augment.preprocess(images))

    # ------------------------------------------------------------------ any images in

    def decode(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> uint8 (C, S, S), as an image folder decodes its files (grey for a 1-channel model)."""
        return decode_transform(self.input_size)(image.convert(self.colour_mode))

    @property
    def colour_mode(self) -> str:
        """The PIL mode images are read in: what the model was trained on."""
        return "L" if self.in_channels == 1 else "RGB"

    def as_batch(self, images: Images) -> torch.Tensor:
        """uint8 (B, C, S, S) on the CPU from a tensor (B, C, H, W) or (C, H, W), PIL images, file paths, or a list
        of any of these. Tensors at S x S are taken as they are; any other size is decoded like a file of it."""
        if isinstance(images, torch.Tensor):
            return self._tensor_batch(images)
        items = [images] if isinstance(images, str | os.PathLike | Image.Image) else list(images)
        if not items:
            raise ValueError("no images given")
        return torch.cat([self._tensor_batch(self._one_image(item)) for item in items])

    def _one_image(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, Image.Image):
            return self.decode(item)
        if isinstance(item, str | os.PathLike):
            return self.decode(open_rgb(item))
        raise TypeError(f"cannot read an image from a {type(item).__name__}: give uint8 tensors, PIL images or paths")

    def _tensor_batch(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 (0-255), got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"image tensors must be (B, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )
        if images.shape[-2:] == (self.input_size, self.input_size):
            return images.cpu()
        from torchvision.transforms.functional import to_pil_image

        return torch.stack([self.decode(to_pil_image(image.cpu())) for image in images])

    # ------------------------------------------------------------------ answers out

    @torch.inference_mode()
    def logits(self, images: Images, batch_size: int = 256) -> torch.Tensor:
        """Logits (B, num_classes), float32 on the CPU, in eval mode (the module's mode is restored after)."""
        batch = self.as_batch(images)
        was_training = self.training
        self.eval()
        try:
            chunks = [self(chunk.to(self.device)).float().cpu() for chunk in batch.split(batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks)

    def probabilities(self, images: Images, batch_size: int = 256) -> torch.Tensor:
        return self.logits(images, batch_size).softmax(dim=-1)

    def predict(self, images: Images, k: int = 5, batch_size: int = 256) -> list[list[tuple[str, float]]]:
        """The k most probable classes of each image, best first: [[(class name, probability), ...], ...]."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} is invalid: it must be a positive integer")
        top = self.probabilities(images, batch_size).topk(min(k, self.num_classes), dim=-1)
        return [
            [(self.classes[index], probability) for index, probability in zip(indices, values, strict=True)]
            for indices, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        """What a consumer of an exported graph needs to know, as plain values (stored in its metadata)."""
        side = self.input_size
        return {
            **self.card,
            "input": f"uint8 (batch, {self.in_channels}, {side}, {side}), {self.colour_mode}, 0-255",
            "input_size": self.input_size,
            "image_size": self.image_size,
        }


# ----------------------------------------------------------------------------- finding and reading a run


def model_file(path: str | os.PathLike) -> Path:
    """The model file of a run directory, a sweep job directory or a model file itself; CheckpointError saying
    what is there instead."""
    location = Path(os.path.expanduser(str(path)))
    if not location.exists():
        raise CheckpointError(
            f"{location} does not exist; give a run directory (outputs/runs/<date>/<time>), "
            f"a sweep job directory (outputs/sweeps/<name>/<job number>) or a {MODEL_FILE} file"
        )
    if location.is_file():
        return location
    if (location / MODEL_FILE).is_file():
        return location / MODEL_FILE
    jobs = sorted(p.parent.name for p in location.glob(f"*/{MODEL_FILE}"))
    if jobs:
        listed = ", ".join(str(location / job) for job in jobs[:5]) + (" ..." if len(jobs) > 5 else "")
        raise CheckpointError(f"{location} is a sweep directory of {len(jobs)} jobs; give one of them: {listed}")
    has_checkpoints = (location / FOLDER).is_dir() or (location / "last.pt").exists()
    why = "it has resumable checkpoints but no finished epoch's best weights" if has_checkpoints else "nothing saved"
    raise CheckpointError(
        f"{location} holds no {MODEL_FILE} ({why}); was it run with trainer.save_checkpoints=false, or is it "
        "not a run directory?"
    )


def read_model_file(path: Path) -> BestModel:
    """A model file's contents; CheckpointError for a damaged file, a resumable checkpoint or another program's."""
    state = load_file(path)
    if isinstance(state, dict) and state.get("format") == TrainState.FORMAT:
        raise CheckpointError(
            f"{path} is a resumable checkpoint, not a model file; give its run directory, or its {MODEL_FILE}"
        )
    if not isinstance(state, dict) or state.get("format") != BestModel.FORMAT:
        what = "a plain state dict or another program's checkpoint" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not {BestModel.WHAT} (it holds {what}); give a run's {MODEL_FILE}")
    return BestModel.from_dict(state, path)


def is_pretrained_folder(path: Path) -> bool:
    """A folder `save_pretrained` wrote (config.json + model.safetensors)."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_run(path: str | os.PathLike, device: str | torch.device = "auto") -> Classifier:
    """The classifier a run trained, ready to use: `path` is a run directory, a sweep job directory, a model file
    (best.pt) or a folder `save_pretrained` wrote. `device`: auto (CUDA when present), cpu, cuda, cuda:N.

    >>> classifier = load_run("outputs/runs/2025-01-01/12-00-00")
    >>> classifier.predict(["cat.png", "dog.jpg"], k=3)  # [[(class, probability), ...], ...]
    """
    target = resolve_device(str(device))
    location = Path(os.path.expanduser(str(path)))
    if is_pretrained_folder(location):
        return Classifier.from_pretrained(location, map_location=str(target))
    file = model_file(location)
    return Classifier.from_model_file(read_model_file(file), file).to(target)


# ----------------------------------------------------------------------------- export


def export(classifier: Classifier, path: str | os.PathLike, format: str = "onnx") -> Path:
    """Write the classifier as a graph from uint8 images (batch, C, S, S), any batch size, to logits, with the
    normalisation and resizing inside: `onnx` (onnxruntime and other runtimes; needs the `export` extra) or
    `torch_export` (a `torch.export` program, `torch.export.load(path).module()(images)`). The class names and
    input description travel in the file's metadata."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is invalid: choose one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = classifier.cpu().eval()
    example = torch.zeros(2, module.in_channels, module.input_size, module.input_size, dtype=torch.uint8)
    dynamic = {"images": {0: torch.export.Dim("batch")}}
    metadata = {key: json.dumps(value) for key, value in module.describe().items()}
    if format == "onnx":
        _export_onnx(module, example, dynamic, metadata, path)
    else:
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
        torch.export.save(program, path, extra_files={f"{key}.json": value for key, value in metadata.items()})
    return path


@contextlib.contextmanager
def warnings_once(*names: str) -> Iterator[None]:
    """The named loggers (and theirs below) at WARNING while the block runs, and each distinct message passed
    on once when it ends: the exporter logs a line per graph rewrite, and the same warning for every node it
    cannot fold (one per LayerNorm)."""
    kept = logging.handlers.BufferingHandler(capacity=1 << 20)
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.addHandler(kept)
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(kept)
            logger.setLevel(level)
            logger.propagate = propagate
        seen = set()
        for record in kept.buffer:
            if record.getMessage() not in seen:
                seen.add(record.getMessage())
                logging.getLogger(record.name).handle(record)


def _export_onnx(module: nn.Module, example: torch.Tensor, dynamic: dict, metadata: dict[str, str], path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - the exporter (dynamo=True) needs it
    except ImportError as error:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install -e '.[export]'") from error
    with warnings_once("onnxscript", "onnx_ir"):
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
        )
    program.model.metadata_props.update(metadata)
    program.save(str(path))


def check_export(classifier: Classifier, path: str | os.PathLike, format: str, batch: int = 3) -> float:
    """The largest |difference| between an exported file's logits and the classifier's, on seeded random images
    (`format`: onnx through onnxruntime, torch_export, or safetensors for a save_pretrained folder)."""
    side, channels = classifier.input_size, classifier.in_channels
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8, generator=generator)
    expected = classifier.logits(images)
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError("checking an ONNX file needs onnxruntime: pip install -e '.[export]'") from error
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        found = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    elif format == "torch_export":
        with torch.no_grad():
            found = torch.export.load(str(path)).module()(images)
    else:
        found = Classifier.from_pretrained(path).logits(images)
    return float((found.float() - expected).abs().max())


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
