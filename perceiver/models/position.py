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


class PatchEncoder(nn.Module):
    """Patches -> (B, M, projection_dim) data array with the chosen position encoding.

    `learned`: a trainable embedding per patch index added after the projection (the Keras example).
    `fourier`: fixed Fourier features concatenated to each patch before the projection (the paper).
    `none`: the projection alone; the model is then invariant to the order of the patches.
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
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.position_encoding = position_encoding
        grid_size = image_size // patch_size
        self.num_patches = grid_size * grid_size
        patch_dim = patch_size * patch_size * in_channels
        self.position_embedding: nn.Embedding | None = None
        if position_encoding == "fourier":
            max_freq = float(fourier_max_freq or grid_size)
            features = fourier_features(grid_size, fourier_num_bands, max_freq)
            self.register_buffer("fourier", features, persistent=False)
            patch_dim += features.shape[-1]
        elif position_encoding == "learned":
            self.position_embedding = nn.Embedding(self.num_patches, projection_dim)
        self.projection = nn.Linear(patch_dim, projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, self.patch_size)
        if self.position_encoding == "fourier":
            fourier = self.fourier.to(patches.dtype).expand(patches.shape[0], -1, -1)
            patches = torch.cat([patches, fourier], dim=-1)
        encoded = self.projection(patches)
        if self.position_embedding is not None:
            encoded = encoded + self.position_embedding.weight
        return encoded
