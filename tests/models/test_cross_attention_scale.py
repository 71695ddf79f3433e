"""The cross-attention's learned score scale: where it starts, and what the start does to the attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perceiver import Perceiver
from perceiver.models.perceiver import CrossAttention

SMALL = dict(image_size=28, patch_size=4, in_channels=1, num_classes=10, latent_dim=16, projection_dim=128,
             num_heads=4, key_dim=32, num_transformer_blocks=1, num_iterations=1)  # fmt: skip


@pytest.mark.parametrize(("heads", "scale"), [(1, None), (2, None), (1, 0.5)])
def test_the_weights_are_softmax_of_scaled_q_k_computed_by_hand(heads: int, scale: float | None) -> None:
    torch.manual_seed(0)
    dim = 64
    attend = CrossAttention(dim, heads, dim, 0.0, 0.0, 1e-6, score_scale=scale).eval()
    latents, data = torch.randn(1, 5, dim), torch.randn(3, 7, dim)
    keys, _ = attend.project_data(data)
    weights = attend.attention_weights(latents, keys)
    q = F.layer_norm(latents, (dim,), eps=1e-6) @ attend.to_q.weight.T + attend.to_q.bias
    k = F.layer_norm(data, (dim,), eps=1e-6) @ attend.to_k.weight.T + attend.to_k.bias
    width = dim // heads
    expected_scale = 1 / math.sqrt(width) if scale is None else scale
    for h in range(heads):
        part = slice(h * width, (h + 1) * width)
        scores = (q[..., part] @ k[..., part].transpose(1, 2)) * expected_scale
        torch.testing.assert_close(weights[:, h], torch.softmax(scores, dim=-1), rtol=1e-5, atol=1e-6)


def test_the_default_starts_at_one_as_the_keras_example() -> None:
    model = Perceiver(**SMALL)
    assert all(module.score_scale.item() == 1.0 for module in model.cross_attends)


def entropy(model: Perceiver, images: torch.Tensor) -> float:
    weights = model.eval().attention_maps(images)[0]
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean().item()


def test_unscaled_scores_attend_to_few_inputs_at_initialisation_and_scaled_ones_spread() -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 1, 28, 28)
    uniform = math.log(49)
    unscaled = entropy(Perceiver(**SMALL), images)
    scaled = entropy(Perceiver(**SMALL, cross_attention_scale=None), images)
    assert unscaled < 0.3 * uniform < 0.7 * uniform < scaled


@pytest.mark.parametrize("value", [0, -1.0, True, "big"])
def test_a_bad_scale_is_refused_by_name(value: object) -> None:
    with pytest.raises(ValueError, match="cross_attention_scale"):
        Perceiver(**SMALL, cross_attention_scale=value)
