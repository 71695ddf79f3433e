"""The analytic FLOP counts against torch.utils.flop_counter, which counts every matmul the code runs."""

from __future__ import annotations

import math

import pytest
import timm.layers
import torch
from torch.utils.flop_counter import FlopCounterMode

from perceiver import Perceiver, ViT
from perceiver.training.device import matmul_peak
from perceiver.training.metrics import training_flops, utilisation

SMALL = dict(image_size=16, patch_size=4, num_classes=10, latent_dim=8, projection_dim=16, num_heads=2, key_dim=8)
VARIANTS = [
    {},
    {"num_iterations": 3, "weight_sharing": "all_but_first", "num_transformer_blocks": 1},
    {"weight_sharing": "none", "cross_attention_heads": 2, "ffn_units": 24, "classifier_units": 12},
    {"position_encoding": "fourier", "fourier_num_bands": 4, "patch_size": 2, "permute_inputs": True},
    {"conv_stem": 6},
    {"conv_stem": 4, "position_encoding": "fourier", "fourier_num_bands": 2},
]


def counted(model: torch.nn.Module, images: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        if backward:
            out.square().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_perceiver_counts_equal_the_flop_counter(variant: dict, batch: int) -> None:
    # Training mode with attention dropout: attention runs as plain matmuls, which the counter sees on a CPU.
    model = Perceiver(**{**SMALL, **variant}).train()
    images = torch.randn(batch, 3, 16, 16)
    assert counted(model, images, backward=False) == model.forward_flops(batch)[0]
    assert counted(model, images, backward=True) == training_flops(model, batch)


def test_vit_counts_equal_the_flop_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)  # plain matmuls, countable on a CPU
    model = ViT(image_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2).train()
    images = torch.randn(2, 3, 16, 16)
    assert counted(model, images, backward=False) == model.forward_flops(2)[0]
    assert counted(model, images, backward=True) == training_flops(model, 2)


def test_keras_default_count_by_hand() -> None:
    """The default model's forward FLOPs per image, summed here from the architecture (2 per multiply-add)."""
    n, d, m, p, heads, key, classes = 256, 256, 1024, 12, 8, 256, 100
    projection = m * p * d
    keys_values = m * d * 2 * d  # once: both iterations share the cross-attention
    cross = 2 * n * m * d + 2 * n * d * d  # scores, weighted sum, feed-forward (queries counted apart)
    block = n * d * 3 * heads * key + 2 * heads * n * n * key + n * heads * key * d + 2 * n * d * d
    queries = n * d * d  # the first iteration's queries are shared by the batch
    per_image = projection + keys_values + 2 * (cross + 4 * block) + queries + d * d + d * classes
    forward, first = Perceiver().forward_flops(4)
    assert forward == 2 * (4 * per_image + queries)
    assert first == 2 * 4 * projection


def test_other_models_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="Linear"):
        training_flops(torch.nn.Linear(2, 2), 1)


def test_matmul_peak_is_a_plausible_rate() -> None:
    peak = matmul_peak(torch.device("cpu"), seconds=0.05)
    assert math.isfinite(peak) and 1e8 < peak < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU


def test_utilisation_row() -> None:
    assert utilisation(100.0, None, 1e12) == {}
    row = utilisation(100.0, 2e9, 1e12)
    assert row == {"perf/tflops": pytest.approx(0.2), "perf/mfu": pytest.approx(0.2)}
    assert "perf/mfu" not in utilisation(100.0, 2e9, None)


def test_timing_the_matmul_peak_draws_nothing_from_the_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    matmul_peak(torch.device("cpu"), seconds=0.01)
    assert torch.equal(torch.get_rng_state(), before)
