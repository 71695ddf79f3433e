"""One fixed random permutation of the inputs: the Perceiver paper's permutation ablation (Table 2).

The same permutation must reach every image, every epoch, every process and every device, so it is
drawn once from a `torch.Generator` seeded by `seed` (not from the global RNG, which training
advances) and kept as a persistent buffer: it moves with `.to(device)` and is saved in checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver.models import checks


class FixedPermutation(nn.Module):
    """Reorders `length` positions of a tensor along one axis by a permutation fixed by `seed`."""

    index: torch.Tensor

    def __init__(self, length: int, seed: int = 0) -> None:
        super().__init__()
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"length={length!r} is invalid: it must be a positive integer")
        check_permutation_arguments(True, seed)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("index", torch.randperm(length, generator=generator))

    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Permute axis `dim` (the token axis of (B, M, D) by default): output[..., i, ...] = x[..., index[i], ...]."""
        if x.shape[dim] != self.index.numel():
            raise ValueError(
                f"axis {dim} of shape {tuple(x.shape)} has not the permutation's {self.index.numel()} positions"
            )
        return x.index_select(dim, self.index)

    def undo(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The inverse: undo(self(x)) == x; raw[..., j] of axis `dim` moves back to grid position index[j]."""
        return x.index_select(dim, torch.argsort(self.index))

    def permute_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) with pixels moved: each pixel keeps its channels together, and
        every image in the batch gets the same shuffle (the permutation has length H * W)."""
        return self(images.flatten(2), dim=2).view_as(images)

    def extra_repr(self) -> str:
        return f"length={self.index.numel()}, seed={self.seed}"


def check_permutation_arguments(permute_inputs: object, permutation_seed: object) -> None:
    """Reject non-boolean switches and seeds a `torch.Generator` cannot take, naming the argument."""
    checks.booleans({"permute_inputs": permute_inputs}, ("permute_inputs",))
    seed = permutation_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"permutation_seed={seed!r} is invalid: it must be an integer that fits in 64 bits")
