"""Argument checks shared by the models: each error names the argument, its value and what is valid."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def positive_integers(args: Mapping[str, object], names: Iterable[str]) -> None:
    for name in names:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")


def booleans(args: Mapping[str, object], names: Iterable[str]) -> None:
    """On/off switches: a YAML `yes` or a string "true" is refused rather than read as truthy."""
    for name in names:
        value = args[name]
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is invalid: it must be true or false")


def rates(args: Mapping[str, object], names: Iterable[str]) -> None:
    """Dropout-like probabilities in [0, 1)."""
    for name in names:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} is invalid: it must be a number in [0, 1)")


def patches_tile(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
        raise ValueError(
            f"image_size={image_size} is not divisible by patch_size={patch_size}: "
            f"patches must tile the image; valid patch sizes for {image_size} are {divisors}"
        )


def heads_divide(heads_name: str, heads: int, width_name: str, width: int, attention: str) -> None:
    if width % heads:
        raise ValueError(
            f"{heads_name}={heads} does not divide {width_name}={width}: {attention} "
            f"splits {width_name} across its heads; choose a divisor of {width}"
        )
