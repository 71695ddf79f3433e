"""A trained model with its input pipeline and class names: images of any size, PIL images or files in, logits or
the top-k classes out; `save_pretrained` / `from_pretrained` (safetensors, the Hugging Face Hub's convention)."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
from collections.abc import Sequence
from typing import Any, Union

import torch
from huggingface_hub import PyTorchModelHubMixin
from PIL import Image
from torch import nn

from perceiver.data import Preprocess, decode_transform, open_rgb
from perceiver.models.registry import registered_class, registered_models
from perceiver.training.state import CheckpointError

ImageLike = Union[torch.Tensor, Image.Image, str, os.PathLike]  # noqa: UP007 - a runtime alias
Images = Union[ImageLike, Sequence[ImageLike]]  # noqa: UP007


def model_class(target: object, source: object) -> type[nn.Module]:
    """The model class a `_target_` names; CheckpointError for anything that is not one of this project's models."""
    found = registered_class(target)
    if found is None:
        known = ", ".join(f"perceiver.models.{model.__name__}" for model in registered_models())
        raise CheckpointError(f"{source} holds a model of another type ({target}); this project loads {known}")
    return found


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
        self.preprocess = Preprocess(self.image_size, mean, std)
        self.card = {"model": model, "classes": self.classes, "mean": list(mean), "std": list(std)}
        self.eval()

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
        return self.model(self.preprocess(images))

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

    def metadata(self) -> dict[str, Any]:
        """What a consumer of an exported graph needs to know, as plain values (stored in its metadata)."""
        side = self.input_size
        return {
            **self.card,
            "input": f"uint8 (batch, {self.in_channels}, {side}, {side}), {self.colour_mode}, 0-255",
            "input_size": self.input_size,
            "image_size": self.image_size,
        }
