"""RandAugment on the device: the same policy as timm's per-image path, the same draws in distribution, and every
operation equal to an independent reference (torchvision's v2 functional ops on single images, timm's PIL ops)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data import auto_augment as timm_aa
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from perceiver.data import DeviceBatches, make_loader
from perceiver.data.augment import BatchAugment
from perceiver.data.dataset import ArrayDataset
from perceiver.data.randaugment import HPARAMS, OPERATIONS, DeviceRandAugment, level_argument, timm_policy
from perceiver.experiment.build import build_parts, load_data, make_loaders

CONFIG = "rand-m9-mstd0.5"
FILL = list(HPARAMS["img_mean"])
BILINEAR = InterpolationMode.BILINEAR


def random_images(count: int = 24, height: int = 12, width: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)
    images[:4] = images[:4] // 3 + 40  # low-contrast images, where autocontrast and equalize do most
    return images


def timm_argument(name: str, magnitude: float, negate: bool) -> tuple:
    """timm's own level-to-argument formula, with its random sign forced."""
    level = timm_aa.LEVEL_TO_ARG[name]
    if level is None:
        return ()
    original = random.random
    random.random = (lambda: 1.0) if negate else (lambda: 0.0)  # _randomly_negate: -v if random() > 0.5
    try:
        return level(magnitude, dict(HPARAMS))
    finally:
        random.random = original


def torchvision_reference(name: str, image: torch.Tensor, argument: tuple) -> torch.Tensor:
    """What torchvision's v2 functional API gives for one image (timm's PIL op where torchvision has none)."""
    height, width = image.shape[-2:]
    value = argument[0] if argument else None
    if name == "Rotate":
        return TF.rotate(image, value, BILINEAR, fill=FILL)
    if name in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(value))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return TF.affine(image, 0.0, [0.0, 0.0], 1.0, shear, BILINEAR, FILL, center=[0.0, 0.0])
    if name in ("TranslateXRel", "TranslateYRel"):  # timm moves the content by -pct x size
        shift = [-value * width, 0.0] if name == "TranslateXRel" else [0.0, -value * height]
        return TF.affine(image, 0.0, shift, 1.0, [0.0, 0.0], BILINEAR, FILL)
    if name == "Solarize" and value > 255:
        return image.clone()  # a threshold of 256 leaves every value (torchvision refuses it)
    if name == "SolarizeAdd":
        return pil_op(name, image, argument)
    plain = {
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
        "Posterize": lambda: TF.posterize(image, int(value)),
        "Solarize": lambda: TF.solarize(image, float(value)),
        "Color": lambda: TF.adjust_saturation(image, value),
        "Contrast": lambda: TF.adjust_contrast(image, value),
        "Brightness": lambda: TF.adjust_brightness(image, value),
        "Sharpness": lambda: TF.adjust_sharpness(image, value),
    }
    return plain[name]()


def pil_op(name: str, image: torch.Tensor, argument: tuple, resample=Image.BILINEAR) -> torch.Tensor:
    """timm's PIL operation on one image."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    out = timm_aa.NAME_TO_OP[name](pil, *argument, fillcolor=tuple(FILL), resample=resample)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def per_image_magnitudes(count: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    magnitude = 2.5 + 7.5 * torch.rand(count, dtype=torch.float64, generator=generator)  # PIL posterizes >= 1 bit
    return magnitude, torch.rand(count, generator=generator) < 0.5


# ----------------------------------------------------------------------------- one policy, one set of draws


def test_device_policy_is_timms_parsed_policy() -> None:
    """Both backends parse the string with timm: the same operations, probabilities and magnitude settings."""
    timm_transform = timm_aa.rand_augment_transform(CONFIG, dict(HPARAMS))
    policy = DeviceRandAugment(CONFIG).policy
    assert policy.names == tuple(op.name for op in timm_transform.ops)
    assert policy.probs == tuple(op.prob for op in timm_transform.ops)
    assert policy.num_layers == timm_transform.num_layers and policy.choice_weights is None
    # and what timm's documentation says rand-m9-mstd0.5 is: 2 of its 15 operations, each applied half the time
    assert set(policy.names) == set(timm_aa._RAND_TRANSFORMS) and len(policy.names) == 15
    assert policy.probs == (0.5,) * 15 and policy.num_layers == 2
    assert (policy.magnitude, policy.magnitude_std, policy.magnitude_max) == (9.0, 0.5, 10.0)


def record_timm_draws(count: int) -> tuple[Counter, list[float]]:
    """Run timm's RandAugment on `count` images with its operations replaced by recorders: which operations ran,
    and the magnitudes behind their arguments (recovered from Rotate, Shear and the enhance operations)."""
    transform = timm_aa.rand_augment_transform(CONFIG, dict(HPARAMS))
    applied: Counter = Counter()
    magnitudes: list[float] = []
    inverse = {"Rotate": lambda a: abs(a) / 3.0, "ShearX": lambda f: abs(f) / 0.03, "Color": lambda f: (f - 0.1) / 0.18}

    def recorder(name: str):
        def record(image, *argument, **_):
            applied[name] += 1
            if name in inverse:
                magnitudes.append(inverse[name](argument[0]))
            return image

        return record

    for op in transform.ops:
        op.aug_fn = recorder(op.name)
    random.seed(0)
    np.random.seed(0)
    image = Image.new("RGB", (4, 4))
    for _ in range(count):
        transform(image)
    return applied, magnitudes


def test_device_draws_the_same_operations_as_timm_with_the_same_frequencies() -> None:
    count = 6000
    timm_counts, timm_magnitudes = record_timm_draws(count)
    augment = DeviceRandAugment(CONFIG)
    torch.manual_seed(0)
    draw = augment.draw(count, torch.device("cpu"))
    names = augment.policy.names
    device_counts = Counter(names[i] for i in draw.operation[draw.applied].tolist())
    assert set(device_counts) == set(timm_counts) == set(names)
    expected = count * 2 * 0.5 / 15  # two layers, each operation 1/15 of the choices, applied half the time
    for name in names:  # within 5 binomial standard deviations of the expectation, for both
        for counts in (device_counts, timm_counts):
            assert abs(counts[name] - expected) < 5 * math.sqrt(expected), (name, counts[name], expected)
    assert abs(draw.applied.float().mean().item() - 0.5) < 0.02
    # magnitudes: N(9, 0.5) clipped to [0, 10] in both; a mean of ~9 and a std of ~0.5
    device_magnitudes = draw.magnitude[draw.applied].numpy()
    assert device_magnitudes.min() >= 0.0 and device_magnitudes.max() <= 10.0
    for values in (device_magnitudes, np.array(timm_magnitudes)):
        assert abs(values.mean() - 9.0) < 0.05 and abs(values.std() - 0.5) < 0.05
    assert abs(np.mean(device_magnitudes) - np.mean(timm_magnitudes)) < 0.05
    assert abs(draw.negate.float().mean().item() - 0.5) < 0.02


def test_weighted_policies_draw_distinct_operations_per_image_like_timm() -> None:
    """timm's weighted policies choose without replacement: no image gets one operation twice."""
    augment = DeviceRandAugment("rand-m9-n3-tweights")
    assert augment.policy.choice_weights is not None and augment.policy.num_layers == 3
    draw = augment.draw(500, torch.device("cpu"))
    assert all(len(set(row)) == 3 for row in draw.operation.tolist())


# ----------------------------------------------------------------------------- each operation against a reference


@pytest.mark.parametrize("name", timm_aa._RAND_TRANSFORMS)
def test_each_device_operation_equals_torchvision_on_single_images(name: str) -> None:
    """Per-image magnitudes and signs through timm's level formulas, one batched call, against torchvision (or
    timm's PIL op for SolarizeAdd, which torchvision lacks) applied to each image alone with timm's argument."""
    images = random_images()
    magnitude, negate = per_image_magnitudes(len(images))
    policy = timm_policy(CONFIG)
    argument = level_argument(name, magnitude, negate, policy)
    batched = OPERATIONS[name].apply(images, argument, policy)
    assert batched.dtype == torch.uint8 and batched.shape == images.shape
    for i, image in enumerate(images):
        timm_arg = timm_argument(name, float(magnitude[i]), bool(negate[i]))
        if timm_arg:
            assert float(argument[i]) == pytest.approx(timm_arg[0], abs=1e-9)
        assert torch.equal(batched[i], torchvision_reference(name, image, timm_arg)), f"{name}, image {i}"


@pytest.mark.parametrize(
    "name",
    ["AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness",
     "Sharpness"],
)  # fmt: skip
def test_colour_operations_are_timms_pil_operations_up_to_rounding(name: str) -> None:
    images = random_images()
    magnitude, negate = per_image_magnitudes(len(images))
    policy = timm_policy(CONFIG)
    batched = OPERATIONS[name].apply(images, level_argument(name, magnitude, negate, policy), policy)
    for i, image in enumerate(images):
        reference = pil_op(name, image, timm_argument(name, float(magnitude[i]), bool(negate[i])))
        assert (batched[i].int() - reference.int()).abs().max() <= 1, f"{name}, image {i}"


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_geometric_operations_move_the_content_the_way_timms_pil_operations_do(name: str) -> None:
    """Same argument: close to timm's PIL result; the opposite sign: far from it (directions agree)."""
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, 4:12, 2:6] = 255  # an off-centre bar
    policy = timm_policy(CONFIG)
    magnitude = torch.tensor([8.0], dtype=torch.float64)
    for negate in (False, True):
        argument = level_argument(name, magnitude, torch.tensor([negate]), policy)
        opposite = level_argument(name, magnitude, torch.tensor([not negate]), policy)
        reference = pil_op(name, image, timm_argument(name, 8.0, negate)).float()
        same = OPERATIONS[name].apply(image[None], argument, policy)[0].float()
        other = OPERATIONS[name].apply(image[None], opposite, policy)[0].float()
        assert (same - reference).abs().mean() < 6 < (other - reference).abs().mean()


# ----------------------------------------------------------------------------- in the pipeline


def test_randaugment_batches_stay_on_the_device_path_and_are_augmented_per_image() -> None:
    augment = BatchAugment(12, 3, hflip=False, zoom=0.0, randaugment=CONFIG, randaugment_backend="device")
    assert augment.sample_transform() is None  # no per-sample work: make_loader keeps the device-resident path
    data = ArrayDataset(random_images(count=64), torch.zeros(64, dtype=torch.long))
    assert isinstance(make_loader(data, 16, torch.device("cpu"), shuffle=True, sample_transform=None), DeviceBatches)
    torch.manual_seed(0)
    out, labels = augment(data.images, data.labels)
    assert out.dtype == torch.float32 and out.shape == (64, 3, 12, 12) and torch.equal(labels, data.labels)
    plain = augment.preprocess(data.images)
    changed = [not torch.equal(out[i], plain[i]) for i in range(64)]
    assert 40 < sum(changed) < 64  # each image its own draw: most change, some draw two skips (1/4)
    torch.manual_seed(0)
    assert torch.equal(augment(data.images, data.labels)[0], out)  # seeded by the run's torch seed


def test_the_randaugment_config_trains_on_device_batches(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config("experiment=cpu_smoke", "augmentation=randaugment", "logger=none")
    assert cfg.augmentation.randaugment_backend == "device"
    parts = build_parts(cfg)
    train_loader, _, _ = make_loaders(load_data(cfg, parts), parts, seed=0)
    assert isinstance(train_loader, DeviceBatches) and parts.augment.device_randaugment is not None
    timm_cfg = compose_config(
        "experiment=cpu_smoke", "augmentation=randaugment", "augmentation.randaugment_backend=timm"
    )
    timm_parts = build_parts(timm_cfg)
    assert not isinstance(make_loaders(load_data(timm_cfg, timm_parts), timm_parts, seed=0)[0], DeviceBatches)


def test_timm_backend_keeps_the_per_image_pil_path() -> None:
    augment = BatchAugment(image_size=8, num_classes=3, randaugment=CONFIG, randaugment_backend="timm")
    assert augment.device_randaugment is None and augment.sample_transform() is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"randaugment": "rnd-m9"}, "randaugment='rnd-m9' is invalid"),
        (
            {"randaugment": "rand-m9-t3a", "randaugment_backend": "device"},
            "randaugment_backend=timm",
        ),  # GaussianBlur, Desaturate: timm only
        ({"randaugment": CONFIG, "randaugment_backend": "gpu"}, "randaugment_backend='gpu' is invalid"),
    ],
)
def test_bad_randaugment_settings_are_refused_up_front(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BatchAugment(image_size=8, num_classes=3, **overrides)
