"""What the model tests share: a tiny Perceiver's settings, a parameter count, and moving patches around."""

from __future__ import annotations

import torch

TINY = dict(
    image_size=8,
    patch_size=2,
    num_classes=5,
    latent_dim=6,
    projection_dim=16,
    num_heads=2,
    num_transformer_blocks=2,
    num_iterations=3,
)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def permute_patches(images: torch.Tensor, patch_size: int, order: torch.Tensor) -> torch.Tensor:
    """Move whole patches around the image: patch k of the result is patch order[k] of the input."""
    grid = images.shape[-1] // patch_size
    out = torch.empty_like(images)
    for k, source in enumerate(order.tolist()):
        r, q = divmod(k, grid)
        sr, sq = divmod(source, grid)
        out[..., r * patch_size : (r + 1) * patch_size, q * patch_size : (q + 1) * patch_size] = images[
            ..., sr * patch_size : (sr + 1) * patch_size, sq * patch_size : (sq + 1) * patch_size
        ]
    return out
