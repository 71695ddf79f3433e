"""After `python train.py experiment=cpu_smoke`: `python evaluate.py` reproduces its test top-1 exactly and writes
and logs what it found, `predict=` classifies files, `python export.py` writes an ONNX graph that onnxruntime runs
to the same logits, and every bad input is one line on stderr (all through the real entry points)."""

from __future__ import annotations

import csv
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceiver.data import SyntheticSource
from perceiver.experiment.evaluation import evaluate_run, load_split
from perceiver.inference import load_run
from tests.helpers import compose_config, isolated, offline_runs, run_script, write_image_folder
from tests.helpers.wandb_files import read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of `python train.py experiment=cpu_smoke` (2 epochs, in a W&B group, offline)."""
    root = tmp_path_factory.mktemp("evaluate")
    with isolated(root):
        result = run_script(
            "train.py",
            "experiment=cpu_smoke",
            "trainer.epochs=2",
            "logger.mode=offline",
            "logger.group=smoke-group",
            f"hydra.run.dir={root / 'run'}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        yield root


@pytest.fixture(scope="module")
def run_dir(root: Path) -> Path:
    return root / "run"


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def evaluated(root: Path, run_dir: Path) -> tuple[object, Path]:
    """`python evaluate.py run=<its dir>`, offline W&B."""
    out = root / "eval"
    result = run_script("evaluate.py", f"run={run_dir}", "logger.mode=offline", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def test_evaluate_prints_and_writes_the_test_top1_training_wrote(evaluated, trained: dict) -> None:
    result, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    top1 = trained["test"]["top1"]
    assert metrics["test"]["top1"] == top1 and metrics["top1"] == top1  # exactly, not approximately
    assert metrics["test"]["loss"] == trained["test"]["loss"] and metrics["top5"] == trained["test"]["top5"]
    assert metrics["num_images"] == 500 and metrics["correct"] == round(top1 * 500)
    assert f"top1 {top1:.4f}" in result.stdout and repr(top1) in result.stdout
    assert metrics["train_run_id"] == trained["wandb_run_id"]
    for name in ("per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "mistakes.png", "mistakes.csv"):
        assert (out / name).is_file(), name
    for name in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 100


def predictions_by_hand(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, predicted, confidence) over the test split, from the classifier's logits."""
    best = torch.load(run_dir / "best.pt", weights_only=True)
    source = SyntheticSource(**{k: v for k, v in best["data"]["source"].items() if k != "_target_"})
    _, test = source.load()
    probabilities = load_run(run_dir, device="cpu").logits(test.images, batch_size=64).softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    return test.labels, predicted, confidence


def read_csv(path: Path) -> list[list[str]]:
    with path.open() as file:
        return list(csv.reader(file))


def test_per_class_accuracy_confusion_matrix_and_mistakes_are_recounted(evaluated, run_dir: Path) -> None:
    _, out = evaluated
    labels, predicted, confidence = predictions_by_hand(run_dir)
    confusion = np.zeros((10, 10), dtype=int)
    for t, p in zip(labels.tolist(), predicted.tolist(), strict=True):
        confusion[t, p] += 1
    header, *rows = read_csv(out / "confusion_matrix.csv")
    assert header[1:] == [f"class_{i}" for i in range(10)]
    assert [[int(v) for v in row[1:]] for row in rows] == confusion.tolist()
    per_class = {row["class"]: row for row in csv.DictReader((out / "per_class.csv").open())}
    for label in range(10):
        row = per_class[f"class_{label}"]
        assert int(row["images"]) == confusion[label].sum() and int(row["correct"]) == confusion[label, label]
        assert float(row["accuracy"]) == pytest.approx(confusion[label, label] / confusion[label].sum())
    wrong = (predicted != labels).nonzero().flatten()
    most_confident = wrong[confidence[wrong].argsort(descending=True)][:16]
    mistakes = list(csv.DictReader((out / "mistakes.csv").open()))
    assert [int(m["index"]) for m in mistakes] == most_confident.tolist()
    assert [float(m["confidence"]) for m in mistakes] == pytest.approx(confidence[most_confident].tolist(), abs=1e-5)


def artifact_files(run_file: Path) -> dict[str, dict[str, str]]:
    """W&B artifacts the offline run logged (a table with media is one): name -> {path in it: local file}."""
    found = {}
    for record in read_records(run_file):
        if record.WhichOneof("record_type") == "artifact":
            artifact = record.artifact
            found[artifact.name] = {entry.path: entry.local_path for entry in artifact.manifest.contents}
    return found


def test_the_eval_wandb_run_is_linked_to_the_training_run_and_holds_the_media(evaluated, trained: dict) -> None:
    _, out = evaluated
    (run,) = offline_runs(out)
    assert run.job_type == "eval" and run.group == "smoke-group" == trained["wandb_group"]
    assert run.config["train_run_id"] == trained["wandb_run_id"] and run.config["split"] == "test"
    assert run.summary["test/top1"] == trained["test"]["top1"] and run.summary["num_images"] == 500
    assert run.summary["test/loss"] == pytest.approx(trained["test"]["loss"])
    (logged,) = [row for row in run.history if "mistakes/_type" in row]
    files = next(out.glob("wandb/offline-run-*/files"))
    for key in ("confusion_matrix_image", "mistakes_grid"):
        assert logged[f"{key}/_type"] == "image-file" and (files / logged[f"{key}/path"]).is_file()
    assert logged["mistakes/_type"] == "table-file" and logged["mistakes/nrows"] == 16
    assert logged["confusion_matrix_table/_type"] == "table-file"  # wandb.plot.confusion_matrix's data
    assert [chart["panelDefId"] for chart in run.charts.values()] == ["wandb/confusion_matrix/v1"]
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    mistakes = next(entries for name, entries in artifact_files(run_file).items() if name.endswith("-mistakes"))
    images = [path for path in mistakes if path.endswith(".png")]
    assert len(images) == 16 and all(Path(mistakes[path]).is_file() for path in images)
    table = json.loads(Path(mistakes["mistakes.table.json"]).read_text())
    assert table["columns"] == ["image", "true", "predicted", "confidence", "index"]
    assert all(row[0]["_type"] == "image-file" and row[1] != row[2] for row in table["data"])


def test_the_validation_split_scores_the_best_epochs_validation(run_dir: Path, trained: dict, tmp_path: Path) -> None:
    cfg = compose_config("evaluate", f"run={run_dir}", "split=val", "logger=none")
    metrics = evaluate_run(cfg, tmp_path)
    assert metrics["num_images"] == 200
    assert metrics["top1"] == trained["best_val"]["top1"] and metrics["loss"] == trained["best_val"]["loss"]


def test_test_hflip_averages_each_images_and_its_mirrors_probabilities(run_dir: Path, tmp_path: Path) -> None:
    """`test_hflip=true` (or the run's `augmentation.test_hflip`): the numbers of the averaged probabilities of each
    validation image and its mirror, re-computed here from the classifier's logits."""
    cfg = compose_config("evaluate", f"run={run_dir}", "split=val", "logger=none", "test_hflip=true")
    metrics = evaluate_run(cfg, tmp_path)
    classifier = load_run(run_dir, "cpu")
    run_config = compose_config("train", "experiment=cpu_smoke")
    split = load_split(run_config.data, "val", run_config.seed, classifier.classes)
    images = torch.stack([split[i][0] for i in range(len(split))])
    labels = torch.tensor([int(split[i][1]) for i in range(len(split))])
    probs = (classifier.logits(images).softmax(-1) + classifier.logits(images.flip(-1)).softmax(-1)) / 2
    assert metrics["top1"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(-probs[range(len(labels)), labels].log().mean().item(), rel=1e-4)


def test_a_run_with_test_hflip_tests_mirror_averaged_and_validates_one_view(tmp_path: Path) -> None:
    """`augmentation.test_hflip=true`: training's test numbers are evaluate.py's with the run's flip averaging,
    not the single view's; its best validation is the single view's (evaluate.py test_hflip=false split=val)."""
    run = tmp_path / "run"
    with isolated(tmp_path):
        overrides = ["experiment=cpu_smoke", "trainer.epochs=1", "augmentation.test_hflip=true", "logger=none"]
        result = run_script("train.py", *overrides, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((run / "metrics.json").read_text())

    def evaluated(*overrides: str) -> dict:
        return evaluate_run(compose_config("evaluate", f"run={run}", "logger=none", *overrides), tmp_path / "eval")

    assert evaluated()["test"] == trained["test"]
    assert evaluated("test_hflip=false")["loss"] != pytest.approx(trained["test"]["loss"])
    single_view_val = evaluated("split=val", "test_hflip=false")
    assert {k: single_view_val[k] for k in ("loss", "top1")} == {k: trained["best_val"][k] for k in ("loss", "top1")}


def test_an_image_folder_with_the_models_classes_is_evaluated(run_dir: Path, tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", [f"class_{i}" for i in range(10)], 2, (40, 24))
    overrides = ["data=imagefolder", f"data.source.path={folder}", "split=all", "logger=none"]
    cfg = compose_config("evaluate", f"run={run_dir}", *overrides)
    metrics = evaluate_run(cfg, tmp_path / "out")
    assert metrics["data"]["source"]["image_size"] == 32  # decoded at the run's side, as load_run reads files
    files = sorted(folder.glob("*/*.png"))
    expected = load_run(run_dir, device="cpu").logits(files).argmax(dim=1)
    labels = torch.tensor([int(path.parent.name.split("_")[1]) for path in files])
    assert metrics["correct"] == int((expected == labels).sum()) and metrics["num_images"] == 20


def test_predict_prints_and_writes_the_top_k_of_each_file(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + 10 * i, 30), (70 * i, 120, 200 - 50 * i)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    result = run_script("evaluate.py", f"run={run_dir}", f"predict={folder}/*.png", "top_k=3", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(folder.glob("*.png"))
    expected = load_run(run_dir, device="cpu").predict(files, k=3)
    written = json.loads((out / "predictions.json").read_text())
    assert [row["file"] for row in written] == [str(f) for f in files]
    for row, top in zip(written, expected, strict=True):
        assert [p["class"] for p in row["predictions"]] == [name for name, _ in top]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx([p for _, p in top], abs=1e-6)
        assert f"{row['file']}: {top[0][0]} {top[0][1]:.4f}" in result.stdout
    header, *rows = read_csv(out / "predictions.csv")
    assert header[:3] == ["file", "class_1", "probability_1"] and len(header) == 7 and len(rows) == 3


def test_export_onnx_matches_load_run_logits(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime

    path = tmp_path / "exported.onnx"
    result = run_script("export.py", f"run={run_dir}", "format=onnx", f"output={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {path}" in result.stdout and "(batch, 3, 32, 32)" in result.stdout
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), "a line printed twice:\n" + "\n".join(lines)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    logits = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(logits - load_run(run_dir).logits(images).numpy()).max() < 1e-3


# ----------------------------------------------------------------------------- bad inputs, one line each


@pytest.fixture(scope="module")
def bad(root: Path, run_dir: Path) -> Path:
    import torchvision

    bad = root / "bad"
    for name in ("empty", "truncated", "resnet"):
        (bad / name).mkdir(parents=True)
    data = (run_dir / "best.pt").read_bytes()
    (bad / "truncated" / "best.pt").write_bytes(data[:4000])
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), bad / "resnet" / "best.pt")
    write_image_folder(bad / "animals", ["cat", "dog"], 2, (8, 8))
    shutil.copytree(bad / "animals", bad / "photos")
    (bad / "photos" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (bad / "crafted").mkdir()  # a model file whose data config would truncate victim.txt when evaluated
    (bad / "victim.txt").write_text("precious")
    best = torch.load(run_dir / "best.pt", weights_only=True)
    best["config"]["data"]["source"] = {"_target_": "builtins.open", "file": str(bad / "victim.txt"), "mode": "w"}
    torch.save(best, bad / "crafted" / "best.pt")
    return bad


BAD_CASES = [
    ("missing-run-dir", ["run={bad}/no-such-run"], ["{bad}/no-such-run does not exist", "run directory"]),
    ("run-dir-without-checkpoint", ["run={bad}/empty"], ["{bad}/empty holds no best.pt"]),
    ("truncated-checkpoint", ["run={bad}/truncated"], ["{bad}/truncated/best.pt is truncated or corrupt"]),
    ("another-model-type", ["run={bad}/resnet"], ["is not a model file (best.pt) of this project", "state dict"]),
    (
        "mismatched-classes",
        ["run={run}", "data=imagefolder", "data.source.path={bad}/animals"],
        ["differ from the model's", "data [cat, dog]", "model [class_0, class_1, class_2", "class_9]"],
    ),
    (
        "unreadable-image-in-predict",
        ["run={run}", "predict={bad}/photos"],
        ["1 of 5 file(s) cannot be read as images", "{bad}/photos/cat/broken.png"],
    ),
    ("data-config-names-other-code", ["run={bad}/crafted"], ["source._target_='builtins.open' is refused"]),
]


@pytest.fixture(scope="module")
def bad_outcomes(bad: Path, run_dir: Path, root: Path) -> dict:
    def run(case: tuple) -> tuple[str, object]:
        name, arguments, _ = case
        filled = [a.format(bad=bad, run=run_dir) for a in arguments]
        return name, run_script("evaluate.py", *filled, "logger=none", f"hydra.run.dir={root / 'bad-out' / name}")

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, BAD_CASES))


@pytest.mark.parametrize(("name", "arguments", "words"), BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_bad_inputs_are_one_line_without_a_traceback(
    bad_outcomes: dict, bad: Path, name: str, arguments: list, words: list
) -> None:
    result = bad_outcomes[name]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    for word in words:
        assert word.format(bad=bad) in lines[0], lines[0]


def test_a_run_whose_data_config_names_other_code_runs_none_of_it(bad_outcomes: dict, bad: Path) -> None:
    assert bad_outcomes["data-config-names-other-code"].returncode == 2
    assert (bad / "victim.txt").read_text() == "precious"


def test_export_checks_its_output_before_converting_naming_output(run_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script("export.py", f"run={run_dir}", "format=onnx", f"output={blocker / 'model.onnx'}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: output={blocker / 'model.onnx'} cannot be written"), lines
    assert "give a writable output=PATH" in lines[0] and "hydra.run.dir" not in lines[0]
