"""A trained run you can use, one module per job: `load_run` finds a run's files and gives a `Classifier` (runs.py,
classifier.py); `export` writes it for other runtimes (exporter.py). A run's best.pt (`BestModel`) carries
everything used here; nothing here knows Hydra or W&B.
"""

from perceiver.inference.classifier import Classifier
from perceiver.inference.exporter import EXPORT_FORMATS, check_export, export
from perceiver.inference.runs import MODEL_FILE, is_pretrained_folder, load_run, model_file, read_model_file

__all__ = [
    "EXPORT_FORMATS",
    "MODEL_FILE",
    "Classifier",
    "check_export",
    "export",
    "is_pretrained_folder",
    "load_run",
    "model_file",
    "read_model_file",
]
