"""The input permutation of the paper's Table 2, checked against index arithmetic done here: one fixed
shuffle per seed, the Perceiver unchanged by it (its cross-attention ignores input order), the ViT not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from perceiver import FixedPermutation, Perceiver, ViT
from perceiver.experiment.build import build, build_parts, model_fields
from perceiver.experiment.config import ConfigError
from tests.helpers.models import TINY, permute_patches, trainable

TINY_VIT = dict(image_size=8, patch_size=2, num_classes=5, embed_dim=16, depth=2, num_heads=2)


def seeded_order(length: int, seed: int) -> torch.Tensor:
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))


def test_it_is_a_permutation_fixed_by_the_seed_alone() -> None:
    torch.manual_seed(1)
    first = FixedPermutation(64, seed=7).index
    torch.manual_seed(2)  # the global RNG (which training advances) plays no part
    second = FixedPermutation(64, seed=7).index
    assert torch.equal(first.sort().values, torch.arange(64))
    assert not torch.equal(first, torch.arange(64))
    assert torch.equal(first, second)
    assert torch.equal(first, seeded_order(64, 7))  # what any process or device draws from this seed
    assert not torch.equal(first, FixedPermutation(64, seed=8).index)


def test_tokens_are_shuffled_the_same_way_in_every_image_and_call() -> None:
    permutation = FixedPermutation(12, seed=3)
    batch, length, width = 4, 12, 5
    # token m of image b holds 100 b + m in every channel, so the output says where each token came from
    tokens = (100 * torch.arange(batch)[:, None, None] + torch.arange(length)[None, :, None]).expand(-1, -1, width)
    expected = seeded_order(length, 3)
    for _ in range(3):  # calls = epochs
        moved = permutation(tokens.float())
        sources = moved - 100 * torch.arange(batch)[:, None, None]
        assert torch.equal(sources, expected[None, :, None].expand(batch, -1, width).float())


def test_pixels_move_with_all_their_channels_and_can_be_put_back() -> None:
    permutation = FixedPermutation(6 * 5, seed=0)
    images = torch.randn(3, 4, 6, 5)
    moved = permutation.permute_pixels(images)
    order = seeded_order(30, 0)
    pixels = images.permute(0, 2, 3, 1).reshape(3, 30, 4)  # (B, pixel, channels)
    expected = pixels[:, order].reshape(3, 6, 5, 4).permute(0, 3, 1, 2)
    assert torch.equal(moved, expected)
    assert torch.equal(moved.flatten(2)[..., order.argsort()].view_as(images), images)


@pytest.mark.parametrize("position_encoding", ["learned", "fourier", "none"])
def test_perceiver_logits_do_not_change(position_encoding: str) -> None:
    torch.manual_seed(0)
    plain = Perceiver(**TINY, position_encoding=position_encoding).eval()
    permuted = Perceiver(**TINY, position_encoding=position_encoding, permute_inputs=True, permutation_seed=5).eval()
    loaded = permuted.load_state_dict(plain.state_dict(), strict=False)
    assert loaded.missing_keys == ["permutation.index"] and not loaded.unexpected_keys
    images = torch.randn(3, 3, 8, 8)

    seen: list[torch.Tensor] = []
    permuted.cross_attends[0].register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    with torch.no_grad():
        logits = permuted(images)
        # the cross-attention really sees the encoded inputs (position encoding included) shuffled
        torch.testing.assert_close(seen[0], plain.encoder(images)[:, seeded_order(16, 5)], rtol=0, atol=0)
        torch.testing.assert_close(logits, plain(images), rtol=1e-5, atol=1e-5)
        if position_encoding != "none":  # shuffling the patches *before* their encoding does change them
            shuffled = permute_patches(images, 2, seeded_order(16, 5))
            assert not torch.allclose(plain(shuffled), plain(images), atol=1e-4)


def test_vit_shuffles_pixels_before_the_patches_and_is_not_invariant() -> None:
    torch.manual_seed(0)
    plain = ViT(**TINY_VIT, dropout_rate=0.0).eval()
    permuted = ViT(**TINY_VIT, dropout_rate=0.0, permute_inputs=True, permutation_seed=2).eval()
    permuted.load_state_dict(plain.state_dict(), strict=False)
    images = torch.randn(2, 3, 8, 8)
    order = seeded_order(64, 2)
    shuffled = images.flatten(2)[..., order].view_as(images)
    with torch.no_grad():
        torch.testing.assert_close(permuted(images), plain(shuffled), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(permuted(images), plain(images), atol=1e-3)


def vit_parameter_count(image: int, patch: int, channels: int, dim: int, depth: int, mlp: int, classes: int) -> int:
    """timm's ViT layer by layer: conv patch embedding, class token, learned positions, pre-LN blocks, LN, head."""
    tokens = (image // patch) ** 2 + 1
    embedding = patch * patch * channels * dim + dim + dim + tokens * dim
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return embedding + depth * block + 2 * dim + dim * classes + classes


def test_vit_defaults_are_about_the_perceivers_size() -> None:
    vit = trainable(ViT())
    assert vit == vit_parameter_count(64, 4, 3, 256, 12, 1024, 100) == 9_581_924  # as conf/model/vit.yaml says
    assert abs(vit - trainable(Perceiver())) / trainable(Perceiver()) < 0.2


def test_the_permutation_is_saved_with_the_weights() -> None:
    saved = Perceiver(**TINY, permute_inputs=True, permutation_seed=1).state_dict()
    assert trainable(Perceiver(**TINY, permute_inputs=True)) == trainable(Perceiver(**TINY))
    restored = Perceiver(**TINY, permute_inputs=True, permutation_seed=2)
    restored.load_state_dict(saved)
    assert torch.equal(restored.permutation.index, seeded_order(16, 1))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Perceiver(**TINY, permute_inputs="yes"), "permute_inputs"),
        (lambda: Perceiver(**TINY, permute_inputs=True, permutation_seed=1.5), "permutation_seed"),
        (lambda: Perceiver(**TINY, permutation_seed=True), "permutation_seed"),
        (lambda: ViT(**TINY_VIT, permutation_seed=2**64), "permutation_seed"),
        (lambda: ViT(**TINY_VIT, permute_inputs=1), "permute_inputs"),
        (lambda: ViT(**{**TINY_VIT, "image_size": 9}), "image_size"),
        (lambda: ViT(**{**TINY_VIT, "num_heads": 3}), "num_heads"),
        (lambda: ViT(**{**TINY_VIT, "depth": 0}), "depth"),
        (lambda: ViT(**TINY_VIT, mlp_ratio=-1.0), "mlp_ratio"),
        (lambda: ViT(**TINY_VIT, dropout_rate=1.0), "dropout_rate"),
        (lambda: FixedPermutation(0), "length"),
    ],
)
def test_bad_values_name_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        make()


def test_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="positions"):
        FixedPermutation(5)(torch.zeros(2, 6, 3))


def test_vit_config_skips_only_perceiver_fields() -> None:
    vit = {"_target_": "perceiver.models.ViT", **TINY_VIT}
    fields = model_fields(OmegaConf.create({**vit, "latent_dim": 16, "num_iterations": 2}), TINY_VIT["num_classes"])
    model = build("model", OmegaConf.create(fields))
    assert trainable(model) == trainable(ViT(**TINY_VIT))
    unknown = model_fields(OmegaConf.create({**vit, "embed_dm": 16}), TINY_VIT["num_classes"])
    with pytest.raises(ConfigError, match="embed_dm"):
        build("model", OmegaConf.create(unknown))


@pytest.mark.parametrize("model", ["perceiver", "vit"])
def test_configs_build_permuted_models_seeded_by_the_run_seed(
    compose_config: Callable[..., DictConfig], model: str
) -> None:
    small = ["model.embed_dim=16", "model.depth=1"] if model == "vit" else []
    cfg = compose_config("experiment=cpu_smoke", f"model={model}", "model.permute_inputs=true", "seed=3", *small)
    built = build_parts(cfg).model
    assert isinstance(built, ViT if model == "vit" else Perceiver)
    length = (16 if model == "vit" else 4) ** 2  # cpu_smoke: 16 x 16 pixels, 4 x 4 patches of 4 pixels
    assert torch.equal(built.permutation.index, seeded_order(length, 3))
