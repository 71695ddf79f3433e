"""What an evaluation writes besides its metrics: per-class accuracy, the confusion matrix (CSV and PNG), the most
confident mistakes (CSV and a PNG grid), and a prediction run's top-k per file (CSV and JSON)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perceiver.files import write_text_atomic


@dataclass
class Mistake:
    index: int  # position in the evaluated split
    true: int
    predicted: int
    confidence: float  # the predicted class's probability
    image: torch.Tensor  # uint8 (C, S, S), as the model was fed


@dataclass
class Observations:
    """Filled batch by batch during the evaluation pass (`evaluate(observe=...)`): the confusion matrix, and the
    `keep` most confident mistakes with their images."""

    num_classes: int
    keep: int = 16
    confusion: torch.Tensor = field(init=False)  # [true, predicted] counts
    mistakes: list[Mistake] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        confidence, predicted = logits.float().softmax(dim=-1).max(dim=-1)
        pairs = (labels * self.num_classes + predicted).bincount(minlength=self.num_classes**2)
        self.confusion += pairs.view(self.num_classes, self.num_classes).cpu()
        wrong = (predicted != labels).nonzero().flatten()
        if self.keep and len(wrong):
            worst = wrong[confidence[wrong].argsort(descending=True)[: self.keep]].cpu()
            labels, predicted, confidence = labels.cpu(), predicted.cpu(), confidence.cpu()
            self.mistakes += [
                Mistake(self.seen + i, int(labels[i]), int(predicted[i]), float(confidence[i]), images[i].cpu())
                for i in worst.tolist()
            ]
            self.mistakes = sorted(self.mistakes, key=lambda m: -m.confidence)[: self.keep]
        self.seen += len(labels)


def per_class_rows(confusion: torch.Tensor, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Accuracy (recall) and precision of every class, from the confusion matrix."""
    rows = []
    for label, name in enumerate(classes):
        images, correct = int(confusion[label].sum()), int(confusion[label, label])
        predicted = int(confusion[:, label].sum())
        rows.append(
            {
                "label": label,
                "class": name,
                "images": images,
                "correct": correct,
                "accuracy": correct / images if images else float("nan"),
                "predicted": predicted,
                "precision": correct / predicted if predicted else float("nan"),
            }
        )
    return rows


def csv_text(rows: Sequence[dict[str, Any]] | Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if rows and isinstance(rows[0], dict):
        header = list(rows[0])
        rows = [[row[key] for key in header] for row in rows]
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def confusion_rows(confusion: torch.Tensor, classes: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the confusion matrix: one row per true class, one column per predicted class."""
    return ["true \\ predicted", *classes], [[name, *confusion[i].tolist()] for i, name in enumerate(classes)]


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], title: str, path: Path) -> None:
    """The confusion matrix as an image, rows normalised to the fraction of each true class; names on the axes
    while they are few enough to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double()
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    side = min(4 + 0.35 * len(classes), 24)
    figure, axes = plt.subplots(figsize=(side + 1.5, side))
    shown = axes.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axes, fraction=0.046, label="fraction of the true class")
    if len(classes) <= 40:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_mistakes(mistakes: Sequence[Mistake], classes: Sequence[str], title: str, path: Path) -> None:
    """A grid of the most confident mistakes: each image as the model was fed, with its true and predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(4, len(mistakes)))
    rows = max(1, math.ceil(len(mistakes) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.4), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, mistake in zip(grid.flat, mistakes, strict=False):
        axes.imshow(mistake.image.permute(1, 2, 0).numpy(), interpolation="nearest")
        true, predicted = classes[mistake.true], classes[mistake.predicted]
        axes.set_title(f"#{mistake.index}: {true}\n-> {predicted} ({mistake.confidence:.2f})", fontsize=8)
    if not mistakes:
        grid[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def mistake_rows(mistakes: Sequence[Mistake], classes: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"index": m.index, "true": classes[m.true], "predicted": classes[m.predicted], "confidence": m.confidence}
        for m in mistakes
    ]


def write_evaluation_files(
    out_dir: Path, observations: Observations, classes: Sequence[str], title: str
) -> dict[str, str]:
    """per_class.csv, confusion_matrix.csv/.png, mistakes.csv/.png in `out_dir`; returns name -> path."""
    confusion = observations.confusion
    files = {
        "per_class": out_dir / "per_class.csv",
        "confusion_matrix": out_dir / "confusion_matrix.csv",
        "confusion_matrix_plot": out_dir / "confusion_matrix.png",
        "mistakes": out_dir / "mistakes.csv",
        "mistakes_plot": out_dir / "mistakes.png",
    }
    write_text_atomic(files["per_class"], csv_text(per_class_rows(confusion, classes)))
    header, rows = confusion_rows(confusion, classes)
    write_text_atomic(files["confusion_matrix"], csv_text(rows, header))
    plot_confusion(confusion, classes, f"confusion matrix: {title}", files["confusion_matrix_plot"])
    mistakes = mistake_rows(observations.mistakes, classes)
    write_text_atomic(files["mistakes"], csv_text(mistakes, ["index", "true", "predicted", "confidence"]))
    shown = f"the {len(observations.mistakes)} most confident mistakes: {title}"
    plot_mistakes(observations.mistakes, classes, shown, files["mistakes_plot"])
    return {name: str(path) for name, path in files.items()}


def write_predictions(out_dir: Path, rows: Sequence[dict[str, Any]], k: int) -> dict[str, str]:
    """predictions.json (every file's top-k) and predictions.csv (one row per file: class_1, probability_1, ...)."""
    header = ["file", *(f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability"))]
    table = [
        [row["file"], *(value for p in row["predictions"] for value in (p["class"], p["probability"]))] for row in rows
    ]
    json_path, csv_path = out_dir / "predictions.json", out_dir / "predictions.csv"
    write_text_atomic(json_path, json.dumps(list(rows), indent=2))
    write_text_atomic(csv_path, csv_text(table, header))
    return {"predictions_json": str(json_path), "predictions_csv": str(csv_path)}
