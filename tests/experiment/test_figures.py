"""The attention figure: its numbers against a plain re-computation from `Perceiver.attention_maps` (NumPy:
heads averaged, rows reshaped to the patch grid, each patch's weight repeated over its p x p pixels), the
choice of latents, and the PNG for every position encoding, patch size 1, permuted inputs and image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceiver import BatchAugment, Perceiver
from perceiver.experiment.figures import attention_panels, draw_attention, pick_latents, upsample
from perceiver.models import ViT

TINY = dict(image_size=16, num_classes=5, latent_dim=8, projection_dim=16, num_heads=2, num_iterations=2)
PNG = b"\x89PNG\r\n\x1a\n"


def make_model(**overrides: object) -> Perceiver:
    torch.manual_seed(0)
    return Perceiver(**{**TINY, "patch_size": 4, **overrides})


def make_augment() -> BatchAugment:
    augment = BatchAugment(image_size=16, num_classes=5)
    augment.set_statistics([120.0, 110.0, 100.0], [60.0, 50.0, 40.0])
    return augment


def make_images(count: int = 3, size: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


def reference_maps(model: Perceiver, augment: BatchAugment, images: torch.Tensor) -> list[np.ndarray]:
    """Per cross-attend (B, N, H, W): the model's weights, heads averaged, upsampled with np.kron."""
    model.eval()
    with torch.no_grad():
        maps = model.attention_maps(augment.preprocess(images))
    p = model.encoder.patch_size
    grid = 16 // p
    out = []
    for weights in maps:
        mean = weights.double().mean(dim=1).numpy()  # (B, N, M)
        squares = mean.reshape(*mean.shape[:2], grid, grid)
        out.append(np.stack([[np.kron(square, np.ones((p, p))) for square in image] for image in squares]))
    return out


def reference_entropy(weights: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(weights > 0, weights * np.log(np.where(weights > 0, weights, 1.0)), 0.0), axis=-1)


def test_upsample_repeats_each_patch_weight_over_its_pixels() -> None:
    maps = torch.arange(2 * 9, dtype=torch.float64).reshape(2, 9)
    expected = np.stack([np.kron(row.reshape(3, 3), np.ones((4, 4))) for row in maps.numpy()])
    np.testing.assert_array_equal(upsample(maps, 4).numpy(), expected)
    with pytest.raises(ValueError, match="square patch grid"):
        upsample(torch.ones(1, 8), 2)


def test_the_most_peaked_latents_are_those_with_the_lowest_entropy() -> None:
    weights = torch.softmax(torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(3)) * 3, dim=-1)
    weights[1, 4] = torch.nn.functional.one_hot(torch.tensor(7), 10).float()  # as peaked as can be
    picked = pick_latents(weights, 3).numpy()
    expected = np.argsort(reference_entropy(weights.double().numpy()), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(picked, expected)
    assert picked[1, 0] == 4
    np.testing.assert_array_equal(pick_latents(weights, [5, 0]).numpy(), [[5, 0], [5, 0]])
    with pytest.raises(ValueError, match=r"latent indices \[6\] are out of range: the model has 6 latents"):
        pick_latents(weights, [0, 6])


@pytest.mark.parametrize(
    "overrides",
    [
        {"position_encoding": "learned"},
        {"position_encoding": "fourier", "fourier_num_bands": 4},
        {"position_encoding": "none"},
        {"patch_size": 1, "latent_dim": 6},
        {"permute_inputs": True, "permutation_seed": 5},
        {"weight_sharing": "none", "num_iterations": 3, "cross_attention_heads": 2},
    ],
    ids=["learned", "fourier", "none", "pixels", "permuted", "unshared-3-iterations-2-heads"],
)
def test_panels_are_the_models_attention_on_the_pixel_grid(overrides: dict) -> None:
    model, augment, images = make_model(**overrides), make_augment(), make_images()
    expected = reference_maps(model, augment, images)
    model.train()
    panels = attention_panels(model, augment, images, latents=2)
    assert model.training  # the mode is restored
    assert panels.cross_attends == list(range(len(expected))) and panels.images.shape == (3, 16, 16, 3)
    p = model.encoder.patch_size
    for reference, shown, maps in zip(expected, panels.latents, panels.maps, strict=True):
        assert maps.shape == (3, 3, 16, 16) and shown.shape == (3, 2)
        for b in range(3):
            for k, latent in enumerate(shown[b]):
                np.testing.assert_allclose(maps[b, k], reference[b, latent], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(maps[b, -1], reference[b].mean(axis=0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(maps.sum(axis=(-2, -1)), p * p, rtol=1e-5)  # each row of weights sums to 1
    assert panels.images.min() >= 0 and panels.images.max() <= 1


def test_the_image_panel_is_what_the_model_sees_before_normalising() -> None:
    """Resized like the preprocessing (bilinear, to the model's input size), in [0, 1]."""
    model, augment, images = make_model(), make_augment(), make_images()
    panels = attention_panels(model, augment, images, latents=1)
    resized = torch.nn.functional.interpolate(images.double(), size=(16, 16), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(panels.images, (resized / 255).permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_panels_leave_the_random_generators_alone() -> None:
    """Drawn at epoch ends of a run that must resume exactly: no random numbers may be drawn."""
    model, augment, images = make_model(), make_augment(), make_images()
    before = torch.get_rng_state()
    attention_panels(model, augment, images)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"position_encoding": "fourier", "fourier_num_bands": 4}, {"position_encoding": "none"}, {"patch_size": 1}],
    ids=["learned", "fourier", "none", "pixels"],
)
def test_draw_attention_writes_a_png(tmp_path: Path, overrides: dict) -> None:
    path = draw_attention(make_model(**overrides), make_augment(), make_images(2), tmp_path / "a" / "maps.png")
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        assert image.width > image.height  # one row per image, columns: image + 2 x (3 latents + mean)


def test_draw_attention_reads_image_files_and_takes_chosen_latents_and_cross_attends(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([(24, 20), (16, 16)]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", size, (40 * i, 200, 90)).save(files[-1])
    path = draw_attention(
        make_model(), make_augment(), files, tmp_path / "maps.png", labels=[1, 2], class_names=list("abcde"),
        latents=[0, 7], cross_attends=[1], title="chosen",
    )  # fmt: skip
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="cross-attends \\[2\\] are out of range"):
        draw_attention(make_model(), make_augment(), files, tmp_path / "x.png", cross_attends=[2])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt could not be read as an image"):
        draw_attention(make_model(), make_augment(), [tmp_path / "notes.txt"], tmp_path / "y.png")


def test_a_model_without_attention_maps_is_named() -> None:
    vit = ViT(image_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="ViT has no attention_maps"):
        attention_panels(vit, make_augment(), make_images())


def test_the_drawn_png_holds_each_panel_blended_as_specified(tmp_path: Path) -> None:
    """Pixels of the PNG against a hand computation: the image panel is the image; a map panel is the grey image
    under inferno with opacity 0.35 + 0.65 x (weight / the map's maximum)."""
    from matplotlib import colormaps

    from perceiver.experiment.figures import AttentionPanels, MosaicLayout, draw_panels

    side = 8
    image = np.zeros((1, side, side, 3))
    image[..., 0] = 1.0  # pure red: grey level 1/3
    heat = np.zeros((1, 2, side, side))
    heat[0, 0, :4] = 2.0  # top half hot (the map's maximum), bottom half cold
    heat[0, 1] = 1.0  # the mean panel: flat, so all at its maximum
    panels = AttentionPanels(image, [0], [np.array([[5]])], [heat], np.array([[0.1, 0.9]]))
    path = draw_panels(panels, tmp_path / "figure.png", labels=[1], class_names=["cat", "dog"], title="t")
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(float) / 255
    layout = MosaicLayout(side * round(128 / side), [1, 2], 1, True)
    assert pixels.shape[:2] == layout.size[::-1]

    def centre_of(group: int, column: int, row_offset: float) -> np.ndarray:
        left, top = layout.panel_box(0, group, column)
        return pixels[int(top + row_offset * layout.panel), left + layout.panel // 2]

    grey = np.full(3, 1 / 3)
    hot = np.array(colormaps["inferno"](1.0)[:3])
    cold = 0.35 * np.array(colormaps["inferno"](0.0)[:3]) + 0.65 * grey
    tolerance = 1.5 / 255  # one grey level of rounding
    np.testing.assert_allclose(centre_of(0, 0, 0.5), [1, 0, 0], atol=tolerance)
    np.testing.assert_allclose(centre_of(1, 0, 0.25), hot, atol=tolerance)
    np.testing.assert_allclose(centre_of(1, 0, 0.75), cold, atol=tolerance)
    np.testing.assert_allclose(centre_of(1, 1, 0.75), hot, atol=tolerance)
