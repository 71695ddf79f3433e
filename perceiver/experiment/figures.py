"""What the latents attend to: a figure in the style of the Perceiver paper's attention maps.

For a few images: the image as the model sees it, then for each cross-attend the attention of a few latents
(the most peaked, or chosen by index) upsampled from the patch grid onto the pixels, and their mean over all
latents. It works for every position encoding and patch size, including patch size 1 (pixels), and under
`permute_inputs` (the maps are put back in grid order). The panels are composed as one image and labelled with
matplotlib's object API (no pyplot, no global state, no display), so it runs in training jobs, tests and scripts
alike, in a small fraction of a second.

`draw_attention(model, augment, images, path)` is the one call: any trained Perceiver, its preprocessing, and
uint8 image tensors or image files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perceiver.data.augment import BatchAugment, resize

ImagesLike = torch.Tensor | Sequence[str | Path]


def supports_attention_maps(model: nn.Module) -> bool:
    """Only the Perceiver exposes its cross-attention weights (`attention_maps`); the ViT baseline does not."""
    return callable(getattr(model, "attention_maps", None))


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis of rows that sum to 1: low = peaked (attends to few inputs)."""
    return -(weights * weights.clamp_min(1e-30).log()).sum(-1)


def pick_latents(weights: torch.Tensor, latents: int | Sequence[int]) -> torch.Tensor:
    """(B, N, M) weights -> (B, K) latent indices: the K most peaked of each image (lowest entropy; ties to the
    lower index), or the given indices for every image."""
    batch, count = weights.shape[:2]
    if isinstance(latents, int):
        if latents < 0:
            raise ValueError(f"latents={latents} is invalid: a number of latents >= 0, or a list of indices")
        order = torch.sort(entropy(weights), dim=1, stable=True).indices
        return order[:, : min(latents, count)]
    chosen = list(latents)
    bad = [index for index in chosen if not 0 <= index < count]
    if bad:
        raise ValueError(f"latent indices {bad} are out of range: the model has {count} latents (0..{count - 1})")
    return torch.tensor(chosen, dtype=torch.long).expand(batch, -1)


def upsample(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., M) weights over a square patch grid -> (..., g*p, g*p): each patch's weight on each of its pixels."""
    grid = math.isqrt(maps.shape[-1])
    if grid * grid != maps.shape[-1]:
        raise ValueError(f"{maps.shape[-1]} inputs do not form a square patch grid")
    square = maps.reshape(*maps.shape[:-1], grid, grid)
    return square.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


@dataclass
class AttentionPanels:
    """The figure's numbers, kept apart from the drawing so they can be checked.

    images: (B, H, W, C) in [0, 1], what the model sees before normalisation (resized to its input size).
    latents[i]: (B, K) the latents shown for cross-attend i; maps[i]: (B, K + 1, H, W) their maps and, last,
    the mean over all latents (heads averaged), on the pixel grid. Each map of cross-attend i sums to
    patch_size**2 (every patch weight covers p x p pixels). probabilities: (B, classes) softmax of the logits.
    """

    images: np.ndarray
    cross_attends: list[int]  # which cross-attends (0-based, application order) the maps belong to
    latents: list[np.ndarray]
    maps: list[np.ndarray]
    probabilities: np.ndarray


def read_images(paths: Sequence[str | Path], size: int, channels: int = 3) -> torch.Tensor:
    """Image files -> (B, channels, size, size) uint8, RGB (grey for 1 channel), resized as the image-folder source
    reads them."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                mode = "L" if channels == 1 else "RGB"
                rgb = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} could not be read as an image ({error}); pass image files") from error
        tensors.append(pil_to_tensor(rgb))
    if not tensors:
        raise ValueError("no images given: pass at least one image file or a (B, C, H, W) uint8 tensor")
    return torch.stack(tensors)


def as_uint8_batch(images: ImagesLike, size: int, channels: int = 3) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        return images
    return read_images(images, size, channels)


@torch.no_grad()
def attention_panels(
    model: nn.Module,
    augment: BatchAugment,
    images: torch.Tensor,
    latents: int | Sequence[int] = 3,
    cross_attends: Sequence[int] | None = None,
) -> AttentionPanels:
    """The maps and predictions of `images` (uint8, B x C x H x W) through the model in eval mode; the model's
    mode is restored afterwards and no random numbers are drawn (a run's resume stays exact)."""
    if not supports_attention_maps(model):
        raise TypeError(f"{type(model).__name__} has no attention_maps: only a Perceiver's attention can be drawn")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        inputs = augment.preprocess(images.to(device))
        every = model.attention_maps(inputs)
        probabilities = torch.softmax(model(inputs).float(), dim=-1)
    finally:
        model.train(was_training)
    chosen = list(range(len(every))) if cross_attends is None else list(cross_attends)
    bad = [i for i in chosen if not 0 <= i < len(every)]
    if bad:
        raise ValueError(f"cross-attends {bad} are out of range: the model has {len(every)} (0..{len(every) - 1})")
    patch = model.encoder.patch_size
    shown, maps = [], []
    for index in chosen:
        weights = every[index].float().mean(dim=1)  # (B, N, M): heads averaged
        picked = pick_latents(weights, latents).to(weights.device)
        rows = torch.gather(weights, 1, picked[..., None].expand(-1, -1, weights.shape[-1]))
        panels = torch.cat([rows, weights.mean(dim=1, keepdim=True)], dim=1)
        shown.append(picked.cpu().numpy())
        maps.append(upsample(panels, patch).cpu().numpy())
    size = maps[0].shape[-1] if maps else augment.image_size
    pictures = (resize(images.float().to(device), size) / 255.0).clamp(0, 1)  # normalising commutes with resizing
    return AttentionPanels(pictures.permute(0, 2, 3, 1).cpu().numpy(), chosen, shown, maps, probabilities.cpu().numpy())


def image_title(probabilities: np.ndarray, label: int | None, class_names: Sequence[str] | None) -> str:
    def name(index: int) -> str:
        return class_names[index] if class_names is not None and index < len(class_names) else str(index)

    predicted = int(probabilities.argmax())
    guess = f"{name(predicted)} ({probabilities[predicted]:.2f})"
    return guess if label is None else f"{name(label)} → {guess}"


PANEL_PIXELS = 128  # a panel's side in the PNG: smaller images are enlarged by a whole factor (nearest) to about it
GAP, GROUP_GAP, MARGIN = 4, 16, 8  # pixels between panels, between column groups, around the figure
LABEL_HEIGHT, HEADER_HEIGHT, TITLE_HEIGHT = 14, 18, 22  # pixels of a panel's label, a group's header, the title


def panel_pixels(picture: np.ndarray, heat: np.ndarray | None = None) -> np.ndarray:
    """One panel as (H, W, 3) RGB in [0, 1]: the image, or a map over the image in grey, each map scaled to its own
    maximum and the more opaque the more attention a pixel gets, so the image shows through where the latent does
    not look."""
    from matplotlib import colormaps

    grey = np.repeat(picture.mean(-1, keepdims=True), 3, axis=-1)
    if heat is None:
        return grey if picture.shape[-1] == 1 else picture[..., :3]
    scaled = heat / max(float(heat.max()), 1e-12)
    colour = colormaps["inferno"](scaled)[..., :3]
    alpha = (0.35 + 0.65 * scaled)[..., None]
    return alpha * colour + (1.0 - alpha) * grey


@dataclass(frozen=True)
class MosaicLayout:
    """Where each panel of the figure goes, in pixels from the top left: one row per image, one column group for
    the images and one per cross-attend."""

    panel: int  # side of a panel
    group_sizes: list[int]  # panels per column group
    rows: int
    title: bool

    @property
    def top(self) -> int:
        return MARGIN + (TITLE_HEIGHT if self.title else 0) + HEADER_HEIGHT

    def group_left(self, group: int) -> int:
        widths = [n * self.panel + (n - 1) * GAP for n in self.group_sizes]
        return MARGIN + sum(widths[:group]) + GROUP_GAP * group

    def panel_box(self, row: int, group: int, column: int) -> tuple[int, int]:
        """(left, top) of a panel."""
        left = self.group_left(group) + column * (self.panel + GAP)
        return left, self.top + row * (LABEL_HEIGHT + self.panel + GAP) + LABEL_HEIGHT

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole figure."""
        width = self.group_left(len(self.group_sizes)) - GROUP_GAP + MARGIN
        return width, self.top + self.rows * (LABEL_HEIGHT + self.panel + GAP) + MARGIN


def draw_panels(
    panels: AttentionPanels,
    path: Path,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One row per image: the image (true label → prediction), then per cross-attend its latents and mean.

    The panels are composed into one array and placed at whole pixels, with text around them: one image and a few
    dozen labels to render, instead of an axes per panel (a figure of 36 panels took about 0.7 s with axes, a
    cost paid every `trainer.attention_every_n_epochs` epochs of a run)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    batch, side = len(panels.images), panels.images.shape[1]
    per = panels.maps[0].shape[1] if panels.maps else 0
    zoom = max(1, round(PANEL_PIXELS / side))
    layout = MosaicLayout(side * zoom, [1] + [per] * len(panels.maps), batch, bool(title))
    width, height = layout.size
    mosaic = np.ones((height, width, 3))
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)

    def place(row: int, group: int, column: int, pixels: np.ndarray, label: str) -> None:
        left, top = layout.panel_box(row, group, column)
        mosaic[top : top + layout.panel, left : left + layout.panel] = pixels.repeat(zoom, 0).repeat(zoom, 1)
        write(left + layout.panel / 2, top - 3, label, "x-small")

    def write(x: float, y: float, text: str, size: str) -> None:  # (x, y): the text's bottom centre, in pixels
        figure.text(x / width, 1 - y / height, text, ha="center", va="bottom", fontsize=size)

    groups = [("image", layout.group_sizes[0])] + [(f"cross-attend {i + 1}", per) for i in panels.cross_attends]
    for group, (name, count) in enumerate(groups):
        left = layout.group_left(group)
        write(left + (count * layout.panel + (count - 1) * GAP) / 2, layout.top - 3, name, "small")
    for b in range(batch):
        label = None if labels is None else int(labels[b])
        place(b, 0, 0, panel_pixels(panels.images[b]), image_title(panels.probabilities[b], label, class_names))
        for group, (shown, maps) in enumerate(zip(panels.latents, panels.maps, strict=True), start=1):
            for k in range(per):
                name = "mean of latents" if k == per - 1 else f"latent {shown[b, k]}"
                place(b, group, k, panel_pixels(panels.images[b], maps[b, k]), name)
    if title:
        write(width / 2, MARGIN + TITLE_HEIGHT - 4, title, "medium")
    figure.figimage(np.clip(mosaic, 0, 1), 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def draw_attention(
    model: nn.Module,
    augment: BatchAugment,
    images: ImagesLike,
    path: str | Path,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    latents: int | Sequence[int] = 3,
    cross_attends: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the attention figure of `images` (a uint8 (B, C, H, W) tensor, or image files) through `model` and
    its preprocessing `augment` (with the training statistics set) into the PNG `path`; returns the path.

    `latents`: how many of the most peaked latents to show per image (lowest entropy), or their indices.
    `cross_attends`: which cross-attends to show (0-based, in application order); all by default.
    `labels` (true classes) and `class_names` title the image panels.
    """
    batch = as_uint8_batch(images, augment.image_size, augment.channels)
    panels = attention_panels(model, augment, batch, latents, cross_attends)
    return draw_panels(panels, Path(path), labels, class_names, title)
