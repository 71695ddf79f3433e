"""Starting a model from another one's weights (fine-tuning): every tensor that fits is copied; the layer that
produces the logits starts afresh when the number of classes differs; a learned position embedding made for
another patch grid (another image size) is interpolated to this one, as timm resizes a ViT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from perceiver.models.perceiver import Perceiver
from perceiver.models.vit import ViT


@dataclass
class Transfer:
    """What `transfer_weights` did with each tensor of the model."""

    copied: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # the classifier's last layer, for other classes
    interpolated: list[tuple[str, int, int]] = field(default_factory=list)  # (key, old grid side, new grid side)
    kept: list[str] = field(default_factory=list)  # the model's own fixed input permutation, for another grid


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the layer that produces the logits (whose shape follows the number of classes)."""
    if isinstance(model, ViT):
        prefix = "vit.head"
    else:
        linears = [name for name, module in model.head.named_modules() if isinstance(module, nn.Linear)]
        prefix = f"head.{linears[-1]}"
    return {f"{prefix}.weight", f"{prefix}.bias"}


def position_embedding_key(model: nn.Module) -> tuple[str, int] | None:
    """(state-dict key, number of prefix tokens) of a learned position embedding over the patch grid, if any."""
    if isinstance(model, ViT):
        return "vit.pos_embed", model.vit.num_prefix_tokens
    if isinstance(model, Perceiver) and model.encoder.position_embedding is not None:
        return "encoder.position_embedding.weight", 0
    return None


def resample_position_embedding(embedding: torch.Tensor, tokens: int, prefix: int) -> torch.Tensor:
    """A (M, D) or (1, prefix + M, D) embedding over a square grid, bicubically resized to `tokens` grid cells."""
    from timm.layers import resample_abs_pos_embed  # here: importing timm imports wandb when it is installed

    batched = embedding if embedding.ndim == 3 else embedding.unsqueeze(0)
    old, new = math.isqrt(batched.shape[1] - prefix), math.isqrt(tokens)
    resized = resample_abs_pos_embed(batched, [new, new], [old, old], num_prefix_tokens=prefix)
    return resized if embedding.ndim == 3 else resized[0]


def transfer_weights(source: dict[str, torch.Tensor], model: nn.Module) -> Transfer:
    """Load `source` (another model's state dict) into `model` wherever it fits; ValueError naming every tensor
    that neither fits nor can be adapted (another architecture), before anything is changed."""
    target = model.state_dict()
    absent, extra = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    if absent or extra:
        raise ValueError(
            f"the weights are another architecture's: {len(absent)} tensor(s) missing ({', '.join(absent[:5])}) "
            f"and {len(extra)} unknown ({', '.join(extra[:5])})"
        )
    heads, position = classifier_keys(model), position_embedding_key(model)
    done, loaded, misfits = Transfer(), {}, []
    for key, tensor in target.items():
        old = source[key]
        if old.shape == tensor.shape:
            loaded[key] = old
            done.copied.append(key)
        elif key in heads:
            done.reinitialised.append(key)
        elif position is not None and key == position[0] and old.shape[-1] == tensor.shape[-1]:
            prefix = position[1]
            loaded[key] = resample_position_embedding(old, tensor.shape[-2] - prefix, prefix)
            grids = (math.isqrt(old.shape[-2] - prefix), math.isqrt(tensor.shape[-2] - prefix))
            done.interpolated.append((key, *grids))
        elif key.endswith("permutation.index"):
            done.kept.append(key)
        else:
            misfits.append(f"{key} {tuple(old.shape)} -> {tuple(tensor.shape)}")
    if misfits:
        more = " ..." if len(misfits) > 3 else ""
        raise ValueError(f"{len(misfits)} tensor(s) have other shapes ({'; '.join(misfits[:3])}{more})")
    model.load_state_dict({**target, **loaded})
    return done
