"""Batched preprocessing and augmentation on the training device.

The Keras example's pipeline is Normalization -> Resizing(image_size) -> RandomFlip("horizontal") ->
RandomZoom(0.2, 0.2); the random layers act only in training. Here each step runs on a whole uint8
batch at once on the model's device. The stronger options follow timm: RandAugment (timm's policy, batched on
the device by `randaugment.py`, or timm's own per-image PIL version in DataLoader workers) and Mixup/CutMix
(timm's, batched, on device). For small images there are also whole-pixel random translation (pad and random crop)
and random erasing (Zhong et al. 2017), both filling with zeros after normalisation, i.e. with the data's mean.
"""

from __future__ import annotations

import math
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


def random_translate(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by whole pixels, independently in y and x, by up to `max_shift` either way: "pad by k and
    random-crop" without interpolation. Vacated pixels are 0, which after normalisation is the data's mean."""
    b, c, height, width = images.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), device=images.device)
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    # output[i, j] = input[i - dy, j - dx] = padded[i - dy + max_shift, j - dx + max_shift]
    rows = torch.arange(height, device=images.device) + (max_shift - shift[:, :1])  # (B, H)
    cols = torch.arange(width, device=images.device) + (max_shift - shift[:, 1:])  # (B, W)
    padded = padded.gather(2, rows.view(b, 1, height, 1).expand(b, c, height, padded.shape[-1]))
    return padded.gather(3, cols.view(b, 1, 1, width).expand(b, c, height, width))


# Random erasing's ranges (Zhong et al. 2017, "Random Erasing Data Augmentation"): the rectangle covers 2% to 1/3 of
# the image, with height/width between the paper's r1 = 0.3 and 1/r1 (~3.3), drawn log-uniformly as timm does.
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_ASPECT = (0.3, 3.3)
ERASE_ATTEMPTS = 10  # the paper redraws until the rectangle fits; here the first of 10 draws that fits, else none


def erase_sizes(batch: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's rectangle height and width in whole pixels, the first of `ERASE_ATTEMPTS` draws that fits
    (0 x 0, erasing nothing, when none fits)."""
    fraction = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(batch, ERASE_ATTEMPTS, device=device)
    low, high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(low + (high - low) * torch.rand(batch, ERASE_ATTEMPTS, device=device))
    area = fraction * (height * width)
    h = torch.sqrt(area * aspect).round().long()
    w = torch.sqrt(area / aspect).round().long()
    fits = (h >= 1) & (h <= height) & (w >= 1) & (w <= width)
    first = fits.long().argmax(1, keepdim=True)
    found = fits.any(1)
    return h.gather(1, first).squeeze(1) * found, w.gather(1, first).squeeze(1) * found


def random_erase(images: torch.Tensor, prob: float) -> torch.Tensor:
    """With probability `prob` per image, set one random rectangle (all channels) to 0, the data's mean."""
    b, _, height, width = images.shape
    device = images.device
    erase = torch.rand(b, device=device) < prob
    h, w = erase_sizes(b, height, width, device)
    corner = torch.rand(b, 2, device=device)
    top = (corner[:, 0] * (height - h + 1)).long().clamp_max(height - h)
    left = (corner[:, 1] * (width - w + 1)).long().clamp_max(width - w)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]
    return images.masked_fill(mask[:, None], 0.0)


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
        translate: int = 0,
        erase_prob: float = 0.0,
        test_hflip: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= zoom < 1.0:
            raise ValueError(f"augmentation.zoom={zoom!r} is invalid: it must be in [0, 1)")
        if isinstance(translate, bool) or not isinstance(translate, int) or not 0 <= translate < image_size:
            raise ValueError(
                f"augmentation.translate={translate!r} is invalid: it must be a whole number of pixels in "
                f"[0, model.image_size) = [0, {image_size})"
            )
        if not 0.0 <= erase_prob <= 1.0:
            raise ValueError(f"augmentation.erase_prob={erase_prob!r} is invalid: it must be a probability in [0, 1]")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"augmentation.label_smoothing={label_smoothing!r} is invalid: it must be in [0, 1)")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("augmentation.mixup_alpha and augmentation.cutmix_alpha must be >= 0")
        self.image_size = image_size
        self.hflip = hflip
        self.zoom = zoom
        self.translate = translate
        self.erase_prob = erase_prob
        self.test_hflip = test_hflip  # the test evaluation classifies each image and its mirror (validation does not)
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
        """Training path: RandAugment (device backend, on the uint8 images), preprocess, random flip, zoom,
        translation and erasing, then Mixup/CutMix (soft targets)."""
        if self.device_randaugment is not None:
            images = self.device_randaugment(images)
        x = self.preprocess(images)
        if self.hflip:
            x = random_hflip(x)
        if self.zoom > 0:
            x = random_zoom(x, self.zoom)
        if self.translate > 0:
            x = random_translate(x, self.translate)
        if self.erase_prob > 0:
            x = random_erase(x, self.erase_prob)
        if self.mixup is not None:
            return self.mixup(x, labels)
        return x, labels
