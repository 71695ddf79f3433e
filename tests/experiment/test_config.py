"""Every config option composes and builds; bad settings fail before any work with a clear message."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from perceiver import Perceiver, ViT
from perceiver.experiment.build import build_parts
from perceiver.experiment.config import ConfigError, allowed_target, check_targets
from tests.helpers import CONF, REPO, environment, write_image_folder

GROUPS = ["model", "data", "augmentation", "optimizer", "scheduler", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def image_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    names = [f"class{c}" for c in range(classes)]
    return write_image_folder(root, names, per_class, (12, 10), lambda c, i: (40 * c, 20 * i, 100))


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(
    compose_config: Callable[..., DictConfig], tmp_path: Path, group: str, option: str
) -> None:
    overrides = [f"{group}={option}"]
    if group != "experiment":
        overrides.insert(0, "experiment=cpu_smoke")  # tiny model: builds in milliseconds
    if group == "data" and option == "imagefolder":
        overrides.append(f"data.source.path={image_folder(tmp_path / 'images')}")
    cfg = compose_config(*overrides)
    parts = build_parts(cfg)
    assert isinstance(parts.model, Perceiver | ViT)
    assert parts.model.num_classes == parts.num_classes == parts.source.num_classes
    assert parts.optimizer.param_groups and parts.scheduler is not None


def test_defaults_are_the_keras_recipe(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config()
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.latent_dim, cfg.model.projection_dim) == (
        64,
        2,
        256,
        256,
    )
    assert (cfg.model.num_heads, cfg.model.num_transformer_blocks, cfg.model.num_iterations) == (8, 4, 2)
    assert cfg.model.dropout_rate == 0.2 and cfg.trainer.batch_size == 64
    assert cfg.optimizer.opt == "adam" and cfg.optimizer.lr == 1e-3
    assert cfg.scheduler.factor == 0.2 and cfg.trainer.early_stopping_patience == 15
    assert cfg.data.source.name == "cifar100" and cfg.data.val_fraction == 0.1
    assert compose_config("experiment=keras_cifar100").model == cfg.model


def test_latent_dim_override_means_number_of_latents(compose_config: Callable[..., DictConfig]) -> None:
    parts = build_parts(compose_config("experiment=cpu_smoke", "model.latent_dim=512"))
    assert parts.model.num_latents == 512


def test_imagefolder_takes_its_class_count_from_the_folder(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    folder = image_folder(tmp_path / "images", classes=4)
    parts = build_parts(compose_config("experiment=cpu_smoke", "data=imagefolder", f"data.source.path={folder}"))
    assert parts.num_classes == 4


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.image_size=30", "model.patch_size=4"], ["model.image_size=30", "patch_size=4", "divisible"]),
        (["model.latent_dim=0"], ["model.latent_dim=0", "positive integer"]),
        (["model.projection_dim=-8"], ["model.projection_dim=-8"]),
        (["model.num_iterations=abc"], ["model.num_iterations='abc'"]),
        (["model.cross_attention_heads=5"], ["model.cross_attention_heads=5", "projection_dim=32"]),
        (["model.position_encoding=sinusoid"], ["position_encoding='sinusoid'", "fourier"]),
        (["model.num_classes=7"], ["model.num_classes=7", "10 classes"]),
        (["trainer.epochs=0"], ["trainer.epochs=0"]),
        (["trainer.batch_size=-1"], ["trainer.batch_size=-1"]),
        (["trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16"]),
        (["trainer.device=tpu"], ["trainer.device='tpu'"]),
        (["logger.mode=sometimes"], ["logger.mode='sometimes'", "offline"]),
        (["augmentation.zoom=1.5"], ["augmentation.zoom=1.5"]),
        (["data.source.num_train=0"], ["data.source.num_train=0"]),
        (["data.val_fraction=1.5"], ["data.val_fraction=1.5", "(0, 1)"]),
        (["seed=abc"], ["seed='abc'"]),
        (["optimizer.lr=-1"], ["optimizer.lr=-1", "positive number"]),  # issue 21: named, before the model is built
        (["optimizer.opt=adamx"], ["optimizer: Optimizer adamx not found"]),
        (["+trainer.epoch=3"], ["unknown trainer setting(s) epoch", "epochs"]),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_field(
    compose_config: Callable[..., DictConfig], overrides: list[str], words: list[str]
) -> None:
    cfg = compose_config("experiment=cpu_smoke", *overrides)
    with pytest.raises(ConfigError) as error:
        build_parts(cfg)
    for word in words:
        assert word in str(error.value)


def test_missing_image_folder_is_named(compose_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    cfg = compose_config("experiment=cpu_smoke", "data=imagefolder", f"data.source.path={missing}")
    with pytest.raises(ConfigError, match="no-such-folder"):
        build_parts(cfg)


def test_cifar_without_download_and_without_files_fails_before_any_work(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config("data=cifar100", "data.source.download=false", f"paths.data_root={tmp_path}")
    with pytest.raises(ConfigError) as error:
        build_parts(cfg)
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message and "data=synthetic" in message


def test_unknown_group_option_is_hydras_error(compose_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(MissingConfigException, match="optimizer"):
        compose_config("optimizer=adamax_typo")


@pytest.mark.slow
def test_hydras_compose_api_composes_the_config_in_a_fresh_interpreter_and_builds_the_default_model() -> None:
    """A notebook's or a script's way in: nothing of this project imported first (Hydra's plugin scan registers
    the trainer schema). 9,697,637 parameters: the Keras example's count for its CIFAR-100 model."""
    code = textwrap.dedent(
        f"""
        from hydra import compose, initialize_config_dir
        from hydra.errors import ConfigCompositionException
        from hydra.utils import instantiate

        with initialize_config_dir(config_dir={str(CONF)!r}, version_base=None):
            cfg = compose("train")
            try:
                compose("train", overrides=["trainer.epochs=abc"])
                checked = "unchecked"
            except ConfigCompositionException:
                checked = "checked"  # the schema's type for trainer.epochs
        model = instantiate(cfg.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(type(model).__module__, type(model).__name__, trainable, cfg.trainer.epochs, checked)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["perceiver.models.perceiver", "Perceiver", "9697637", "50", "checked"]


def test_every_target_the_configs_name_may_be_read_back_from_a_file() -> None:
    """A checkpoint's config is checked against the allowlist on resume: every `_target_` of conf/ must pass."""
    named = {m for path in CONF.rglob("*.yaml") for m in re.findall(r"_target_:\s*(\S+)", path.read_text())}
    assert len(named) >= 10 and [t for t in sorted(named) if not allowed_target(t)] == []


@pytest.mark.parametrize(
    "target",
    [
        "builtins.open",
        "pathlib.Path.unlink",
        "os.remove",
        "perceiver.files.os.remove",  # a module attribute that is os.remove
        "perceiver.models.perceiver.torch.save",
        "perceiver.files.write_text_atomic",  # this project's, but a function that writes a file it is given
        "torch.optim.lr_scheduler.os.system",
        "perceiver",
        "no.such.module",
    ],
)
def test_a_config_from_a_file_may_not_name_other_code(target: str) -> None:
    assert not allowed_target(target)
    with pytest.raises(ConfigError, match=f"scheduler._target_='{re.escape(target)}' is refused"):
        check_targets({"model": {"_target_": "perceiver.models.Perceiver"}, "scheduler": {"_target_": target}}, "x")
