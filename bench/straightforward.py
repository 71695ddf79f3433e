"""The Perceiver as a straightforward PyTorch port of the Keras example would write it: the baseline that
shows what `perceiver/models/perceiver.py`'s optimisations buy, and the reference that they do not change the math.

Same parameters (it subclasses `Perceiver`, so state dicts are interchangeable), spelled out plainly:
`F.dropout`, `F.scaled_dot_product_attention` with its own attention dropout, separate key and value
projections, and the data array's LayerNorm, keys and values recomputed in every iteration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perceiver.models.perceiver import CrossAttention, LatentBlock, Perceiver, merge_heads, split_heads


def feed_forward(ffn: nn.Sequential, x: torch.Tensor, training: bool) -> torch.Tensor:
    dense1, _, dense2, dropout = ffn
    return F.dropout(dense2(F.gelu(dense1(x))), dropout.p, training)


def cross_attend(module: CrossAttention, latents: torch.Tensor, data: torch.Tensor, training: bool) -> torch.Tensor:
    latents, data = module.latent_norm(latents), module.data_norm(data)
    q = (module.to_q(latents) * module.score_scale).expand(data.shape[0], -1, -1)
    q, k, v = (split_heads(t, module.num_heads) for t in (q, module.to_k(data), module.to_v(data)))
    p = module.attention_dropout_rate if training else 0.0
    x = module.ffn_norm(merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=1.0)) + latents)
    return feed_forward(module.ffn, x, training) + x


def latent_block(block: LatentBlock, x: torch.Tensor, training: bool) -> torch.Tensor:
    attention = block.attention
    q, k, v = (split_heads(t, attention.num_heads) for t in attention.qkv(block.attention_norm(x)).chunk(3, -1))
    p = attention.attention_dropout_rate if training else 0.0
    x = x + attention.out(merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p)))
    return x + feed_forward(block.ffn, block.ffn_norm(x), training)


class StraightforwardPerceiver(Perceiver):
    """`Perceiver` with the plain forward pass above."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        data = self.encoder(images)
        if self.permutation is not None:
            data = self.permutation(data)
        latents = self.latents.unsqueeze(0)
        for cross, latent in zip(self.cross_index, self.latent_index, strict=True):
            latents = cross_attend(self.cross_attends[cross], latents, data, self.training)
            for block in self.latent_transformers[latent]:
                latents = latent_block(block, latents, self.training)
        return latents

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return feed_forward(self.head, self.forward_features(images).mean(dim=1), self.training)
