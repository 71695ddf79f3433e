"""`Perceiver.attention_maps` against a plain re-computation of the cross-attention weights written here:
per head softmax((LN(latents) W_q * s) (LN(data) W_k)^T) over the inputs, and the forward pass rebuilt from
the maps, so the maps are shown to be the weights the logits use."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from perceiver import Perceiver
from perceiver.models.perceiver import CrossAttention, merge_heads, split_heads

TINY = dict(image_size=16, patch_size=4, num_classes=5, latent_dim=8, projection_dim=16, num_heads=2)
BATCH = 3


def make_model(**overrides: object) -> Perceiver:
    torch.manual_seed(0)
    return Perceiver(**{**TINY, **overrides}).eval()


def make_images(image_size: int = 16) -> torch.Tensor:
    return torch.randn(BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def head_slices(cross: CrossAttention, width: int) -> list[slice]:
    step = width // cross.num_heads
    return [slice(h * step, (h + 1) * step) for h in range(cross.num_heads)]


def hand_weights(cross: CrossAttention, latents: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, M) from scratch: one head at a time, scores q k^T with the learned scale on q, no sqrt(d)."""
    q = linear(layer_norm(latents, cross.latent_norm), cross.to_q) * cross.score_scale
    k = linear(layer_norm(data, cross.data_norm), cross.to_k)
    q = q.expand(k.shape[0], -1, -1)
    heads = [torch.softmax(q[..., s] @ k[..., s].transpose(1, 2), dim=-1) for s in head_slices(cross, k.shape[-1])]
    return torch.stack(heads, dim=1)


def cross_from_weights(
    cross: CrossAttention, weights: torch.Tensor, latents: torch.Tensor, data: torch.Tensor
) -> torch.Tensor:
    """A cross-attend's output rebuilt from its attention weights and the values: the residual adds LN(latents)."""
    v = linear(layer_norm(data, cross.data_norm), cross.to_v)
    attended = torch.cat([weights[:, h] @ v[..., s] for h, s in enumerate(head_slices(cross, v.shape[-1]))], -1)
    x = layer_norm(attended + layer_norm(latents, cross.latent_norm), cross.ffn_norm)
    return cross.ffn(x) + x


def data_array(model: Perceiver, images: torch.Tensor) -> torch.Tensor:
    """What the cross-attends read: encoded patches, in the model's (possibly permuted) order."""
    data = model.encoder(images)
    return data if model.permutation is None else data[:, model.permutation.index]


def test_rows_sum_to_one() -> None:
    model = make_model(num_iterations=3, weight_sharing="none", cross_attention_heads=2)
    maps = model.attention_maps(make_images())
    assert len(maps) == 3
    for weights in maps:
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


SHAPE_CASES = [
    dict(weight_sharing=w, num_iterations=i, cross_attention_heads=h, position_encoding=p, fourier_num_bands=4)
    for w, i, h, p in itertools.product(
        ("all", "all_but_first", "none"), (1, 3), (1, 2), ("learned", "fourier", "none")
    )
] + [dict(patch_size=1), dict(patch_size=1, permute_inputs=True, cross_attention_heads=2, num_iterations=2)]


@pytest.mark.parametrize("overrides", SHAPE_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_one_map_per_cross_attend_with_its_shape(overrides: dict) -> None:
    model = make_model(num_transformer_blocks=1, **overrides)
    maps = model.attention_maps(make_images())
    heads = overrides.get("cross_attention_heads", 1)
    patches = (16 // overrides.get("patch_size", TINY["patch_size"])) ** 2
    assert len(maps) == overrides.get("num_iterations", 2) == len(model.cross_index)
    for weights in maps:
        assert weights.shape == (BATCH, heads, TINY["latent_dim"], patches)
        assert weights.dtype == torch.float32 and not weights.requires_grad
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("position_encoding", ["learned", "fourier"])
def test_first_map_equals_the_hand_computation(heads: int, position_encoding: str) -> None:
    model = make_model(cross_attention_heads=heads, position_encoding=position_encoding, fourier_num_bands=4)
    with torch.no_grad():  # a non-default scale, so a map that ignored it would differ
        model.cross_attends[0].score_scale.fill_(1.7)
    images = make_images()
    with torch.no_grad():
        expected = hand_weights(model.cross_attends[0], model.latents, data_array(model, images))
    torch.testing.assert_close(model.attention_maps(images)[0], expected)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_iterations=1, num_transformer_blocks=1),
        dict(num_iterations=3, weight_sharing="all_but_first", cross_attention_heads=2),
        dict(num_iterations=2, weight_sharing="none", cross_attention_heads=2, permute_inputs=True),
    ],
)
def test_logits_rebuilt_from_the_maps_equal_the_forward_pass(overrides: dict) -> None:
    """Every cross-attend rebuilt from its map and the values gives the model's logits; the first one also
    equals `CrossAttention.forward` directly."""
    model = make_model(**overrides)
    images = make_images()
    maps = model.attention_maps(images, unpermute=False)  # the order the model attended in
    with torch.no_grad():
        data = data_array(model, images)
        latents = model.latents.unsqueeze(0)
        for step, (cross, latent) in enumerate(zip(model.cross_index, model.latent_index, strict=True)):
            rebuilt = cross_from_weights(model.cross_attends[cross], maps[step], latents, data)
            if step == 0:
                torch.testing.assert_close(rebuilt, model.cross_attends[cross](latents, data))
            latents = model.latent_transformers[latent](rebuilt)
        torch.testing.assert_close(model.forward_head(latents), model(images))


def pre_refactor_cross_forward(cross: CrossAttention, latents: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """`CrossAttention.forward` as it was written before the query helper (eval mode: no dropout)."""
    keys, values = cross.project_data(data)
    latents = cross.latent_norm(latents)
    q = (cross.to_q(latents) * cross.score_scale).expand(keys.shape[0], -1, -1)
    attended = F.scaled_dot_product_attention(split_heads(q, cross.num_heads), keys, values, scale=1.0)
    x = cross.ffn_norm(merge_heads(attended) + latents)
    return cross.ffn(x) + x


@pytest.mark.parametrize("heads", [1, 2])
def test_forward_is_unchanged_by_the_refactor(heads: int) -> None:
    model = make_model(num_iterations=3, weight_sharing="all_but_first", cross_attention_heads=heads)
    images = make_images()
    with torch.no_grad():
        data = data_array(model, images)
        latents = model.latents.unsqueeze(0)
        for cross, latent in zip(model.cross_index, model.latent_index, strict=True):
            latents = pre_refactor_cross_forward(model.cross_attends[cross], latents, data)
            latents = model.latent_transformers[latent](latents)
        assert torch.equal(model.forward_head(latents), model(images))


def test_unpermuted_maps_are_the_raw_maps_reordered() -> None:
    model = make_model(permute_inputs=True, num_iterations=2, weight_sharing="none", cross_attention_heads=2)
    images = make_images()
    grid, raw = model.attention_maps(images), model.attention_maps(images, unpermute=False)
    index = model.permutation.index
    assert not torch.equal(index, torch.arange(index.numel()))
    for grid_weights, raw_weights in zip(grid, raw, strict=True):
        assert not torch.equal(grid_weights, raw_weights)
        for j in range(index.numel()):  # raw[..., j] == grid[..., index[j]], spelled out
            assert torch.equal(raw_weights[..., j], grid_weights[..., index[j]])


def test_unpermuted_maps_equal_those_of_the_model_without_the_permutation() -> None:
    """The position encoding is attached before the shuffle, so with the same weights the grid-order maps of
    the permuted model are the plain model's maps (up to summation order)."""
    permuted = make_model(permute_inputs=True, num_iterations=2)
    plain = make_model(num_iterations=2)
    plain.load_state_dict({k: v for k, v in permuted.state_dict().items() if not k.startswith("permutation.")})
    images = make_images()
    for grid_weights, plain_weights in zip(permuted.attention_maps(images), plain.attention_maps(images), strict=True):
        torch.testing.assert_close(grid_weights, plain_weights)
    assert plain.attention_maps(images, unpermute=False)[0].equal(plain.attention_maps(images)[0])


def test_the_mode_is_kept_and_no_graph_is_built() -> None:
    model = make_model().train()
    maps = model.attention_maps(make_images())
    assert model.training and all(not m.requires_grad and m.grad_fn is None for m in maps)
    model.eval().attention_maps(make_images())
    assert not model.training
