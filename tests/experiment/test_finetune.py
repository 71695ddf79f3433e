"""`init_from`: a new run that starts from a trained run's weights. It learns faster than a fresh run, adapts to
another number of classes (the last classifier layer starts afresh, with a warning) and another image size (the
learned position embedding is interpolated, and the log says so), and refuses anything else naming the fields."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from perceiver.experiment.config import ConfigError
from perceiver.experiment.finetune import start_from
from perceiver.models import Perceiver, ViT
from perceiver.models.transfer import transfer_weights
from tests.helpers import isolated, run_script
from tests.helpers.runs import train_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    with isolated(root):
        train_run(root / "run")
        yield root / "run"


@pytest.fixture(scope="module")
def best(run_dir: Path) -> dict:
    return torch.load(run_dir / "best.pt", weights_only=True)


def val_loss_after_one_epoch(run_dir: Path, *overrides: str) -> tuple[float, dict]:
    result = run_script(
        "train.py", "experiment=cpu_smoke", "trainer.epochs=1", "logger=none", f"hydra.run.dir={run_dir}", *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics["history"][0]["val/loss"], metrics


@pytest.mark.slow
def test_a_run_from_trained_weights_validates_better_after_one_epoch(run_dir: Path, tmp_path: Path) -> None:
    fresh, _ = val_loss_after_one_epoch(tmp_path / "fresh")
    tuned, metrics = val_loss_after_one_epoch(tmp_path / "tuned", f"init_from={run_dir}")
    assert tuned < fresh, (tuned, fresh)
    assert metrics["settings"]["init_from"] == str(run_dir)
    assert "init_from" in (tmp_path / "tuned" / "config.yaml").read_text()


def built(best: dict, **changes: object) -> tuple[torch.nn.Module, dict]:
    config = {**best["model_config"], **changes}
    torch.manual_seed(0)
    return Perceiver(**{k: v for k, v in config.items() if k != "_target_"}), config


def test_the_same_model_gets_every_tensor(run_dir: Path, best: dict) -> None:
    model, config = built(best)
    start_from(str(run_dir), model, config)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, best["model"][name], rtol=0, atol=0, msg=name)


def test_other_classes_reinitialise_the_last_classifier_layer(
    run_dir: Path, best: dict, caplog: pytest.LogCaptureFixture
) -> None:
    model, config = built(best, num_classes=4)
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        start_from(str(run_dir), model, config)
    for name, tensor in model.state_dict().items():
        expected = fresh[name] if name.startswith("head.2.") else best["model"][name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "10 classes, this run 4" in warning.getMessage() and "head.2.weight" in warning.getMessage()


def test_another_image_size_interpolates_the_position_embedding(
    run_dir: Path, best: dict, caplog: pytest.LogCaptureFixture
) -> None:
    model, config = built(best, image_size=32)  # patch 4: a 4x4 grid becomes 8x8
    with caplog.at_level(logging.INFO):
        start_from(str(run_dir), model, config)
    old = best["model"]["encoder.position_embedding.weight"]  # (16, D), row-major over the 4x4 grid
    grid = old.T.reshape(1, -1, 4, 4)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).reshape(-1, 64).T
    torch.testing.assert_close(model.encoder.position_embedding.weight.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.latents.detach(), best["model"]["latents"], rtol=0, atol=0)
    assert any("from a 4x4 to a 8x8 patch grid" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"patch_size": 2}, ["model.patch_size=2 differs from the trained model's 4", "keep model.patch_size=4"]),
        ({"projection_dim": 64}, ["model.projection_dim (32 there, 64 here)", "have other shapes", "latents (16, 32)"]),
        ({"num_iterations": 3, "weight_sharing": "none"}, ["model.weight_sharing ('all' there, 'none' here)"]),
    ],
)
def test_other_architectures_are_refused_naming_the_fields(
    run_dir: Path, best: dict, changes: dict, words: list[str]
) -> None:
    model, config = built(best, **changes)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ConfigError) as caught:
        start_from(str(run_dir), model, config)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed although the weights were refused"


def test_another_model_type_is_refused(run_dir: Path) -> None:
    config = {"_target_": "perceiver.models.ViT", "image_size": 16, "patch_size": 4, "num_classes": 10}
    with pytest.raises(
        ConfigError, match=r"holds a perceiver\.models\.Perceiver, this run trains a perceiver\.models\.ViT"
    ):
        start_from(
            str(run_dir), ViT(image_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=1, num_heads=2), config
        )


def test_a_vits_position_embedding_is_interpolated_past_its_class_token() -> None:
    torch.manual_seed(0)
    small = ViT(image_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2)
    large = ViT(image_size=32, patch_size=4, num_classes=5, embed_dim=32, depth=1, num_heads=2)
    done = transfer_weights(small.state_dict(), large)
    assert done.interpolated == [("vit.pos_embed", 4, 8)] and set(done.reinitialised) == {
        "vit.head.weight",
        "vit.head.bias",
    }
    old, new = small.vit.pos_embed.detach(), large.vit.pos_embed.detach()
    torch.testing.assert_close(new[:, :1], old[:, :1], rtol=0, atol=0)  # the class token's embedding is kept
    grid = old[0, 1:].T.reshape(1, 32, 4, 4)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).reshape(32, 64).T
    torch.testing.assert_close(new[0, 1:], expected, rtol=0, atol=1e-6)


def test_weights_from_a_wandb_artifact_come_through_the_runs_tracker(run_dir: Path, best: dict, tmp_path: Path) -> None:
    downloaded = tmp_path / "artifact"
    shutil.copytree(run_dir, downloaded, ignore=shutil.ignore_patterns("checkpoints", "last.pt", "wandb"))
    asked = []
    tracker = SimpleNamespace(use_artifact=lambda reference: asked.append(reference) or downloaded)
    model, config = built(best)
    path = start_from("wandb:team/perceiver/model-abc123:v0", model, config, tracker)
    assert asked == ["team/perceiver/model-abc123:v0"] and path == downloaded / "best.pt"
    torch.testing.assert_close(model.latents.detach(), best["model"]["latents"], rtol=0, atol=0)


def test_an_artifact_that_cannot_be_had_is_a_one_line_error(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no W&B login anywhere
    with pytest.raises(
        ConfigError, match=r"init_from=wandb:team/p/model-x:v0: the W&B artifact .* cannot be downloaded"
    ):
        train_run(tmp_path / "run", "init_from=wandb:team/p/model-x:v0", "trainer.epochs=1")


def test_a_missing_init_from_is_refused_before_the_data_is_loaded(tmp_path: Path) -> None:
    from perceiver.training import CheckpointError

    with pytest.raises(CheckpointError, match="no-such-run does not exist"):
        train_run(tmp_path / "run", f"init_from={tmp_path / 'no-such-run'}")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_resuming_a_fine_tuned_run_does_not_need_its_source_again(run_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(run_dir, source)
    target = tmp_path / "tuned"
    train_run(target, f"init_from={source}", "trainer.epochs=1")
    (target / "metrics.json").unlink()  # as if it had been stopped before the end
    shutil.rmtree(source)
    metrics = train_run(target, f"init_from={source}", "trainer.epochs=2", f"resume={target}")
    assert metrics["epochs_run"] == 2
