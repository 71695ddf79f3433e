"""Multi-head self-attention computed through the products of its weights: the same function with fewer FLOPs
when each head is about as wide as the model (the Keras example: 8 heads of 256 over 256 channels).

With `nn.Linear` weights A (out x in), x the (L x D) input, and the 1/sqrt(d) scale folded into A_q, head h
computes

    scores_h = (x A_q,h^T + b_q,h)(x A_k,h^T + b_k,h)^T
             = (x W_qk,h + r_h) x^T + rows_h 1^T,      W_qk,h = A_q,h^T A_k,h,  r_h = b_q,h A_k,h,
                                                     rows_h = x A_q,h^T b_k,h + b_q,h . b_k,h
    output   = sum_h P_h (x A_v,h^T + b_v,h) A_o,h^T + b_o = sum_h P_h (x W_vo,h + b_vo,h) + b_o,
                                                     W_vo,h = A_v,h^T A_o,h^T, b_vo,h = b_v,h A_o,h^T

where P_h = dropout(softmax(scores_h)). The four L x D x (H d) projections (q, k, v, output) become two
L x D x (H D) ones, and the scores and weighted sums are D wide instead of d: fewer FLOPs when d is close to D
(`saves_flops`). In real arithmetic nothing changes; in floats only the rounding does. The row term is constant
along each softmax row, so it does not change the forward pass; it is kept so that b_k gets the gradient the
unfolded form computes (zero up to rounding) rather than none, which optimizers treat differently. The weight
products cost about 2 H D^2 d FLOPs per step, whatever the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver.models import layers


def saves_flops(width: int, key_dim: int, length: int) -> bool:
    """Whether the folded form needs fewer FLOPs per token and head than the unfolded one, over `length` tokens."""
    unfolded = 4 * width * key_dim + 2 * length * key_dim  # q, k, v and output projections; scores, weighted sum
    folded = 2 * width * width + width + 2 * length * width  # the two folded projections, the row term; the same
    return folded < unfolded


def folded_projections(qkv: nn.Linear, out: nn.Linear, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(W_qk, r, row weights, row bias, W_vo, b_vo) laid out for one GEMM over all heads each: (D, H*D), (H*D,),
    (D, H), (H,), (D, H*D), (H*D,); see the module docstring."""
    width = qkv.in_features
    wq, wk, wv = qkv.weight.view(3, num_heads, -1, width).unbind(0)  # (H, d, D) each
    bq, bk, bv = qkv.bias.view(3, num_heads, -1).unbind(0)  # (H, d) each
    scale = wq.shape[1] ** -0.5
    wq, bq = wq * scale, bq * scale
    wo = out.weight.view(width, num_heads, -1).permute(1, 2, 0)  # (H, d, D): output = sum_h o_h @ wo_h
    w_qk = torch.matmul(wq.transpose(1, 2), wk)  # (H, D, D)
    r = torch.matmul(bq.unsqueeze(1), wk)  # (H, 1, D)
    row_weight = torch.matmul(wq.transpose(1, 2), bk.unsqueeze(-1))  # (H, D, 1)
    row_bias = (bq * bk).sum(-1)  # (H,)
    w_vo = torch.matmul(wv.transpose(1, 2), wo)  # (H, D, D)
    b_vo = torch.matmul(bv.unsqueeze(1), wo)  # (H, 1, D)
    return (
        heads_side_by_side(w_qk),
        r.reshape(-1),
        row_weight.squeeze(-1).t(),
        row_bias,
        heads_side_by_side(w_vo),
        b_vo.reshape(-1),
    )


def heads_side_by_side(weights: torch.Tensor) -> torch.Tensor:
    """(H, D, D) -> (D, H*D): x @ result puts head h's product in columns h*D ... (h+1)*D - 1."""
    heads, rows, cols = weights.shape
    return weights.transpose(0, 1).reshape(rows, heads * cols)


def self_attention(
    x: torch.Tensor, qkv: nn.Linear, out: nn.Linear, num_heads: int, dropout_p: float, training: bool
) -> torch.Tensor:
    """Keras `MultiHeadAttention(x, x)` with the weights of `qkv` (q, k, v stacked) and `out`, folded.

    The scores are laid out (B, L, H, L), which lets one GEMM per image form them for every head and one more
    sum the heads' weighted values; the dropout mask is drawn in the unfolded (B, H, L, L) order, so a seed
    drops the same attention weights in both forms.
    """
    batch, length, width = x.shape
    w_qk, r, row_weight, row_bias, w_vo, b_vo = folded_projections(qkv, out, num_heads)
    flat = x.reshape(batch * length, width)
    queries = torch.addmm(r, flat, w_qk).view(batch, length * num_heads, width)  # [b, l, h, :]
    rows = torch.addmm(row_bias, flat, row_weight).view(batch, length * num_heads, 1)
    scores = torch.baddbmm(rows, queries, x.transpose(1, 2))  # (B, L*H, L)
    weights = torch.softmax(scores, dim=-1).view(batch, length, num_heads, length).transpose(1, 2)
    weights = layers.dropout(weights, dropout_p, training).transpose(1, 2).reshape(batch, length, num_heads * length)
    values = torch.addmm(b_vo, flat, w_vo).view(batch, length, num_heads, width)
    values = values.transpose(1, 2).reshape(batch, num_heads * length, width)  # [b, h, j, :]
    return torch.baddbmm(out.bias, weights, values)  # sums the heads' weighted values in one product
