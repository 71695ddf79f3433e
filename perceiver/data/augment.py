"""Batched preprocessing and augmentation on the training device.

The Keras example's pipeline is Normalization -> Resizing(image_size) -> RandomFlip("horizontal") ->
RandomZoom(0.2, 0.2); the random layers act only in training. Here each step runs on a whole uint8
batch at once on the model's device. The stronger options follow timm: RandAugment (timm's policy, batched on
the device by `randaugment.py`, or timm's own per-image PIL version in DataLoader workers) and Mixup/CutMix
(timm's, batched, on device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from perceiver.data.randaugment import HPARAMS, DeviceRandAugment, timm_policy

RANDAUGMENT_BACKENDS = ("device", "timm")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with half-pixel centres and no antialiasing, as Keras `Resizing` does."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def random_zoom(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Keras `RandomZoom(factor, factor)`: independent height and width zooms in [1 - f, 1 + f]
    about the centre (above 1 zooms out), bilinear, with reflected borders (Keras' default fill)."""
    b = images.shape[0]
    zoom = 1.0 + factor * (2.0 * torch.rand(b, 2, device=images.device, dtype=images.dtype) - 1.0)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = zoom[:, 1]  # width
    theta[:, 1, 1] = zoom[:, 0]  # height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class Preprocess(nn.Module):
    """What every input of a trained model goes through, in training's evaluation and after it: uint8 (B, C, S, S)
    normalised with the training split's per-channel statistics (0-255 units), then resized to the model's side
    (the Keras example's inference path). Training's augmentation (`BatchAugment`) starts with it."""

    def __init__(self, image_size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, 3, 1, 1), persistent=False)
        if mean is not None and std is not None:
            self.set_statistics(mean, std)

    def set_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        channels = len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.mean.device).view(1, channels, 1, 1)
        self.std = (
            torch.tensor(std, dtype=torch.float32, device=self.std.device).view(1, channels, 1, 1).clamp_min(1e-3)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return resize(x, self.image_size)


class BatchAugment(nn.Module):
    """uint8 batches -> normalised float batches at the model's `image_size`, plus training targets.

    `set_statistics` must be called with the training split's per-channel mean/std (0-255 units)
    before use: the statistics belong to the data, the pipeline to the config. `randaugment_backend`: `timm`
    (per-image PIL in DataLoader workers, via `sample_transform`) or `device` (batched in `forward`, which
    conf/augmentation/ selects).
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        hflip: bool = True,
        zoom: float = 0.2,
        randaugment: str | None = None,
        randaugment_backend: str = "timm",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= zoom < 1.0:
            raise ValueError(f"augmentation.zoom={zoom!r} is invalid: it must be in [0, 1)")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"augmentation.label_smoothing={label_smoothing!r} is invalid: it must be in [0, 1)")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("augmentation.mixup_alpha and augmentation.cutmix_alpha must be >= 0")
        self.image_size = image_size
        self.hflip = hflip
        self.zoom = zoom
        if randaugment_backend not in RANDAUGMENT_BACKENDS:
            raise ValueError(
                f"augmentation.randaugment_backend={randaugment_backend!r} is invalid: "
                f"choose one of {', '.join(RANDAUGMENT_BACKENDS)}"
            )
        self.randaugment = randaugment
        self.randaugment_backend = randaugment_backend
        self.device_randaugment = None
        if randaugment and randaugment_backend == "device":
            self.device_randaugment = DeviceRandAugment(randaugment)
        elif randaugment:
            timm_policy(randaugment)  # a bad config string fails here, not in a DataLoader worker
        self.preprocess = Preprocess(image_size)  # what evaluation sees: normalise, then resize
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mix_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        # With Mixup the targets arrive already smoothed; otherwise the loss smooths them.
        self.loss_label_smoothing = 0.0 if self.mixup else label_smoothing

    @property
    def mixes_batches(self) -> bool:
        """Mixup/CutMix pair images within a batch, so training batches must have an even size."""
        return self.mixup is not None

    @property
    def channels(self) -> int:
        """The images' channels: as many as the statistics have (3 until they are set)."""
        return self.preprocess.mean.shape[1]

    def set_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.preprocess.set_statistics(mean, std)

    def sample_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Per-image transform for DataLoader workers (timm's RandAugment, `randaugment_backend=timm`), or None:
        batches then stay on the device-resident path."""
        if not self.randaugment or self.randaugment_backend != "timm":
            return None
        from timm.data.auto_augment import rand_augment_transform
        from torchvision.transforms.functional import pil_to_tensor, to_pil_image

        hparams = {**HPARAMS, "img_mean": HPARAMS["img_mean"][: self.channels]}  # PIL fills a grey image with one value
        transform = rand_augment_transform(self.randaugment, hparams)
        return lambda image: pil_to_tensor(transform(to_pil_image(image)))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: RandAugment (device backend, on the uint8 images), preprocess, random flip and zoom, then
        Mixup/CutMix (soft targets)."""
        if self.device_randaugment is not None:
            images = self.device_randaugment(images)
        x = self.preprocess(images)
        if self.hflip:
            x = random_hflip(x)
        if self.zoom > 0:
            x = random_zoom(x, self.zoom)
        if self.mixup is not None:
            return self.mixup(x, labels)
        return x, labels
