"""A classifier as a file other runtimes run: ONNX or a `torch.export` program, from uint8 images to logits with
the normalisation and resizing inside; and a check that a written file gives the classifier's logits."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from perceiver.inference.classifier import Classifier

EXPORT_FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}


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
    metadata = {key: json.dumps(value) for key, value in module.metadata().items()}
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
