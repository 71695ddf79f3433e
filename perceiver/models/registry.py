"""The one list of this project's models, kept as timm keeps its own: each model class registers itself with
`@register_model`, and whatever turns a name into a model (a config's `_target_` when building, a model file
when loading a trained run) looks it up here."""

from __future__ import annotations

from torch import nn

_MODELS: dict[str, type[nn.Module]] = {}


def register_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: `perceiver.models.<Name>` becomes a model that configs and model files may name."""
    _MODELS[cls.__name__] = cls
    return cls


def registered_models() -> list[type[nn.Module]]:
    return list(_MODELS.values())


def registered_class(target: object) -> type[nn.Module] | None:
    """The registered class a `_target_` names (`perceiver.models.<Name>` or its module's path), else None."""
    module, _, name = str(target).rpartition(".")
    return _MODELS.get(name) if module.startswith("perceiver.models") else None
