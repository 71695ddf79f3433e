"""`perceiver.training.optimizers.create_optimizer` builds what timm's `create_optimizer_v2` builds, for every
config in conf/optimizer/, on both models: the same class, defaults and parameter groups (checkpoints stay
interchangeable), and a step that moves the weights the same way."""

from __future__ import annotations

import pytest
import torch
import yaml
from timm.optim import create_optimizer_v2

from perceiver.models import Perceiver, ViT
from perceiver.training.optimizers import create_optimizer
from tests.helpers import CONF

CONFIGS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))


def settings(name: str) -> dict:
    fields = yaml.safe_load((CONF / "optimizer" / f"{name}.yaml").read_text())
    assert fields.pop("_target_") == "perceiver.training.optimizers.create_optimizer" and fields.pop("_partial_")
    return fields


def small_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        return ViT(image_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2)
    return Perceiver(image_size=16, patch_size=4, num_classes=3, latent_dim=8, projection_dim=16, num_heads=2,
                     key_dim=8, num_transformer_blocks=1)  # fmt: skip


def groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [id(p) for p in group["params"]]}
        for group in optimizer.param_groups
    ]


@pytest.mark.parametrize("kind", ["perceiver", "vit"])
@pytest.mark.parametrize("name", CONFIGS)
def test_each_optimizer_config_builds_what_timm_builds(name: str, kind: str) -> None:
    model = small_model(kind)
    ours, timms = create_optimizer(model, **settings(name)), create_optimizer_v2(model, **settings(name))
    assert type(ours) is type(timms) and ours.defaults == timms.defaults
    assert groups(ours) == groups(timms)
    if settings(name)["weight_decay"]:
        assert len(ours.param_groups) == 2 and ours.param_groups[0]["weight_decay"] == 0.0  # biases, norms
    twin = small_model(kind)
    for optimizer, net in ((ours, model), (create_optimizer_v2(twin, **settings(name)), twin)):
        net.eval()(torch.ones(2, 3, 16, 16)).sum().backward()  # eval: no dropout draws between the two
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_other_names_are_timms() -> None:
    optimizer = create_optimizer(small_model("perceiver"), "lamb", lr=1e-3, weight_decay=1e-4)
    assert type(optimizer).__module__.startswith("timm.")
