"""How much arithmetic a training step does, and how much the machine could do: model FLOP utilisation.

The counts are analytic (matrix products only, 2 FLOPs per multiply-add, as `torch.utils.flop_counter`
counts them) and follow what the code computes: the data array's keys and values are computed once per
cross-attention module, the first cross-attention's queries once per batch (the latents are shared). The
backward pass of a product costs two products (input and weight gradients), except the first projection,
whose input (the images) needs no gradient. tests/test_flops.py checks these counts against the counter.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from perceiver.model import Perceiver
from perceiver.vit import ViT


def linear_shape(layer: nn.Linear) -> tuple[int, int]:
    return layer.in_features, layer.out_features


def perceiver_forward_flops(model: Perceiver, batch_size: int) -> tuple[int, int]:
    """(FLOPs of the forward pass of one batch, of which the image projection's)."""
    m = model.encoder.num_patches
    n, d = model.latents.shape
    patch_dim, _ = linear_shape(model.encoder.projection)
    projection = m * patch_dim * d
    keys_values = len(set(model.cross_index)) * m * d * 2 * d  # computed once per cross-attention module
    per_image = keys_values
    shared = 0  # the latents' queries before the first iteration are the same for every image
    for step, (c, t) in enumerate(zip(model.cross_index, model.latent_index, strict=True)):
        cross = model.cross_attends[c]
        queries = n * d * d
        if step == 0:
            shared += queries
        else:
            per_image += queries
        ffn_hidden = cross.ffn[0].out_features
        per_image += 2 * n * m * d + 2 * n * d * ffn_hidden  # scores and weighted sum; feed-forward
        for block in model.latent_transformers[t]:
            _, qkv_width = linear_shape(block.attention.qkv)
            inner = qkv_width // 3  # heads x key_dim
            hidden = block.ffn[0].out_features
            per_image += n * d * qkv_width + 2 * n * n * inner + n * inner * d + 2 * n * d * hidden
    head_in, head_hidden = linear_shape(model.head[0])
    per_image += head_in * head_hidden + head_hidden * model.head[2].out_features
    return 2 * (batch_size * (per_image + projection) + shared), 2 * batch_size * projection


def vit_forward_flops(model: ViT, batch_size: int) -> tuple[int, int]:
    """(FLOPs of timm's ViT forward pass for one batch, of which the patch embedding's)."""
    vit = model.vit
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    d = vit.embed_dim
    patch_in = vit.patch_embed.proj.weight[0].numel()
    embedding = vit.patch_embed.num_patches * patch_in * d
    per_image = 0
    for block in vit.blocks:
        per_image += tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d
        per_image += 2 * tokens * d * block.mlp.fc1.out_features
    per_image += d * vit.num_classes
    return 2 * batch_size * (per_image + embedding), 2 * batch_size * embedding


def training_flops(model: nn.Module, batch_size: int) -> int:
    """FLOPs of one training step (forward and backward) on `batch_size` images."""
    if isinstance(model, Perceiver):
        forward, first = perceiver_forward_flops(model, batch_size)
    elif isinstance(model, ViT):
        forward, first = vit_forward_flops(model, batch_size)
    else:
        raise TypeError(f"no FLOP count for {type(model).__name__}; add one to perceiver/flops.py")
    return 3 * forward - first  # backward: two products per product, one for the first (no input gradient)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s of the best square matmul timed for about `seconds`: the reference for utilisation figures.

    Measured rather than looked up, so it is this machine with this library and thread count; the size
    (2048 on a CPU, 8192 on a GPU) is large enough to reach the matmul kernels' plateau.
    """
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: thread pools, kernel selection, clocks
        torch.mm(a, b, out=out)
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - began))
    return best
