"""Tests for perceiver/augment.py: resizing, random flip, zoom, translation and erasing, and the BatchAugment pipeline.

Expected values come from independent references (a loop implementation of half-pixel bilinear
interpolation, hand-computed tables, invariances of flips and zooms, shifts found by plain slicing, rectangles
read off the changed pixels), never from the code under test.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from perceiver.data.augment import BatchAugment, random_erase, random_hflip, random_translate, random_zoom, resize

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


# ----------------------------------------------------------------------------- translate


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, H, W) moved down by dy and right by dx (negative: up / left), vacated pixels 0, by plain slicing."""
    _, height, width = image.shape
    out = torch.zeros_like(image)
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def test_shifted_reference_moves_a_pixel_as_expected() -> None:
    image = torch.zeros(1, 4, 5)
    image[0, 1, 2] = 7.0
    moved = shifted(image, 2, -1)
    assert moved[0, 3, 1] == 7.0 and moved.sum() == 7.0
    assert shifted(image, 3, 0).sum() == 0.0  # pushed off the bottom


def test_random_translate_gives_each_image_shifted_by_some_offset_in_range_and_uses_them_all() -> None:
    torch.manual_seed(0)
    k = 2
    images = torch.rand(300, 2, 6, 7) + 1.0  # no zeros inside, so each shift is recognisable
    out = random_translate(images, k)
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)]
    seen = set()
    for image, result in zip(images, out, strict=True):
        matches = [offset for offset in offsets if torch.equal(result, shifted(image, *offset))]
        assert len(matches) == 1, "output is not an exact whole-pixel shift within range"
        seen.add(matches[0])
    assert seen == set(offsets)  # all 25 shifts occur over 300 images


def test_random_translate_by_zero_is_identity() -> None:
    images = torch.rand(4, 3, 5, 5)
    assert torch.equal(random_translate(images, 0), images)


# ----------------------------------------------------------------------------- erase

AREA = (0.02, 1 / 3)
ASPECT = (0.3, 3.3)


def erased_rectangle(image: torch.Tensor, result: torch.Tensor) -> tuple[int, int] | None:
    """The (height, width) of the one axis-aligned rectangle where `result` differs from `image` (all channels
    zeroed, nothing else changed), or None when they are equal; fails on any other difference."""
    changed = (result != image).any(0)
    if not changed.any():
        return None
    rows = changed.any(1).nonzero().flatten()
    cols = changed.any(0).nonzero().flatten()
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert changed[top:bottom, left:right].all(), "the changed pixels are not one rectangle"
    assert (result[:, top:bottom, left:right] == 0).all(), "the rectangle is not zero in every channel"
    outside = torch.ones_like(changed)
    outside[top:bottom, left:right] = False
    assert torch.equal(result[:, outside], image[:, outside])
    return int(bottom - top), int(right - left)


def test_random_erase_zeroes_one_rectangle_of_paper_size_in_about_p_of_the_images() -> None:
    torch.manual_seed(0)
    n, p, size = 2000, 0.4, 20
    images = torch.rand(n, 2, size, size) + 1.0  # no zeros, so every erased pixel shows
    out = random_erase(images, p)
    rectangles = [erased_rectangle(image, result) for image, result in zip(images, out, strict=True)]
    erased = [r for r in rectangles if r is not None]
    # binomial(2000, 0.4): sd ~ 22, so +-5 sd is 110
    assert abs(len(erased) - n * p) < 110
    for h, w in erased:
        # sizes are rounded to whole pixels: the drawn size lies within half a pixel of (h, w)
        assert (h - 0.5) * (w - 0.5) <= AREA[1] * size * size and (h + 0.5) * (w + 0.5) >= AREA[0] * size * size
        assert (h - 0.5) / (w + 0.5) <= ASPECT[1] and (h + 0.5) / (w - 0.5) >= ASPECT[0]
    heights = [h for h, _ in erased]
    widths = [w for _, w in erased]
    assert max(h / w for h, w in erased) > 2 and min(h / w for h, w in erased) < 0.5  # tall and wide both occur
    assert min(heights) < size // 4 and max(heights) > size // 2 and max(widths) > size // 2


def test_random_erase_places_rectangles_everywhere_including_the_borders() -> None:
    torch.manual_seed(1)
    images = torch.rand(500, 1, 8, 8) + 1.0
    out = random_erase(images, 1.0)
    covered = (out == 0).any(1).float().mean(0)
    assert (covered > 0).all()  # every pixel, corners included, is erased in some image


def test_random_erase_with_zero_probability_is_identity() -> None:
    images = torch.rand(50, 3, 8, 8)
    assert torch.equal(random_erase(images, 0.0), images)


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
        ({"translate": -1}, "translate"),
        ({"translate": 1.5}, "translate"),
        ({"translate": 8}, "translate"),  # as large as the image: nothing would be left
        ({"erase_prob": -0.1}, "erase_prob"),
        ({"erase_prob": 1.5}, "erase_prob"),
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


def test_translate_and_erase_are_off_by_default_and_zero_settings_change_nothing() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    for augment in (
        make_augment(hflip=False, zoom=0.0),
        make_augment(hflip=False, zoom=0.0, translate=0, erase_prob=0),
    ):
        x, _ = augment.train()(images, torch.zeros(8, dtype=torch.long))
        assert torch.equal(x, augment.preprocess(images))


def test_forward_translates_at_the_model_size_with_mean_fill_and_evaluation_stays_plain() -> None:
    torch.manual_seed(0)
    augment = make_augment(hflip=False, zoom=0.0, translate=3).train()
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    plain = augment.preprocess(images)  # 16 x 16, the model's size
    x, _ = augment(images, torch.zeros(64, dtype=torch.long))
    offsets = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)]
    for image, result in zip(plain, x, strict=True):
        assert any(torch.equal(result, shifted(image, *offset)) for offset in offsets)
    assert not torch.equal(x, plain)
    # zero after normalisation is the mean: a constant mean image stays exactly the mean wherever it moves
    mean_images = constant_batch(MEAN, batch=16)
    torch.testing.assert_close(augment(mean_images, torch.zeros(16))[0], torch.zeros(16, 3, 16, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.preprocess(images), plain, atol=0, rtol=0)  # evaluation draws nothing


def test_forward_erases_rectangles_in_every_image_at_probability_one() -> None:
    torch.manual_seed(0)
    augment = make_augment(hflip=False, zoom=0.0, erase_prob=1.0).train()
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    plain = augment.preprocess(images)
    x, _ = augment(images, torch.zeros(32, dtype=torch.long))
    assert all(erased_rectangle(image, result) is not None for image, result in zip(plain, x, strict=True))


def test_evaluation_preprocess_neither_translates_nor_erases_nor_draws_random_numbers() -> None:
    """`Preprocess` with translation and erasing configured is still plain normalisation (at the input's own
    size, so no resize), and it leaves the torch RNG where it was."""
    augment = make_augment(image_size=8, hflip=False, zoom=0.0, translate=3, erase_prob=1.0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    out = augment.eval().preprocess(images)
    assert torch.equal(torch.get_rng_state(), before)
    expected = (images.double() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [{"translate": 2}, {"erase_prob": 0.5}, {"translate": 1, "erase_prob": 0.7}])
def test_translate_and_erase_are_reproducible_from_the_torch_seed(overrides: dict) -> None:
    augment = make_augment(hflip=False, zoom=0.0, **overrides).train()
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(16, dtype=torch.long)
    torch.manual_seed(5)
    first, _ = augment(images, labels)
    torch.manual_seed(5)
    second, _ = augment(images, labels)
    torch.manual_seed(6)
    other, _ = augment(images, labels)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
