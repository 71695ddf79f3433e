"""Shared layers: dropout and attention for the training step, made cheap on the CPU without changing the math.

Measured on a 2-core CPU (docs/benchmarks.md): `torch.bernoulli_` draws one 32-bit number per element from
a serial generator, and was about a quarter of a training step at the benchmark's small setting; attention
dropout also keeps `scaled_dot_product_attention` off its fused kernels and on a path that spends time on
masking checks. Here a mask element is one 16-bit slice of a full-range 64-bit random word (four per draw),
compared with a threshold: a Bernoulli(1 - p') keep with p' = round(p * 2^16) / 2^16, within 2^-17 of p, from
the same seeded generator. The generator's time is most of a mask's; 16-bit slices halve it against 32-bit ones.
On CUDA the fused kernels are already fast, so these functions hand over to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT64_MIN = -(2**63)
MAX_MASKED_P = 1.0 - 2**-16  # above it the 16-bit threshold leaves int16's range: F.dropout draws those


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A {0, 1/(1-p)} mask: each element is kept with probability 1 - p (to within 2^-17), then rescaled."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(INT64_MIN, None)
    uniform16 = words.view(torch.int16)[:count].view(shape)  # four independent uniform int16 per word
    threshold = -(2**15) + round(p * 2**16)  # P(uniform16 >= threshold) = 1 - round(p * 2^16) / 2^16
    mask = torch.empty(shape, dtype=dtype, device=device)
    torch.ge(uniform16, threshold, out=mask)  # written as `dtype` at once: through a bool tensor it costs 5x
    return mask.mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout` with the same distribution; cheaper masks on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p > MAX_MASKED_P:
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.dtype, x.device)  # autograd keeps only the mask: the gradient is grad * mask


class Dropout(torch.nn.Dropout):
    """`nn.Dropout` (same arguments, same state dict) drawing its masks with `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """softmax(scale q k^T) v over the last two axes, with dropout on the attention weights.

    Without dropout, or off the CPU, this is `scaled_dot_product_attention` (fused kernels). With dropout on
    the CPU it is spelled out: two batched matmuls, a softmax and `dropout`, which skips SDPA's masking
    checks and its slower masks.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if scale != 1.0:
        q = q * scale  # scaling q (L x d) is cheaper than scaling the scores (L x S)
    weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return dropout(weights, dropout_p, training=True) @ v
