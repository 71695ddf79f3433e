"""Export a trained run: `python export.py run=DIR format=onnx|torch_export|safetensors [output=PATH]`.

onnx and torch_export write a graph from uint8 images (batch, 3, S, S) to logits, with the normalisation and
resizing inside and any batch size; safetensors writes model.safetensors + config.json (`save_pretrained`), which
`perceiver.load_run` and `Classifier.from_pretrained` read, and `push_to_hub=user/name` uploads.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from perceiver.experiment import cli
from perceiver.inference import EXPORT_FORMATS, check_export, export, is_pretrained_folder, load_run, model_file
from perceiver.training import CheckpointError

CONF = Path(__file__).resolve().parent / "conf"
NAMES = {"onnx": "model.onnx", "torch_export": "model.pt2", "safetensors": "pretrained"}


def default_output(run: str, format: str) -> Path:
    """<run dir>/export/<name>: beside the model file the export comes from (or in the save_pretrained folder)."""
    location = Path(run).expanduser()
    base = location if is_pretrained_folder(location) else model_file(location).parent
    return base / "export" / NAMES[format]


def check_writable(output: Path, folder: bool) -> None:
    """Exit with one line naming `output=` when the export could not be written there."""
    where = output if folder else output.parent
    probe = where / f".{output.name}.probe"
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        reason = "a file is in the way" if isinstance(error, FileExistsError) else error.strerror or str(error)
        cli.fail(
            f"output={output} cannot be written ({reason}: {error.filename or where}); give a writable output=PATH", 2
        )


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="export")
def main(cfg: DictConfig) -> None:
    cli.require(cfg, "run", "give run=DIR (a run directory, a sweep job directory or a best.pt)")
    if cfg.format not in NAMES:
        cli.fail(f"format={cfg.format!r} is invalid: choose one of {', '.join(NAMES)}", 2)
    try:
        output = Path(cfg.output).expanduser() if cfg.output else default_output(cfg.run, cfg.format)
        check_writable(output, folder=cfg.format == "safetensors")  # before the conversion, which takes seconds
        classifier = load_run(cfg.run, device="cpu")
        if cfg.format == "safetensors":
            classifier.save_pretrained(output, repo_id=cfg.push_to_hub, push_to_hub=bool(cfg.push_to_hub))
        else:
            export(classifier, output, cfg.format)
    except (CheckpointError, ImportError, ValueError) as error:
        cli.fail(str(error), 2)
    side, channels, classes = classifier.input_size, classifier.in_channels, classifier.num_classes
    print(f"wrote {output}: uint8 images (batch, {channels}, {side}, {side}) -> logits (batch, {classes})")
    if cfg.check:
        difference = check_export(classifier, output, cfg.format)
        print(f"  largest |difference| from the model's logits on random images: {difference:.3g}")
    if cfg.format in EXPORT_FORMATS:
        print("  class names, input size and normalisation are in the file's metadata")
    if cfg.push_to_hub:
        print(f"  pushed to https://huggingface.co/{cfg.push_to_hub}")


if __name__ == "__main__":
    cli.run_hydra_app(main)
    cli.exit_without_teardown()
