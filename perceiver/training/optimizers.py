"""Optimizers by name, as timm's `create_optimizer_v2` makes them, without importing timm for the ones torch has.

Importing timm imports all of its models and torchvision with them: 1.5-5 s of every run's start-up
(docs/benchmarks.md, "Start-up"), to build an Adam. For `adam`, `adamw` and `sgd` this builds the same optimizer
timm would (its parameter groups, defaults and argument handling; tests/training/test_optimizers.py compares them);
every other name (`lamb`, `lookahead_adam`, ...) goes to timm itself.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

# name -> (torch class, defaults timm adds, whether timm passes momentum, whether it accepts eps and betas)
NATIVE: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], bool, bool]] = {
    "adam": (torch.optim.Adam, {}, False, True),
    "adamw": (torch.optim.AdamW, {}, False, True),
    "sgd": (torch.optim.SGD, {"nesterov": True}, True, False),  # timm's `sgd` is Nesterov momentum
}


def param_groups_weight_decay(model: nn.Module, weight_decay: float, exclude_1d: bool = True) -> list[dict]:
    """timm's grouping: no decay for biases, 1-d weights (norms) and the model's `no_weight_decay()` names;
    the no-decay group first. Without weight decay, every trainable parameter in one group."""
    patterns = getattr(model, "no_weight_decay", lambda: set())()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = exclude_1d and (param.ndim <= 1 or name.endswith(".bias"))
        if not weight_decay or excluded or any(fnmatch.fnmatch(name, p) for p in patterns):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
    return groups + ([{"params": decay, "weight_decay": weight_decay}] if decay else [])


def create_optimizer(
    model: nn.Module,
    opt: str,
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    filter_bias_and_bn: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`timm.optim.create_optimizer_v2(model, opt, ...)`: the same optimizer, with timm imported only when the
    name is not one torch has."""
    if opt.lower() not in NATIVE:
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(
            model, opt, lr=lr, weight_decay=weight_decay, momentum=momentum, filter_bias_and_bn=filter_bias_and_bn,
            **kwargs,
        )  # fmt: skip
    optimizer_class, defaults, has_momentum, has_eps_and_betas = NATIVE[opt.lower()]
    arguments: dict[str, Any] = {"weight_decay": 0.0, **kwargs}  # the groups carry the decay
    if lr is not None:
        arguments["lr"] = lr
    for key, value in defaults.items():
        arguments.setdefault(key, value)
    if has_momentum:
        arguments.setdefault("momentum", momentum)
    if not has_eps_and_betas:
        arguments.pop("eps", None)
        arguments.pop("betas", None)
    return optimizer_class(param_groups_weight_decay(model, weight_decay, filter_bias_and_bn), **arguments)
