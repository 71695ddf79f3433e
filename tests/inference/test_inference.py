"""A trained run through the Python API: best.pt describes its model, `perceiver.load_run` gives a classifier that
feeds any images to it exactly as training's evaluation did, `save_pretrained`/`from_pretrained` and `export`
round-trip it, and every unusable path or file is refused with a message that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import perceiver
from perceiver.data import SyntheticSource, split_indices
from perceiver.inference import Classifier, check_export, export, load_run
from perceiver.models import Perceiver
from perceiver.training import CheckpointError
from tests.helpers import isolated
from tests.helpers.runs import train_run

SIDE = 32  # the synthetic data's side (data.source.image_size); the model sees 16 (cpu_smoke's model.image_size)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inference")
    with isolated(root):
        train_run(root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def best(run_dir: Path) -> dict:
    return torch.load(run_dir / "best.pt", weights_only=True)


@pytest.fixture(scope="module")
def classifier(run_dir: Path) -> Classifier:
    return load_run(run_dir, device="cpu")


def test_available_from_the_package_without_hydra_or_wandb() -> None:
    assert perceiver.load_run is load_run and perceiver.Classifier is Classifier


def test_best_pt_describes_its_model_and_keeps_its_old_keys(best: dict) -> None:
    assert best["format"] == "perceiver-model" and best["version"] == 2
    assert {"model", "epoch", "val", "config"} <= set(best)
    config = best["config"]
    expected = {key: value for key, value in config["model"].items() if key != "_target_"}
    assert best["model_config"] == {**expected, "_target_": "perceiver.models.Perceiver", "num_classes": 10}
    assert best["classes"] == [f"class_{i}" for i in range(10)]
    assert best["data_image_size"] == SIDE and best["image_size"] == 16
    assert best["data"]["source"]["_target_"] == "perceiver.data.SyntheticSource"


def test_best_pt_holds_the_training_splits_statistics(best: dict) -> None:
    """Recomputed from the raw data: the training split (the seeded 90%) of the synthetic training set."""
    source = SyntheticSource(**{k: v for k, v in best["data"]["source"].items() if k != "_target_"})
    train_full, _ = source.load()
    keep, _ = split_indices(len(train_full), best["config"]["data"]["val_fraction"], best["config"]["seed"])
    pixels = train_full.images[keep].double().permute(1, 0, 2, 3).reshape(3, -1)
    assert best["mean"] == pytest.approx(pixels.mean(dim=1).tolist(), abs=1e-4)
    assert best["std"] == pytest.approx(pixels.std(dim=1, unbiased=False).tolist(), abs=1e-4)


def reference_logits(best: dict, images: torch.Tensor) -> torch.Tensor:
    """The model rebuilt by hand: normalise with the saved statistics, bilinear resize to 16, the Perceiver."""
    fields = {k: v for k, v in best["model_config"].items() if k != "_target_"}
    model = Perceiver(**fields)
    model.load_state_dict(best["model"])
    mean, std = torch.tensor(best["mean"]).view(1, 3, 1, 1), torch.tensor(best["std"]).view(1, 3, 1, 1)
    x = (images.float() - mean) / std
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return model.eval()(x)


def test_logits_are_the_models_on_normalised_resized_images(classifier: Classifier, best: dict) -> None:
    images = torch.randint(0, 256, (5, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(classifier.logits(images), reference_logits(best, images), rtol=0, atol=1e-5)
    assert classifier.classes == best["classes"] and isinstance(classifier.model, Perceiver)


def test_the_test_split_scores_what_training_wrote(classifier: Classifier, best: dict, run_dir: Path) -> None:
    source = SyntheticSource(**{k: v for k, v in best["data"]["source"].items() if k != "_target_"})
    _, test = source.load()
    predicted = classifier.logits(test.images, batch_size=64).argmax(dim=1)
    top1 = (predicted == test.labels).double().mean().item()
    assert top1 == json.loads((run_dir / "metrics.json").read_text())["test"]["top1"]


def test_files_pil_images_and_tensors_of_any_size_agree(classifier: Classifier, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    at_side = torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    other = torch.randint(0, 256, (3, 45, 27), dtype=torch.uint8, generator=generator)
    paths = []
    for name, image in (("side.png", at_side), ("other.png", other)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name)
        paths.append(tmp_path / name)
    from_files = classifier.logits(paths)  # compared with batches of another size: equal up to summation order
    assert from_files.shape == (2, 10)
    torch.testing.assert_close(from_files[0], classifier.logits(at_side)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(from_files[1], classifier.logits(other)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(from_files[1], classifier.logits(Image.open(paths[1]))[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(classifier.logits([str(paths[0]), other]), from_files, rtol=0, atol=1e-5)
    # another size goes through PIL's resize to the data's side, as an image folder reads its files
    resized = Image.fromarray(other.permute(1, 2, 0).numpy()).resize((SIDE, SIDE), Image.BILINEAR)
    as_decoded = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
    torch.testing.assert_close(from_files[1], classifier.logits(as_decoded)[0], rtol=0, atol=1e-5)


def test_predict_gives_the_top_k_names_and_probabilities(classifier: Classifier) -> None:
    images = torch.randint(0, 256, (4, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    predictions = classifier.predict(images, k=3)
    probabilities = torch.softmax(classifier.logits(images), dim=1)
    for row, expected in zip(predictions, probabilities, strict=True):
        assert len(row) == 3
        best_three = expected.argsort(descending=True)[:3]
        assert [name for name, _ in row] == [f"class_{i}" for i in best_three.tolist()]
        assert [p for _, p in row] == pytest.approx(expected[best_three].tolist(), abs=1e-6)
    assert len(classifier.predict(images[0], k=50)[0]) == 10  # at most every class
    with pytest.raises(ValueError, match="k=0 is invalid"):
        classifier.predict(images, k=0)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 3, SIDE, SIDE), "must be uint8"),
        (torch.zeros(2, 1, SIDE, SIDE, dtype=torch.uint8), r"must be \(B, 3, H, W\)"),
        ([], "no images"),
        ([3.0], "cannot read an image from a float"),
    ],
)
def test_unusable_images_are_refused(classifier: Classifier, images: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        classifier.logits(images)


def test_devices(run_dir: Path) -> None:
    assert load_run(run_dir, device="cpu").device == torch.device("cpu")
    if torch.cuda.is_available():
        on_gpu = load_run(run_dir, device="cuda")
        images = torch.randint(0, 256, (3, 3, SIDE, SIDE), dtype=torch.uint8)
        assert on_gpu.device.type == "cuda"
        on_cpu = load_run(run_dir, device="cpu")
        torch.testing.assert_close(on_gpu.logits(images), on_cpu.logits(images), atol=1e-4, rtol=0)
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_run(run_dir, device="cuda")


def test_save_pretrained_round_trips_through_safetensors(classifier: Classifier, tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    classifier.save_pretrained(folder)
    assert {"model.safetensors", "config.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["classes"] == classifier.classes and config["input_size"] == SIDE
    assert config["model"]["_target_"] == "perceiver.models.Perceiver"
    images = torch.randint(0, 256, (3, 3, SIDE, SIDE), dtype=torch.uint8)
    for loaded in (Classifier.from_pretrained(folder), load_run(folder)):
        assert loaded.classes == classifier.classes
        torch.testing.assert_close(loaded.logits(images), classifier.logits(images), rtol=0, atol=0)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        Classifier.from_pretrained(folder)


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def test_onnx_graph_takes_uint8_of_any_batch_and_matches_the_logits(run_dir: Path, tmp_path: Path) -> None:
    path = export(load_run(run_dir), tmp_path / "model.onnx", "onnx")
    reference = load_run(run_dir)
    generator = torch.Generator().manual_seed(4)
    for batch in (1, 5):
        images = torch.randint(0, 256, (batch, 3, SIDE, SIDE), dtype=torch.uint8, generator=generator)
        difference = np.abs(run_onnx(path, images) - reference.logits(images).numpy()).max()
        assert difference < 1e-3, difference
    import onnx

    model = onnx.load(str(path))
    metadata = {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    assert metadata["classes"] == reference.classes and metadata["input_size"] == SIDE
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIDE, SIDE]
    assert check_export(reference, path, "onnx") < 1e-3


def test_torch_export_program_matches_the_logits(run_dir: Path, tmp_path: Path) -> None:
    reference = load_run(run_dir)
    path = export(load_run(run_dir), tmp_path / "model.pt2", "torch_export")
    program = torch.export.load(str(path)).module()
    images = torch.randint(0, 256, (4, 3, SIDE, SIDE), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(program(images), reference.logits(images), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="format='tflite' is invalid"):
        export(reference, tmp_path / "model.tflite", "tflite")


# ----------------------------------------------------------------------------- what cannot be loaded


@pytest.fixture(scope="module")
def bad(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir without best.pt, a truncated best.pt, another program's checkpoint (a torchvision ResNet), a model
    file naming another model type, a version-1 model file, and a sweep directory."""
    import torchvision

    root = tmp_path_factory.mktemp("bad")
    (root / "no-model").mkdir()
    (root / "no-model" / "config.yaml").write_text("seed: 0\n")
    for name in ("truncated", "resnet", "other-type", "version-1", "sweep/0", "sweep/1"):
        (root / name).mkdir(parents=True)
    data = (run_dir / "best.pt").read_bytes()
    (root / "truncated" / "best.pt").write_bytes(data[: len(data) // 3])
    torch.save(torchvision.models.resnet18().state_dict(), root / "resnet" / "best.pt")
    state = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save(
        {**state, "model_config": {**state["model_config"], "_target_": "torchvision.models.resnet18"}},
        root / "other-type" / "best.pt",
    )
    old = {key: state[key] for key in ("model", "epoch", "val", "config")}
    torch.save({"format": "perceiver-model", "version": 1, **old}, root / "version-1" / "best.pt")
    for job in ("0", "1"):
        shutil.copy(run_dir / "best.pt", root / "sweep" / job / "best.pt")
    return root


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("nowhere", ["nowhere does not exist", "run directory"]),
        ("no-model", ["holds no best.pt", "save_checkpoints=false"]),
        ("truncated", ["truncated/best.pt is truncated or corrupt"]),
        ("truncated/best.pt", ["truncated or corrupt"]),
        ("resnet", ["is not a model file (best.pt) of this project", "plain state dict"]),
        ("other-type", ["holds a model of another type (torchvision.models.resnet18)", "perceiver.models.Perceiver"]),
        ("version-1", ["version-1 model file", "model_config", "classes", "mean", "std", "train the run again"]),
        ("sweep", ["is a sweep directory of 2 jobs", "sweep/0"]),
    ],
)
def test_unusable_paths_are_refused_saying_why(bad: Path, where: str, words: list[str]) -> None:
    with pytest.raises(CheckpointError) as caught:
        load_run(bad / where)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_resumable_checkpoint_is_not_a_model_file(run_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"last\.pt is a resumable checkpoint, not a model file"):
        load_run(run_dir / "last.pt")


def test_weights_that_do_not_fit_their_config_are_refused(run_dir: Path, tmp_path: Path) -> None:
    state = torch.load(run_dir / "best.pt", weights_only=True)
    state["model_config"] = {**state["model_config"], "latent_dim": 32}
    torch.save(state, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="its weights do not fit the model its config describes"):
        load_run(tmp_path)


def test_a_model_file_written_by_a_bare_fit_names_what_it_lacks(tmp_path: Path) -> None:
    from perceiver import ArrayDataset, BatchAugment, TrainingParts, TrainSettings, fit
    from perceiver.data import DeviceBatches

    torch.manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (64,)))
    batches = [DeviceBatches(data.subset(torch.arange(a, b)), 16, torch.device("cpu")) for a, b in ((0, 48), (48, 64))]
    model = Perceiver(image_size=8, patch_size=4, num_classes=2, latent_dim=4, projection_dim=8, num_heads=1)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    settings = TrainSettings(epochs=1, progress_bar=False, device="cpu")
    fit(TrainingParts(model, augment, optimizer, None, num_classes=2), *batches, settings, tmp_path)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["mean"] == [100.0] * 3 and best["std"] == [60.0] * 3 and best["image_size"] == 8
    with pytest.raises(CheckpointError, match="lacks model_config, classes: it was written by `fit` without"):
        load_run(tmp_path)
