"""The model against independent references: the Keras example's parameter count derived layer by
layer, a functional re-computation of its layer order, plain softmax attention, invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perceiver import Perceiver
from perceiver.models.perceiver import CrossAttention, SelfAttention
from perceiver.models.position import fourier_features, patchify
from tests.helpers.models import TINY, permute_patches, trainable


def keras_parameter_count(
    image_size: int, patch_size: int, channels: int, latents: int, width: int, heads: int, blocks: int, classes: int
) -> int:
    """The Keras example's trainable weights, layer by layer (Dense = kernel + bias, LayerNorm = gamma + beta)."""

    def dense(inputs: int, units: int) -> int:
        return inputs * units + units

    def layer_norm(d: int) -> int:
        return 2 * d

    num_patches = (image_size // patch_size) ** 2
    patch_encoder = dense(patch_size * patch_size * channels, width) + num_patches * width  # Dense + Embedding
    latent_array = latents * width
    ffn = dense(width, width) + dense(width, width)  # ffn_units = [D, D]
    cross_attention = 2 * layer_norm(width) + 3 * dense(width, width) + 1 + layer_norm(width) + ffn  # +1: scale
    # MultiHeadAttention(num_heads, key_dim=D): q/k/v kernels (D, H, D) + biases (H, D); output (H, D, D) + (D,)
    mha = 3 * (width * heads * width + heads * width) + heads * width * width + width
    transformer = blocks * (layer_norm(width) + mha + layer_norm(width) + ffn)
    head = dense(width, width) + dense(width, classes)  # classifier_units = [D, num_classes]
    return latent_array + patch_encoder + cross_attention + transformer + head


def test_default_parameter_count_equals_the_keras_example() -> None:
    expected = keras_parameter_count(64, 2, 3, 256, 256, 8, 4, 100)
    assert expected == 9_697_637  # the same sum done by hand for the example's defaults
    assert trainable(Perceiver()) == expected


@pytest.mark.parametrize(
    "settings",
    [
        dict(image_size=32, patch_size=4, latent_dim=64, projection_dim=128, num_heads=4, num_classes=10),
        dict(image_size=16, patch_size=1, latent_dim=8, projection_dim=32, num_heads=1, num_classes=7),
    ],
)
def test_parameter_count_matches_keras_for_other_settings(settings: dict) -> None:
    model = Perceiver(**settings, num_transformer_blocks=2)
    expected = keras_parameter_count(
        settings["image_size"],
        settings["patch_size"],
        3,
        settings["latent_dim"],
        settings["projection_dim"],
        settings["num_heads"],
        2,
        settings["num_classes"],
    )
    assert trainable(model) == expected


@pytest.mark.parametrize("iterations", [1, 2, 4, 8])
def test_full_sharing_keeps_the_parameter_count_as_iterations_grow(iterations: int) -> None:
    base = trainable(Perceiver(**{**TINY, "num_iterations": 1}))
    assert trainable(Perceiver(**{**TINY, "num_iterations": iterations})) == base


def test_weight_sharing_modes_add_the_right_modules() -> None:
    shared = Perceiver(**TINY, weight_sharing="all")
    cross = trainable(shared.cross_attends[0])
    latent = trainable(shared.latent_transformers[0])
    but_first = Perceiver(**TINY, weight_sharing="all_but_first")
    unshared = Perceiver(**TINY, weight_sharing="none")
    n = TINY["num_iterations"]
    assert trainable(but_first) == trainable(shared) + cross
    assert trainable(unshared) == trainable(shared) + (n - 1) * (cross + latent)
    assert but_first.cross_index == [0, 1, 1] and but_first.latent_index == [0, 0, 0]


def test_latent_dim_is_the_number_of_latents() -> None:
    model = Perceiver(**{**TINY, "latent_dim": 512})
    assert model.num_latents == 512
    assert model.forward_features(torch.randn(2, 3, 8, 8)).shape == (2, 512, 16)


@pytest.mark.parametrize("encoding", ["learned", "fourier", "none"])
def test_position_encodings_train(encoding: str) -> None:
    model = Perceiver(**TINY, position_encoding=encoding, fourier_num_bands=3)
    logits = model(torch.randn(4, 3, 8, 8))
    assert logits.shape == (4, 5)
    logits.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_conv_stem_computes_two_convolutions_then_the_patches_of_their_half_size_map() -> None:
    """The encoder with a stem against a plain re-computation from its weights (eval mode: batch norm uses its
    running statistics, set here to non-trivial values)."""
    torch.manual_seed(0)
    model = Perceiver(**{**TINY, "patch_size": 4}, conv_stem=6).eval()
    convs = [model.encoder.stem[0], model.encoder.stem[3]]
    norms = [model.encoder.stem[1], model.encoder.stem[4]]
    for norm in norms:
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    images = torch.randn(2, 3, 8, 8)
    x = images
    for conv, norm, stride in zip(convs, norms, (1, 2), strict=True):
        x = F.conv2d(x, conv.weight, stride=stride, padding=1)
        x = (x - norm.running_mean[:, None, None]) / (norm.running_var[:, None, None] + norm.eps).sqrt()
        x = F.gelu(x * norm.weight[:, None, None] + norm.bias[:, None, None])
    assert x.shape == (2, 6, 4, 4)  # half the image's side
    patches = torch.stack([x[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] for r in range(2) for c in range(2)], dim=1)
    patches = patches.permute(0, 1, 3, 4, 2).reshape(2, 4, 24)  # each patch as (row, col, channel)
    projection = model.encoder.projection
    expected = patches @ projection.weight.T + projection.bias + model.encoder.position_embedding.weight
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(images), expected, atol=1e-5, rtol=1e-5)
    assert model.encoder.num_patches == 4 and model.encoder.patch_size == 4  # the grid of 4x4-pixel patches


def test_conv_stem_trains_every_weight() -> None:
    model = Perceiver(**{**TINY, "patch_size": 4}, conv_stem=6, position_encoding="fourier", fourier_num_bands=2)
    logits = model(torch.randn(4, 3, 8, 8))
    assert logits.shape == (4, 5)
    logits.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_without_position_encoding_the_model_ignores_patch_order() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 8, 8)
    order = torch.randperm(16)
    shuffled = permute_patches(images, 2, order)
    invariant = Perceiver(**TINY, position_encoding="none").eval()
    torch.testing.assert_close(invariant(shuffled), invariant(images), atol=1e-5, rtol=1e-5)
    positional = Perceiver(**TINY, position_encoding="learned").eval()
    assert not torch.allclose(positional(shuffled), positional(images), atol=1e-4)


def test_patchify_flattens_each_patch_as_row_col_channel() -> None:
    images = torch.randn(2, 3, 6, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)
    # patch 3 is grid row 1, column 1 -> pixel rows 2..3, columns 2..3
    expected = torch.stack([images[1, c, 2 + i, 2 + j] for i in range(2) for j in range(2) for c in range(3)])
    torch.testing.assert_close(patches[1, 3], expected)


def test_fourier_features_follow_the_paper_formula() -> None:
    grid, bands, max_freq = 4, 3, 4.0
    features = fourier_features(grid, bands, max_freq)
    assert features.shape == (grid * grid, 2 * (2 * bands + 1))
    coords = [-1.0, -1.0 / 3, 1.0 / 3, 1.0]
    freqs = [1.0 + k * (max_freq / 2 - 1.0) / (bands - 1) for k in range(bands)]
    row, col = 1, 3  # position index 7
    expected = []
    for x in (coords[row], coords[col]):
        expected += [x] + [math.sin(math.pi * f * x) for f in freqs] + [math.cos(math.pi * f * x) for f in freqs]
    torch.testing.assert_close(features[row * grid + col], torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_cross_attention_matches_plain_softmax_attention() -> None:
    torch.manual_seed(0)
    block = CrossAttention(dim=8, num_heads=2, ffn_units=8, dropout_rate=0.0, attention_dropout_rate=0.0, eps=1e-6)
    with torch.no_grad():
        block.score_scale.fill_(0.7)
    latents, data = torch.randn(1, 5, 8), torch.randn(3, 11, 8)
    out = block.eval()(latents, data)

    def ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    lat, dat = ln(latents, block.latent_norm).expand(3, 5, 8), ln(data, block.data_norm)
    q, k, v = block.to_q(lat), block.to_k(dat), block.to_v(dat)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        scores = 0.7 * q[..., part] @ k[..., part].transpose(1, 2)  # Keras use_scale: no 1/sqrt(d)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., part])
    x = ln(torch.cat(heads, dim=-1) + lat, block.ffn_norm)
    expected = block.ffn(x) + x
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_self_attention_matches_plain_multi_head_attention() -> None:
    torch.manual_seed(0)
    attention = SelfAttention(dim=6, num_heads=3, key_dim=4, attention_dropout_rate=0.0).eval()
    x = torch.randn(2, 7, 6)
    wq, wk, wv = attention.qkv.weight.split(12)
    bq, bk, bv = attention.qkv.bias.split(12)
    outputs = []
    for h in range(3):
        part = slice(4 * h, 4 * h + 4)
        q = x @ wq[part].T + bq[part]
        k = x @ wk[part].T + bk[part]
        v = x @ wv[part].T + bv[part]
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), dim=-1)
        outputs.append(weights @ v)
    expected = attention.out(torch.cat(outputs, dim=-1))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def reference_forward(model: Perceiver, images: torch.Tensor, iterations: int) -> torch.Tensor:
    """The Keras example's call(), written out from its source with this model's weights."""
    encoder = model.encoder
    data = encoder.projection(patchify(images, 2)) + encoder.position_embedding.weight
    latent = model.latents[None]
    cross, blocks = model.cross_attends[0], model.latent_transformers[0]
    for _ in range(iterations):
        latent_array = F.layer_norm(latent, (16,), cross.latent_norm.weight, cross.latent_norm.bias, 1e-6)
        data_array = F.layer_norm(data, (16,), cross.data_norm.weight, cross.data_norm.bias, 1e-6)
        query, key, value = cross.to_q(latent_array), cross.to_k(data_array), cross.to_v(data_array)
        scores = cross.score_scale * query @ key.transpose(1, 2)
        attention_output = torch.softmax(scores, dim=-1) @ value + latent_array  # skip connection 1
        attention_output = F.layer_norm(attention_output, (16,), cross.ffn_norm.weight, cross.ffn_norm.bias, 1e-6)
        x0 = cross.ffn(attention_output) + attention_output  # skip connection 2
        for block in blocks:
            x1 = F.layer_norm(x0, (16,), block.attention_norm.weight, block.attention_norm.bias, 1e-6)
            x2 = block.attention(x1) + x0
            x3 = F.layer_norm(x2, (16,), block.ffn_norm.weight, block.ffn_norm.bias, 1e-6)
            x0 = block.ffn(x3) + x2
        latent = x0
    return model.head(latent.mean(dim=1))


def test_forward_follows_the_keras_layer_order() -> None:
    torch.manual_seed(0)
    model = Perceiver(**TINY).eval()
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(images), reference_forward(model, images, TINY["num_iterations"]))


def test_head_ends_in_dropout_on_the_logits_like_the_example_and_can_drop_it() -> None:
    keras_like = Perceiver(**TINY, dropout_rate=0.5)
    assert isinstance(keras_like.head[-1], torch.nn.Dropout) and keras_like.head[-1].p == 0.5
    torch.manual_seed(0)
    logits = keras_like.train()(torch.randn(64, 3, 8, 8))
    assert (logits == 0).float().mean() > 0.3  # about half of the logits dropped in training
    clean = Perceiver(**TINY, dropout_rate=0.5, logit_dropout=False).train()
    assert (clean(torch.randn(64, 3, 8, 8)) == 0).sum() == 0


def test_latent_init_std_sets_the_scale_of_the_latents() -> None:
    torch.manual_seed(0)
    model = Perceiver(**{**TINY, "latent_dim": 256, "projection_dim": 64}, latent_init_std=0.5)
    assert model.latents.std().item() == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize(
    "override, words",
    [
        (dict(image_size=63), ["image_size=63", "patch_size=2", "divisible"]),
        (dict(latent_dim=0), ["latent_dim=0", "positive integer"]),
        (dict(projection_dim=-4), ["projection_dim=-4"]),
        (dict(latent_dim="many"), ["latent_dim='many'"]),
        (dict(cross_attention_heads=3), ["cross_attention_heads=3", "projection_dim=256"]),
        (dict(weight_sharing="some"), ["weight_sharing='some'", "all_but_first"]),
        (dict(position_encoding="sine"), ["position_encoding='sine'", "fourier"]),
        (dict(dropout_rate=1.5), ["dropout_rate=1.5", "[0, 1)"]),
        (dict(fourier_max_freq=0.5), ["fourier_max_freq=0.5"]),
        (dict(conv_stem=0), ["conv_stem=0", "positive"]),
        (dict(conv_stem=8, image_size=63, patch_size=3), ["conv_stem=8", "even patch_size", "patch_size=3"]),
    ],
)
def test_bad_arguments_raise_a_message_naming_the_field(override: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        Perceiver(**override)
    for word in words:
        assert word in str(error.value)


# ----------------------------------------------------------------------------- the optimised path


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"weight_sharing": "all_but_first", "num_iterations": 3},
        {"weight_sharing": "none", "cross_attention_heads": 2},
        {"position_encoding": "fourier", "fourier_num_bands": 3, "permute_inputs": True},
    ],
)
def test_optimised_model_equals_the_straightforward_one(variant: dict) -> None:
    """Cached keys/values, the fused key-value projection and the CPU attention/dropout path against the plain
    port in bench/straightforward.py (same weights), with dropout off: outputs and every gradient.

    These reorder no arithmetic, hence the tight tolerance. The folded self-attention does reassociate it; it is
    held to a float64 reference instead (tests/models/test_folding.py), so it is off here."""
    from bench.straightforward import StraightforwardPerceiver

    config = {**TINY, **variant, "dropout_rate": 0.0, "attention_dropout_rate": 0.0, "fold_attention_weights": False}
    torch.manual_seed(0)
    ours = Perceiver(**config).train()
    plain = StraightforwardPerceiver(**config).train()
    plain.load_state_dict(ours.state_dict())
    images = torch.randn(4, 3, 8, 8)
    out, expected = ours(images), plain(images)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    for (name, a), b in zip(ours.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_training_mode_still_drops_out() -> None:
    torch.manual_seed(0)
    model = Perceiver(**{**TINY, "dropout_rate": 0.2, "attention_dropout_rate": 0.1})
    images = torch.randn(2, 3, 8, 8)
    assert not torch.equal(model.train()(images), model(images))
    assert torch.equal(model.eval()(images), model(images))
