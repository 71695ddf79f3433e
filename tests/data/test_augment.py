"""Tests for perceiver/augment.py: resizing, random flip and zoom, and the BatchAugment pipeline.

Expected values come from independent references (a loop implementation of half-pixel bilinear
interpolation, hand-computed tables, invariances of flips and zooms), never from the code under test.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from perceiver.data.augment import BatchAugment, random_hflip, random_zoom, resize

# ----------------------------------------------------------------------------- resize


def reference_bilinear(image: torch.Tensor, size: int) -> torch.Tensor:
    """Half-pixel-centre bilinear resize of one (H, W) plane to (size, size), written out with loops:
    source coordinate = (dst + 0.5) / scale - 0.5, clamped to the image, then linear weights."""
    height, width = image.shape

    def taps(dst: int, src_len: int) -> tuple[int, int, float]:
        src = min(max((dst + 0.5) * src_len / size - 0.5, 0.0), src_len - 1)
        low = math.floor(src)
        high = min(low + 1, src_len - 1)
        return low, high, src - low

    out = torch.empty(size, size, dtype=torch.float64)
    for i in range(size):
        y0, y1, wy = taps(i, height)
        for j in range(size):
            x0, x1, wx = taps(j, width)
            top = (1 - wx) * float(image[y0, x0]) + wx * float(image[y0, x1])
            bottom = (1 - wx) * float(image[y1, x0]) + wx * float(image[y1, x1])
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


def test_resize_upscale_by_two_matches_hand_computed_half_pixel_values() -> None:
    """2x2 -> 4x4: source positions are clamp((d + 0.5) / 2 - 0.5) = 0, 0.25, 0.75, 1 on both axes."""
    image = torch.tensor([[0.0, 10.0], [20.0, 70.0]]).view(1, 1, 2, 2)
    # value(sy, sx) = 10 sx + 20 sy + 40 sx sy, the bilinear interpolant of the four corners
    expected = torch.tensor(
        [
            [0.0, 2.5, 7.5, 10.0],
            [5.0, 10.0, 20.0, 25.0],
            [15.0, 25.0, 45.0, 55.0],
            [20.0, 32.5, 57.5, 70.0],
        ]
    )
    torch.testing.assert_close(reference_bilinear(image[0, 0], 4), expected.double())  # the reference itself
    torch.testing.assert_close(resize(image, 4)[0, 0], expected)


@pytest.mark.parametrize(("height", "width", "size"), [(3, 5, 7), (6, 6, 4), (5, 3, 2)])
def test_resize_matches_loop_reference_for_odd_ratios_and_downscaling(height: int, width: int, size: int) -> None:
    """Non-integer ratios, non-square inputs and downscaling without antialiasing (Keras `Resizing`)."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, height, width) * 255
    out = resize(images, size)
    assert out.shape == (2, 3, size, size)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(out[b, c].double(), reference_bilinear(images[b, c], size), atol=1e-4, rtol=0)


def test_resize_downscale_by_two_is_the_mean_of_each_two_by_two_block() -> None:
    """Without antialiasing, halving samples exactly between four pixels: each output is their average."""
    torch.manual_seed(1)
    images = torch.rand(1, 2, 6, 6)
    block_means = images.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))
    torch.testing.assert_close(resize(images, 3), block_means)


def test_resize_to_the_same_size_is_a_no_op() -> None:
    images = torch.rand(2, 3, 5, 5)
    assert resize(images, 5) is images


# ----------------------------------------------------------------------------- flip


def test_random_hflip_gives_each_image_or_its_mirror_about_half_the_time() -> None:
    torch.manual_seed(0)
    images = torch.rand(2000, 2, 3, 4)  # random, so no image is its own mirror
    out = random_hflip(images)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()  # whole image (all channels) either kept or mirrored
    assert 0.45 < mirrored.float().mean().item() < 0.55


def test_random_hflip_mirrors_left_right_not_up_down() -> None:
    torch.manual_seed(0)
    images = torch.arange(2 * 3, dtype=torch.float32).view(1, 1, 2, 3).repeat(64, 1, 1, 1)
    out = random_hflip(images)
    left_right = torch.tensor([[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]])
    assert all(torch.equal(o[0], images[0, 0]) or torch.equal(o[0], left_right) for o in out)
    assert any(torch.equal(o[0], left_right) for o in out)


# ----------------------------------------------------------------------------- zoom


def ramp_images(batch: int, size: int) -> torch.Tensor:
    """Channel 0 rises by 1 per column, channel 1 by 1 per row: their slopes measure the two zooms."""
    cols = torch.arange(size, dtype=torch.float32).view(1, size).expand(size, size)
    return torch.stack([cols, cols.t()]).unsqueeze(0).repeat(batch, 1, 1, 1)


def test_random_zoom_with_zero_factor_is_identity() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 9, 7)
    torch.testing.assert_close(random_zoom(images, 0.0), images, atol=1e-5, rtol=0)


def test_random_zoom_keeps_shape_and_constant_images_constant() -> None:
    """Reflected borders never pull in outside values, so a flat image stays flat."""
    torch.manual_seed(0)
    images = torch.full((8, 3, 12, 10), 0.375)
    out = random_zoom(images, 0.5)
    assert out.shape == images.shape and out.dtype == images.dtype
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_random_zoom_output_stays_within_each_images_value_range() -> None:
    torch.manual_seed(1)
    images = torch.rand(16, 3, 10, 10)
    out = random_zoom(images, 0.3)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()


def test_random_zoom_scales_ramps_about_the_centre_by_independent_factors_in_range() -> None:
    """A linear ramp zoomed by z about the centre c stays linear: value(j) = z (j - c) + c. The fitted
    width and height zooms must lie in [1 - f, 1 + f], cover both zoom-in and zoom-out, and differ."""
    torch.manual_seed(0)
    factor, size = 0.2, 32
    out = random_zoom(ramp_images(256, size), factor)
    centre = (size - 1) / 2
    inner = torch.arange(4, size - 4, dtype=torch.float32)  # away from the reflected borders
    zooms = []
    for channel, plane in ((0, out[:, 0, :, 4:-4]), (1, out[:, 1, 4:-4, :].transpose(1, 2))):
        # channel 0: every row is a ramp over columns; channel 1: every column is a ramp over rows
        slope = (plane[..., -1] - plane[..., 0]) / (inner[-1] - inner[0])
        zoom = slope.mean(dim=1)
        assert torch.allclose(slope, zoom[:, None], atol=1e-3), f"channel {channel} ramp bent across lines"
        expected = zoom[:, None, None] * (inner - centre) + centre
        torch.testing.assert_close(plane, expected.expand_as(plane), atol=2e-3, rtol=0)
        assert (zoom >= 1 - factor - 1e-4).all() and (zoom <= 1 + factor + 1e-4).all()
        assert zoom.min() < 1 - factor / 2 and zoom.max() > 1 + factor / 2
        zooms.append(zoom)
    width_zoom, height_zoom = zooms
    assert (width_zoom - height_zoom).abs().max() > 0.05  # height and width are drawn independently


# ----------------------------------------------------------------------------- BatchAugment

MEAN = [10.0, 128.0, 200.0]
STD = [2.0, 4.0, 50.0]


def constant_batch(values: list[float], batch: int = 2, size: int = 8) -> torch.Tensor:
    return (
        torch.tensor(values, dtype=torch.float32).round().to(torch.uint8).view(1, 3, 1, 1).repeat(batch, 1, size, size)
    )


def make_augment(**overrides) -> BatchAugment:
    settings = {"image_size": 16, "num_classes": 5} | overrides
    augment = BatchAugment(**settings)
    augment.set_statistics(MEAN, STD)
    return augment


def test_preprocess_maps_the_mean_to_zero_and_mean_plus_std_to_one() -> None:
    augment = make_augment()
    zero = augment.preprocess(constant_batch(MEAN))
    assert zero.shape == (2, 3, 16, 16) and zero.dtype == torch.float32
    torch.testing.assert_close(zero, torch.zeros_like(zero), atol=1e-6, rtol=0)
    one = augment.preprocess(constant_batch([m + s for m, s in zip(MEAN, STD, strict=True)]))
    torch.testing.assert_close(one, torch.ones_like(one), atol=1e-6, rtol=0)


def test_preprocess_normalises_per_channel_then_resizes() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    augment = make_augment(image_size=7)
    out = augment.preprocess(images)
    assert out.shape == (2, 3, 7, 7) and out.dtype == torch.float32
    for b in range(2):
        for c in range(3):
            normalised = (images[b, c].double() - MEAN[c]) / STD[c]
            torch.testing.assert_close(out[b, c].double(), reference_bilinear(normalised, 7), atol=1e-4, rtol=0)


def test_set_statistics_guards_against_zero_std() -> None:
    augment = make_augment()
    augment.set_statistics(MEAN, [0.0, 0.0, 0.0])
    assert torch.isfinite(augment.preprocess(constant_batch([0.0, 255.0, 7.0]))).all()


def test_forward_without_random_steps_equals_preprocess_and_keeps_labels() -> None:
    augment = make_augment(hflip=False, zoom=0.0).train()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 4, 2, 2])
    x, y = augment(images, labels)
    torch.testing.assert_close(x, augment.preprocess(images), atol=0, rtol=0)
    assert torch.equal(y, labels)
    assert not augment.mixes_batches and augment.loss_label_smoothing == 0.0


def test_forward_with_flip_and_zoom_returns_hard_labels_and_model_sized_floats() -> None:
    torch.manual_seed(0)
    augment = make_augment(label_smoothing=0.1).train()
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    x, y = augment(images, labels)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(y, labels)
    assert augment.loss_label_smoothing == 0.1  # without Mixup the loss smooths the hard labels


def test_forward_with_flip_only_gives_preprocessed_images_or_their_mirrors() -> None:
    torch.manual_seed(0)
    augment = make_augment(zoom=0.0).train()
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    x, _ = augment(images, torch.zeros(64, dtype=torch.long))
    plain = augment.preprocess(images)
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()


def test_forward_with_mixup_returns_soft_targets_mixing_each_image_with_its_batch_partner() -> None:
    """timm's batch Mixup pairs image i with image B-1-i: x = lam x_i + (1 - lam) x_{B-1-i}, and the
    target puts weight lam on y_i and 1 - lam on y_{B-1-i}; rows are distributions."""
    np.random.seed(0)
    augment = make_augment(hflip=False, zoom=0.0, mixup_alpha=0.8).train()
    assert augment.mixes_batches and augment.loss_label_smoothing == 0.0
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    plain = augment.preprocess(images)
    x, targets = augment(images, labels)
    assert targets.shape == (4, 5) and targets.dtype.is_floating_point
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert (targets >= 0).all()
    lam = targets[0, 0].item()
    assert 0.0 < lam < 1.0
    partner = labels.flip(0)
    for i in range(4):
        expected = torch.zeros(5)
        expected[labels[i]] += lam
        expected[partner[i]] += 1 - lam
        torch.testing.assert_close(targets[i], expected)
    torch.testing.assert_close(x, lam * plain + (1 - lam) * plain.flip(0), atol=1e-5, rtol=1e-5)


def test_mixup_with_label_smoothing_still_gives_distributions() -> None:
    np.random.seed(1)
    augment = make_augment(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1).train()
    x, targets = augment(torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6) % 5)
    assert x.shape == (6, 3, 16, 16)
    assert targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert (targets > 0).all()  # smoothing leaves mass on every class
    assert augment.loss_label_smoothing == 0.0  # the targets are already smoothed


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"zoom": -0.1}, "zoom"),
        ({"zoom": 1.0}, "zoom"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": -0.01}, "label_smoothing"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"cutmix_alpha": -0.5}, "cutmix_alpha"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        BatchAugment(image_size=8, num_classes=3, **overrides)


def test_sample_transform_is_none_without_randaugment() -> None:
    assert BatchAugment(image_size=8, num_classes=3).sample_transform() is None


def test_sample_transform_with_randaugment_maps_uint8_chw_to_uint8_chw() -> None:
    random.seed(0)
    transform = BatchAugment(image_size=8, num_classes=3, randaugment="rand-m9-mstd0.5").sample_transform()
    assert transform is not None
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8)
    outputs = [transform(image) for _ in range(50)]  # many draws, so most of the ops run
    for out in outputs:
        assert out.dtype == torch.uint8 and out.shape == (3, 12, 10)
    assert any(not torch.equal(out, image) for out in outputs)  # it does augment
