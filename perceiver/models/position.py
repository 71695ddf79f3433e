"""Patches and their position encodings: how an image becomes the Perceiver's data array."""

from __future__ import annotations

import math

import torch
from torch import nn

POSITION_ENCODINGS = ("learned", "fourier", "none")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, M, p*p*C), patches in row-major order, each flattened as (row, col, channel).

    The (row, col, channel) order is the one of `tf.image.extract_patches` in the Keras example, so a
    projection's weights mean the same thing in both.
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # B, rows, cols, p, p, C
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def fourier_features(grid_size: int, num_bands: int, max_freq: float) -> torch.Tensor:
    """Sine/cosine features of 2-D positions, as in Perceiver (Jaegle et al., 2021, Sec. 3.2).

    Each axis coordinate x in [-1, 1] gives [x, sin(pi f_k x), cos(pi f_k x)] for `num_bands`
    frequencies f_k spaced linearly from 1 to max_freq / 2 (max_freq is the Nyquist frequency of the
    sampling). Returns (grid_size**2, 2 * (2 * num_bands + 1)).
    """
    coords = torch.linspace(-1.0, 1.0, grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    positions = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # (M, 2)
    freqs = torch.linspace(1.0, max_freq / 2.0, num_bands, dtype=torch.float64)
    angles = math.pi * positions[..., None] * freqs  # (M, 2, bands)
    features = torch.cat([positions[..., None], angles.sin(), angles.cos()], dim=-1)
    return features.reshape(grid_size * grid_size, -1).float()


class ConvStem(nn.Sequential):
    """Two 3x3 convolutions, the second of stride 2, each followed by batch norm and GELU: local edges and textures
    computed before the image is cut into patches, at half its side. Convolutional preprocessing of this kind is
    what the Perceiver IO paper (Jaegle et al., 2021b) reports to help on ImageNet; on Fashion-MNIST it lifts the
    fast preset's accuracy per epoch (docs/recipes.md)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
        )

    def multiply_adds(self, image_size: int) -> tuple[int, int]:
        """(Multiply-adds per image of both convolutions, of the first alone) on an image_size x image_size image."""
        first, second = self[0], self[3]
        full = image_size * image_size * first.out_channels * 9 * first.in_channels
        half = (image_size // 2) ** 2 * second.out_channels * 9 * second.in_channels
        return full + half, full


class PatchEncoder(nn.Module):
    """Patches -> (B, M, projection_dim) data array with the chosen position encoding.

    `learned`: a trainable embedding per patch index added after the projection (the Keras example).
    `fourier`: fixed Fourier features concatenated to each patch before the projection (the paper).
    `none`: the projection alone; the model is then invariant to the order of the patches (without a stem, whose
    convolutions see across the patches' borders).
    With `stem_channels`, a `ConvStem` runs first and the patches are cut from its half-size feature map: the same
    grid of M patches (patch_size stays in image pixels), each of (patch_size / 2)^2 x stem_channels features.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        projection_dim: int,
        position_encoding: str = "learned",
        fourier_num_bands: int = 64,
        fourier_max_freq: float | None = None,
        stem_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size  # in image pixels, whatever the stem does
        self.position_encoding = position_encoding
        grid_size = image_size // patch_size
        self.num_patches = grid_size * grid_size
        self.stem = None if stem_channels is None else ConvStem(in_channels, stem_channels)
        self.cut = patch_size if self.stem is None else patch_size // 2  # the patch side on what is cut
        patch_dim = self.cut * self.cut * (in_channels if stem_channels is None else stem_channels)
        self.position_embedding: nn.Embedding | None = None
        if position_encoding == "fourier":
            max_freq = float(fourier_max_freq or grid_size)
            features = fourier_features(grid_size, fourier_num_bands, max_freq)
            self.register_buffer("fourier", features, persistent=False)
            patch_dim += features.shape[-1]
        elif position_encoding == "learned":
            self.position_embedding = nn.Embedding(self.num_patches, projection_dim)
        self.projection = nn.Linear(patch_dim, projection_dim)

    def multiply_adds(self) -> tuple[int, int]:
        """(Multiply-adds per image of the whole encoder, of its first layer): the first layer's input (the image)
        needs no gradient, which a training step's FLOPs account for."""
        projection = self.num_patches * self.projection.in_features * self.projection.out_features
        if self.stem is None:
            return projection, projection
        stem, first = self.stem.multiply_adds(self.image_size)
        return stem + projection, first

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            images = self.stem(images)
        patches = patchify(images, self.cut)
        if self.position_encoding == "fourier":
            fourier = self.fourier.to(patches.dtype).expand(patches.shape[0], -1, -1)
            patches = torch.cat([patches, fourier], dim=-1)
        encoded = self.projection(patches)
        if self.position_embedding is not None:
            encoded = encoded + self.position_embedding.weight
        return encoded
