"""The CPU dropout and attention against plain re-computations: the mask's distribution, gradients that
pass through the same mask, and attention equal to softmax(q k^T) v with that mask."""

from __future__ import annotations

import math

import pytest
import torch

from perceiver.models import layers as ops


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_mask_keeps_each_element_with_probability_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_000
    mask = ops.keep_mask(torch.Size([n]), p, torch.float32, torch.device("cpu"))
    zero, scaled = mask.unique().tolist()
    assert zero == 0.0 and scaled == pytest.approx(1 / (1 - p))
    kept = (mask > 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma  # a wrong rate (or a 2^-8 rounded one at p=0.1) fails
    assert mask.mean().item() == pytest.approx(1.0, abs=6 * sigma / (1 - p))  # expectation preserved


def test_mask_elements_are_independent_across_words_and_halves() -> None:
    torch.manual_seed(1)
    keep = ops.keep_mask(torch.Size([400_000]), 0.5, torch.float32, torch.device("cpu")) > 0
    even, odd = keep[0::2].double(), keep[1::2].double()  # the two halves of each 64-bit word
    correlation = torch.corrcoef(torch.stack([even, odd]))[0, 1].item()
    assert abs(correlation) < 0.01
    assert abs(torch.corrcoef(torch.stack([keep[:-1].double(), keep[1:].double()]))[0, 1].item()) < 0.01


def test_masks_follow_the_torch_seed() -> None:
    shape = torch.Size([3, 5, 7])
    torch.manual_seed(3)
    first = ops.keep_mask(shape, 0.3, torch.float32, torch.device("cpu"))
    second = ops.keep_mask(shape, 0.3, torch.float32, torch.device("cpu"))
    torch.manual_seed(3)
    again = ops.keep_mask(shape, 0.3, torch.float32, torch.device("cpu"))
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_dropout_is_the_identity_outside_training_and_at_zero() -> None:
    x = torch.randn(4, 6)
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0.0, training=True) is x
    assert torch.equal(ops.dropout(x, 1.0, training=True), torch.zeros_like(x))


def test_dropout_gradient_is_the_same_mask() -> None:
    torch.manual_seed(4)
    x = (torch.rand(64, 33) + 0.5).requires_grad_()  # no zeros, so out != 0 is the mask
    out = ops.dropout(x, 0.25, training=True)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    mask = (out.detach() != 0) / 0.75
    assert 0.65 < (mask > 0).float().mean() < 0.85
    torch.testing.assert_close(out.detach(), x.detach() * mask)
    torch.testing.assert_close(x.grad, upstream * mask)


def test_dropout_module_has_the_state_of_nn_dropout() -> None:
    layer = ops.Dropout(0.3)
    assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.3 and layer.state_dict() == {}
    x = torch.randn(5, 5)
    assert torch.equal(layer.eval()(x), x)


def reference_attention(q, k, v, scale, mask=None):
    weights = torch.softmax(scale * torch.einsum("bhld,bhsd->bhls", q, k), dim=-1)
    if mask is not None:
        weights = weights * mask
    return torch.einsum("bhls,bhsd->bhld", weights, v)


def test_attention_without_dropout_is_softmax_attention() -> None:
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (5, 7, 7))
    torch.testing.assert_close(ops.attention(q, k, v, 0.3, 0.0), reference_attention(q, k, v, 0.3))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_attention_with_dropout_drops_attention_weights(scale: float) -> None:
    """Same seed, same mask: the spelled-out path equals the reference with that mask, values and gradients."""
    inputs = [torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7)]
    torch.manual_seed(5)
    out = ops.attention(*inputs, scale, 0.2)
    torch.manual_seed(5)
    mask = ops.keep_mask(torch.Size([2, 3, 5, 7]), 0.2, torch.float64, torch.device("cpu"))
    assert 0 < (mask == 0).sum() < mask.numel()
    expected = reference_attention(*inputs, scale, mask)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, upstream)
    theirs = torch.autograd.grad(expected, inputs, upstream)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p", [0.99999, 1 - 2**-16, 1 - 2**-18])
def test_a_rate_near_one_drops_nearly_everything(p: float) -> None:
    """The 16-bit threshold must not wrap around int16 for rates near 1 (it would then keep everything)."""
    torch.manual_seed(6)
    kept = (ops.dropout(torch.ones(200_000), p, training=True) != 0).double().mean().item()
    assert kept < 1e-3


def test_the_keep_threshold_is_the_rate_rounded_to_16_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every int16 value once as the generator's output: the mask keeps exactly 2^16 - round(p 2^16) of them."""
    every_value = torch.arange(-(2**15), 2**15).to(torch.int16).view(torch.int64)  # as the 64-bit words it reads
    monkeypatch.setattr(torch.Tensor, "random_", lambda self, *args: self.copy_(every_value))
    for p in (0.1, 0.2, 0.5, 1e-6):
        mask = ops.keep_mask(torch.Size([2**16]), p, torch.float64, torch.device("cpu"))
        assert int((mask > 0).sum()) == 2**16 - round(p * 2**16)
        assert abs(round(p * 2**16) / 2**16 - p) <= 2**-17
