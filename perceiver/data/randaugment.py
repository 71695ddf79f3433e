"""RandAugment on whole uint8 batches on the training device: every image draws its own operations and magnitudes,
as timm's per-image PIL version does, without leaving the device or needing DataLoader workers.

The policy (which operations, how many layers, their probability, magnitude and its noise) is parsed by timm itself
from the same config string (`rand-m9-mstd0.5`), so both backends draw from one list. Per image and layer:
an operation chosen uniformly (timm: with replacement; weighted policies without), applied with the operation's
probability, at a magnitude drawn from N(m, mstd) clipped to [0, 10] (or `mmax`), mapped to the operation's
argument by timm's formulas (sign flipped with probability 1/2 for the symmetric ones).

Each operation is written for a batch with one argument per image and checked against torchvision's
`transforms.v2.functional` on single images (tests/data/test_randaugment.py). Two differences from timm's PIL path:
geometric operations interpolate bilinearly (timm picks bilinear or bicubic at random), and colour operations
follow torchvision's uint8 arithmetic (PIL's ImageEnhance rounds slightly differently).

Why not kornia's `augmentation.auto.RandAugment`: it draws one set of operations per batch, not per image, with a
fixed magnitude and ranges of its own (translate 10% against timm's 45%, posterize 4-8 bits against 0-4), so it is
another recipe than the paper's timm one, and a dependency (kornia, kornia-rs) for a few hundred lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LEVEL_DENOM = 10.0  # timm's magnitude scale: m=10 is an operation's full strength
HPARAMS = {"translate_const": 10, "img_mean": (124, 116, 104)}  # timm hparams, shared by both backends


@dataclass(frozen=True)
class Policy:
    """What timm's `rand_augment_transform(config)` draws from, as plain values."""

    names: tuple[str, ...]
    probs: tuple[float, ...]  # each operation's probability of being applied once chosen
    magnitude: float
    magnitude_std: float  # 0: fixed; inf: uniform in [0, magnitude]; else normal noise
    magnitude_max: float
    num_layers: int
    choice_weights: tuple[float, ...] | None  # None: uniform choice with replacement; else weighted, without
    translate_pct: float
    translate_const: float
    fill: tuple[int, ...]


def timm_policy(config: str, hparams: dict | None = None) -> Policy:
    """Parse a timm RandAugment string with timm, so the device backend draws exactly timm's operations."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = dict(HPARAMS if hparams is None else hparams)
    try:
        transform = rand_augment_transform(config, dict(hparams))
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise ValueError(
            f"randaugment={config!r} is invalid: a timm RandAugment string such as rand-m9-mstd0.5 ({error})"
        ) from error
    ops = transform.ops
    std = ops[0].magnitude_std
    weights = transform.choice_weights
    return Policy(
        names=tuple(op.name for op in ops),
        probs=tuple(float(op.prob) for op in ops),
        magnitude=float(ops[0].magnitude),
        magnitude_std=float(std),
        magnitude_max=float(ops[0].magnitude_max or LEVEL_DENOM),
        num_layers=transform.num_layers,
        choice_weights=None if weights is None else tuple(float(w) for w in weights),
        translate_pct=float(hparams.get("translate_pct", 0.45)),
        translate_const=float(hparams.get("translate_const", 250)),
        fill=tuple(hparams.get("img_mean", (128, 128, 128))),
    )


# ----------------------------------------------------------------------------- operations on uint8 batches


def _factor(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image blend ratio r and 1 - r as float32 (B, 1, 1, 1), each rounded once from double as torchvision's
    Python-float arguments are."""
    r = values.double().view(-1, 1, 1, 1)
    return r.float(), (1.0 - r).float()


def _blend(images: torch.Tensor, other: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` with a ratio per image: r * image + (1 - r) * other, clamped, truncated to uint8."""
    ratio, rest = _factor(values)
    blended = torch.addcmul(images.float().mul_(ratio), other, rest)  # one fused a + b * c, as add_(alpha=) rounds
    return blended.clamp_(0, 255).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, floored, (B, 1, H, W) float: torchvision's for uint8 images (a grey image is its own)."""
    if images.shape[-3] == 1:
        return images.float()
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.float().mul(_factor(factor)[0]).clamp_(0, 255).to(torch.uint8)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the image's grey version (PIL ImageEnhance.Color)."""
    return _blend(images, _grayscale(images), factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grey level of each image."""
    return _blend(images, _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend the inner pixels with a 3x3 smoothing (1s around a 5, / 13); the border is left as it is."""
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    channels = images.shape[-3]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13.0
    out = images.float()
    blurred = F.conv2d(out, kernel.expand(channels, 1, 3, 3), groups=channels).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred.sub_(inner), _factor(factor)[1])
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the `bits` most significant bits of every value (8 or more: unchanged)."""
    bits = bits.long().clamp(0, 8).view(-1, 1, 1, 1)
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
    return images & mask


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every value at or above the threshold (256: nothing)."""
    return torch.where(images >= threshold.view(-1, 1, 1, 1), 255 - images, images)


def solarize_add(images: torch.Tensor, add: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """timm's SolarizeAdd: add to every value below the threshold, saturating at 255."""
    added = (images.int() + add.int().view(-1, 1, 1, 1)).clamp_(max=255).to(torch.uint8)
    return torch.where(images < threshold, added, images)


def auto_contrast(images: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.autocontrast(images)  # batched already: per image and channel


def equalize(images: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(images)  # batched already: a histogram per image and channel


def invert(images: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return images.bitwise_not()


def affine(images: torch.Tensor, matrix: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """Sample every image through its own inverse affine map (B, 2, 3), in pixel units about the image centre
    (output pixel -> input pixel, as torchvision's `_get_inverse_affine_matrix`), bilinearly; what falls outside
    the image becomes `fill`. torchvision's tensor path, with one grid per image."""
    b, c, h, w = images.shape
    device = images.device
    base = torch.empty(1, h, w, 3, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze(-1))
    base[..., 2].fill_(1)
    theta = matrix.float().transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=device)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(theta).view(b, h, w, 2)
    with_mask = torch.cat([images.float(), torch.ones(b, 1, h, w, device=device)], dim=1)
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pixels, mask = sampled[:, :c], sampled[:, c:]
    fill_value = torch.tensor(fill, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return pixels.sub_(fill_value).mul_(mask).add_(fill_value).round_().to(torch.uint8)


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2)


def rotation_matrix(degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise about the centre (PIL's `rotate`, torchvision's `rotate`)."""
    rot = -torch.deg2rad(degrees.double())
    zero = torch.zeros_like(rot)
    return _matrices(torch.cos(rot), torch.sin(rot), zero, -torch.sin(rot), torch.cos(rot), zero)


def shear_matrix(factor: torch.Tensor, axis: str, height: int, width: int) -> torch.Tensor:
    """PIL's affine (1, f, 0, 0, 1, 0) (x) or (1, 0, 0, f, 1, 0) (y): sheared about the top-left corner."""
    f = factor.double()
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    if axis == "x":
        return _matrices(one, f, f * height / 2, zero, one, zero)
    return _matrices(one, zero, zero, f, one, f * width / 2)


def translation_matrix(pixels: torch.Tensor, axis: str) -> torch.Tensor:
    """PIL's affine (1, 0, p, 0, 1, 0): the content moves by -p pixels along the axis."""
    p = pixels.double()
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    if axis == "x":
        return _matrices(one, zero, p, zero, one, zero)
    return _matrices(one, zero, zero, zero, one, p)


# ----------------------------------------------------------------------------- timm's operations


def _signed(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return torch.where(sign, -level, level)


def _enhance(m: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return m / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (1.0 + _signed(m / LEVEL_DENOM * 0.9, sign)).clamp(min=0.1)


def _posterize_bits(m: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return torch.floor(m / LEVEL_DENOM * 4)


def _solarize_threshold(m: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return torch.floor(m / LEVEL_DENOM * 256).clamp(max=256)


@dataclass(frozen=True)
class Operation:
    """A timm operation name as a batched function: `level(magnitude, negate)` is timm's level-to-argument
    formula; `apply(images, argument, policy)` the operation."""

    level: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    apply: Callable[[torch.Tensor, torch.Tensor, Policy], torch.Tensor]


def _geometric(make: Callable[[torch.Tensor, int, int, Policy], torch.Tensor]) -> Callable:
    def apply(images: torch.Tensor, argument: torch.Tensor, policy: Policy) -> torch.Tensor:
        h, w = images.shape[-2:]
        return affine(images, make(argument, h, w, policy), policy.fill[: images.shape[1]])

    return apply


def _plain(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    return lambda images, argument, policy: function(images, argument)


OPERATIONS: dict[str, Operation] = {
    "AutoContrast": Operation(None, _plain(auto_contrast)),
    "Equalize": Operation(None, _plain(equalize)),
    "Invert": Operation(None, _plain(invert)),
    "Rotate": Operation(
        lambda m, s: _signed(m / LEVEL_DENOM * 30.0, s), _geometric(lambda a, h, w, p: rotation_matrix(a))
    ),
    "Posterize": Operation(_posterize_bits, _plain(posterize)),
    "PosterizeIncreasing": Operation(lambda m, s: 4 - _posterize_bits(m, s), _plain(posterize)),
    "PosterizeOriginal": Operation(lambda m, s: _posterize_bits(m, s) + 4, _plain(posterize)),
    "Solarize": Operation(_solarize_threshold, _plain(solarize)),
    "SolarizeIncreasing": Operation(lambda m, s: 256 - _solarize_threshold(m, s), _plain(solarize)),
    "SolarizeAdd": Operation(lambda m, s: torch.floor(m / LEVEL_DENOM * 110).clamp(max=128), _plain(solarize_add)),
    "Color": Operation(_enhance, _plain(color)),
    "ColorIncreasing": Operation(_enhance_increasing, _plain(color)),
    "Contrast": Operation(_enhance, _plain(contrast)),
    "ContrastIncreasing": Operation(_enhance_increasing, _plain(contrast)),
    "Brightness": Operation(_enhance, _plain(brightness)),
    "BrightnessIncreasing": Operation(_enhance_increasing, _plain(brightness)),
    "Sharpness": Operation(_enhance, _plain(sharpness)),
    "SharpnessIncreasing": Operation(_enhance_increasing, _plain(sharpness)),
    "ShearX": Operation(
        lambda m, s: _signed(m / LEVEL_DENOM * 0.3, s), _geometric(lambda f, h, w, p: shear_matrix(f, "x", h, w))
    ),
    "ShearY": Operation(
        lambda m, s: _signed(m / LEVEL_DENOM * 0.3, s), _geometric(lambda f, h, w, p: shear_matrix(f, "y", h, w))
    ),
    "TranslateX": Operation(None, _geometric(lambda px, h, w, p: translation_matrix(px, "x"))),
    "TranslateY": Operation(None, _geometric(lambda px, h, w, p: translation_matrix(px, "y"))),
    "TranslateXRel": Operation(None, _geometric(lambda pct, h, w, p: translation_matrix(pct * w, "x"))),
    "TranslateYRel": Operation(None, _geometric(lambda pct, h, w, p: translation_matrix(pct * h, "y"))),
}


def level_argument(name: str, magnitude: torch.Tensor, negate: torch.Tensor, policy: Policy) -> torch.Tensor:
    """timm's LEVEL_TO_ARG for `name`, per image (translations need the policy's constants)."""
    if name in ("TranslateX", "TranslateY"):
        return _signed(magnitude / LEVEL_DENOM * policy.translate_const, negate)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(magnitude / LEVEL_DENOM * policy.translate_pct, negate)
    level = OPERATIONS[name].level
    return level(magnitude, negate) if level is not None else magnitude


@dataclass
class Draw:
    """One batch's random choices, per image (rows) and layer (columns)."""

    operation: torch.Tensor  # index into the policy's names
    applied: torch.Tensor  # bool: the operation's probability came up
    magnitude: torch.Tensor  # float64, clipped
    negate: torch.Tensor  # bool: the sign of a symmetric operation's argument


class DeviceRandAugment(nn.Module):
    """timm's RandAugment policy for uint8 (B, C, H, W) batches, on the batch's device.

    Each layer costs one host sync (the number of images per operation), whatever the batch size.
    """

    def __init__(self, config: str, hparams: dict | None = None) -> None:
        super().__init__()
        self.config = config
        self.policy = timm_policy(config, hparams)
        unsupported = sorted(set(self.policy.names) - set(OPERATIONS))
        if unsupported:
            raise ValueError(
                f"randaugment={config!r} uses {', '.join(unsupported)}, which the device backend does not have: "
                "set augmentation.randaugment_backend=timm"
            )

    def draw(self, batch_size: int, device: torch.device) -> Draw:
        """The operations, whether each applies, magnitudes and signs: timm's draws, for a whole batch at once."""
        p, shape = self.policy, (batch_size, self.policy.num_layers)
        if p.choice_weights is None:
            operation = torch.randint(len(p.names), shape, device=device)
        else:
            weights = torch.tensor(p.choice_weights, device=device).expand(batch_size, -1)
            operation = torch.multinomial(weights, p.num_layers, replacement=False)
        applied = torch.rand(shape, device=device) < torch.tensor(p.probs, device=device)[operation]
        magnitude = torch.full(shape, p.magnitude, dtype=torch.float64, device=device)
        if math.isinf(p.magnitude_std):
            magnitude = magnitude * torch.rand(shape, dtype=torch.float64, device=device)
        elif p.magnitude_std > 0:
            magnitude = magnitude + p.magnitude_std * torch.randn(shape, dtype=torch.float64, device=device)
        negate = torch.rand(shape, device=device) < 0.5
        return Draw(operation, applied, magnitude.clamp(0.0, p.magnitude_max), negate)

    def apply(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Run the drawn operations, layer by layer: images sorted by operation, each group in one call."""
        skip = len(self.policy.names)
        for layer in range(self.policy.num_layers):
            code = torch.where(draw.applied[:, layer], draw.operation[:, layer], skip)
            order = torch.argsort(code, stable=True)
            counts = torch.bincount(code, minlength=skip + 1).tolist()  # the layer's one host sync
            groups = list(images[order].split(counts))
            magnitude, negate = draw.magnitude[order, layer].split(counts), draw.negate[order, layer].split(counts)
            for index, name in enumerate(self.policy.names):
                if counts[index]:
                    argument = level_argument(name, magnitude[index], negate[index], self.policy)
                    groups[index] = OPERATIONS[name].apply(groups[index], argument, self.policy)
            images = torch.empty_like(images).index_copy_(0, order, torch.cat(groups))
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"RandAugment works on uint8 images, got {images.dtype}")
        return self.apply(images, self.draw(images.shape[0], images.device))

    def extra_repr(self) -> str:
        return f"{self.config!r}: {self.policy.num_layers} of {len(self.policy.names)} operations per image"
