"""The folded self-attention (perceiver/models/folding.py) against a plain per-head re-computation in float64,
its rounding against the unfolded form's, and its FLOP rule against torch.utils.flop_counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from perceiver import Perceiver
from perceiver.models import folding, layers
from perceiver.models.perceiver import SelfAttention

SHAPES = [  # (width D, heads H, key_dim d, tokens L)
    (16, 2, 16, 6),  # heads as wide as the model, like the example
    (12, 3, 8, 5),  # narrower heads
    (8, 2, 12, 4),  # wider heads
]


def plain_multi_head_attention(attention: SelfAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Keras MultiHeadAttention written out head by head; `mask` (B, H, L, L) scales the attention weights."""
    heads, key_dim = attention.num_heads, attention.key_dim
    wq, wk, wv = attention.qkv.weight.split(heads * key_dim)
    bq, bk, bv = attention.qkv.bias.split(heads * key_dim)
    outputs = []
    for h in range(heads):
        part = slice(h * key_dim, (h + 1) * key_dim)
        q, k, v = (x @ w[part].T + b[part] for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        weights = torch.softmax(q @ k.transpose(1, 2) / key_dim**0.5, dim=-1)
        outputs.append((weights if mask is None else weights * mask[:, h]) @ v)
    return attention.out(torch.cat(outputs, dim=-1))


def random_attention(width: int, heads: int, key_dim: int, dropout: float) -> SelfAttention:
    attention = SelfAttention(width, heads, key_dim, dropout).double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0.0, 0.5)  # non-zero biases: every term of the fold matters
    return attention


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [False, True])
def test_folded_attention_equals_plain_attention_in_float64(shape: tuple[int, int, int, int], training: bool) -> None:
    width, heads, key_dim, length = shape
    torch.manual_seed(0)
    attention = random_attention(width, heads, key_dim, 0.3).train(training)
    x = torch.randn(3, length, width, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = folding.self_attention(x, attention.qkv, attention.out, heads, 0.3, training)
    torch.manual_seed(7)  # the same draw: the fold's mask is drawn in the unfolded (B, H, L, L) order
    mask = layers.keep_mask(torch.Size((3, heads, length, length)), 0.3, x.dtype, x.device) if training else None
    reference_x = x.detach().clone().requires_grad_()
    reference = plain_multi_head_attention(attention, reference_x, mask)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(out)
    folded_grads = torch.autograd.grad(out, [x, *attention.parameters()], upstream)
    plain_grads = torch.autograd.grad(reference, [reference_x, *attention.parameters()], upstream)
    for folded, plain in zip(folded_grads, plain_grads, strict=True):
        torch.testing.assert_close(folded, plain, rtol=1e-9, atol=1e-9)


def test_the_key_bias_gets_its_gradient_of_zero_not_none() -> None:
    torch.manual_seed(0)
    attention = random_attention(16, 2, 16, 0.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    folding.self_attention(x, attention.qkv, attention.out, 2, 0.0, False).square().sum().backward()
    key_bias = attention.qkv.bias.grad[32:64]  # softmax ignores a constant per row: exactly 0 in real arithmetic
    assert key_bias.abs().max() < 1e-10 < attention.qkv.bias.grad[:32].abs().max()


def worst_relative_errors(fold: bool, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per output and gradient of a float32 model: the largest error against `reference`, over its largest value."""
    values = forward_and_gradients(fold, torch.float32)
    return {
        name: ((value - reference[name]).abs().max() / reference[name].abs().max()).item()
        for name, value in values.items()
    }


def forward_and_gradients(fold: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = dict(image_size=8, patch_size=2, num_classes=5, latent_dim=12, projection_dim=32, num_heads=4)
    model = Perceiver(
        **config, num_iterations=3, dropout_rate=0.0, attention_dropout_rate=0.0, fold_attention_weights=fold
    )
    model = model.to(dtype).train()
    images = torch.randn(4, 3, 8, 8).to(dtype)
    logits = model(images)
    logits.backward(torch.randn(logits.shape).to(dtype))
    return {"logits": logits.detach().double()} | {n: p.grad.double() for n, p in model.named_parameters()}


def test_folded_float32_rounds_no_worse_than_the_unfolded_form() -> None:
    """The fold reassociates the arithmetic, so float32 results differ from the unfolded ones by rounding; both
    are held to float64, and the fold's error must be of the same order as the unfolded form's."""
    reference = forward_and_gradients(False, torch.float64)
    folded, unfolded = worst_relative_errors(True, reference), worst_relative_errors(False, reference)
    assert SelfAttention(32, 4, 32, 0.0).folds(torch.zeros(1, 12, 32))  # the model above does fold
    for name, error in folded.items():
        assert error <= 4 * max(unfolded[name], 1e-6), f"{name}: folded {error:.2e}, unfolded {unfolded[name]:.2e}"


def counted_flops(attention: SelfAttention, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        attention(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("width", "heads", "key_dim", "length"), [(256, 8, 256, 256), (128, 4, 32, 64), (32, 2, 24, 40)]
)
def test_the_fold_is_taken_where_the_flop_counter_says_it_saves(
    width: int, heads: int, key_dim: int, length: int
) -> None:
    """`saves_flops` against the products the flop counter sees, on a batch large enough that the weight products
    (paid once per batch) do not matter; the example's size folds, the benchmark's small one does not."""
    attention = SelfAttention(width, heads, key_dim, 0.1).train()  # attention dropout: plain matmuls, counted
    x = torch.randn(64, length, width)
    attention.fold_weights = True
    folded = counted_flops(attention, x)
    attention.fold_weights = False
    unfolded = counted_flops(attention, x)
    assert folding.saves_flops(width, key_dim, length) == (folded < unfolded)
    attention.fold_weights = True
    assert attention.folds(x) == folding.saves_flops(width, key_dim, length)


def test_the_fold_runs_on_the_cpu_only_and_can_be_turned_off() -> None:
    attention = SelfAttention(16, 2, 16, 0.0)
    assert attention.folds(torch.zeros(1, 6, 16))
    assert not attention.folds(torch.zeros(1, 6, 16, device="meta"))  # off the CPU: the fused SDPA kernels
    tiny = dict(image_size=8, patch_size=2, num_classes=5, latent_dim=6, projection_dim=16, num_heads=2)
    model = Perceiver(**tiny, fold_attention_weights=False)
    blocks = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert blocks and not any(block.folds(torch.zeros(1, 6, 16)) for block in blocks)


def test_fold_attention_weights_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match="fold_attention_weights='yes' is invalid"):
        Perceiver(fold_attention_weights="yes")  # type: ignore[arg-type]
