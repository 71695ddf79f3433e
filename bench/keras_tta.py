"""The Keras peer of `python -m bench tta`: the keras.io example's model and recipe, Keras 3 on the torch backend,
on the MNIST family's idx files (read by this project's reader, so both peers see the same pixels).

    python -m bench.keras_tta train --data DIR --states DIR [--setting fashion_mnist] [--epochs 50]
                                    [--first-epoch-points K]
    python -m bench.keras_tta evaluate --data DIR [--setting fashion_mnist] --weights FILE...

`train` is the timed process. As the example: its input layers (Normalization adapted on the training images,
Resizing, RandomFlip("horizontal"), RandomZoom(0.2, 0.2)), AdamW(1e-3, weight decay 1e-4), batch 64, its dropout,
ReduceLROnPlateau(factor 0.2, patience 3), EarlyStopping(patience 15, best weights restored), the last 10% of the
training images for validation. After every epoch it saves the weights and the epoch's validation loss
(`epoch-NNN.npz`, written whole then renamed: its mtime is the epoch's end), and evaluates nothing else. With
`--first-epoch-points K` it also saves the current weights about K times inside the first epoch, every steps // K
steps of the epoch Keras runs (`epoch-000-step-NNNNN.npz`, sorted before the epoch files; no validation loss yet).

`evaluate` runs afterwards, untimed: the test top-1 of each weights file given, one JSON line {file: top1}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from bench.keras_example import build_example, keras
from bench.settings import SETTINGS
from bench.tta_report import first_epoch_interval
from perceiver.data.mnist import SPLITS, idx_file, read_idx

SEED = 42  # train.py's default seed


def load_arrays(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28, 1) float32 images in 0-255 and int32 labels of the split (train or test)."""
    prefix = SPLITS[split]
    images = read_idx(idx_file(folder, f"{prefix}-images-idx3-ubyte"), dims=3)
    labels = read_idx(idx_file(folder, f"{prefix}-labels-idx1-ubyte"), dims=1)
    return images[..., None].astype(np.float32), labels.astype(np.int32)


def example_model(train_images: np.ndarray, setting_name: str) -> tuple[keras.Model, int]:
    """The example's model, its Normalization adapted on the training images; and the batch size."""
    keras.utils.set_random_seed(SEED)
    setting = dataclasses.replace(SETTINGS[setting_name], num_classes=10)
    return build_example(train_images, setting, augment=True), setting.batch_size


def save_weights(model: keras.Model, path: Path, **extra: np.ndarray) -> None:
    """The model's weights (and `extra`) written whole, then renamed: the file's mtime is the moment it was saved."""
    partial = path.with_suffix(".partial")
    weights = {f"w{i:04d}": w for i, w in enumerate(model.get_weights())}
    with open(partial, "wb") as file:
        np.savez(file, **extra, **weights)
    os.replace(partial, path)


class SaveEveryEpoch(keras.callbacks.Callback):
    """`epoch-NNN.npz` in `folder` after every epoch: the model's weights and the epoch's validation loss."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        val_loss = np.float64((logs or {})["val_loss"])
        save_weights(self.model, self.folder / f"epoch-{epoch + 1:03d}.npz", val_loss=val_loss)


class SaveInFirstEpoch(keras.callbacks.Callback):
    """`epoch-000-step-NNNNN.npz` in `folder` about `points` times inside the first epoch: its current weights,
    every `first_epoch_interval` steps of the epoch Keras runs, except its last (the epoch file saves that one)."""

    def __init__(self, folder: Path, points: int) -> None:
        super().__init__()
        self.folder, self.points, self.epoch = folder, points, 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        steps, step = self.params["steps"], batch + 1  # `batch` counts from 0 within the epoch
        every = first_epoch_interval(steps, self.points)
        if self.epoch == 0 and every and step % every == 0 and step < steps:
            save_weights(self.model, self.folder / f"epoch-000-step-{step:05d}.npz", step=np.int64(step))


def train(folder: Path, states: Path, setting_name: str, epochs: int, first_epoch_points: int = 0) -> None:
    states.mkdir(parents=True, exist_ok=True)
    x, y = load_arrays(folder, "train")
    model, batch_size = example_model(x, setting_name)
    callbacks = [
        SaveInFirstEpoch(states, first_epoch_points),
        SaveEveryEpoch(states),  # first: the epoch's own weights, before EarlyStopping may restore the best
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=15, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=3),
    ]
    model.fit(x, y, batch_size=batch_size, epochs=epochs, validation_split=0.1, callbacks=callbacks, verbose=2)


def evaluate(folder: Path, setting_name: str, files: list[Path]) -> dict[str, float]:
    """Test top-1 of each weights file, as the example's `model.evaluate` computes it."""
    model, batch_size = example_model(load_arrays(folder, "train")[0], setting_name)
    x_test, y_test = load_arrays(folder, "test")
    top1 = {}
    for file in files:
        with np.load(file) as saved:
            model.set_weights([saved[name] for name in sorted(saved.files) if name.startswith("w")])
        _, accuracy = model.evaluate(x_test, y_test, batch_size=batch_size, verbose=0)
        top1[str(file)] = float(accuracy)
    return top1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("train", "evaluate"))
    parser.add_argument("--data", type=Path, required=True, help="a folder holding the four idx files")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="fashion_mnist")
    parser.add_argument("--epochs", type=int, default=50, help="the example's num_epochs")
    parser.add_argument("--states", type=Path, help="train: where the weights of every epoch go")
    parser.add_argument("--first-epoch-points", type=int, default=0, help="train: saves inside the first epoch")
    parser.add_argument("--weights", nargs="+", type=Path, default=[], help="evaluate: the weights files")
    args = parser.parse_args(argv)
    if args.action == "train":
        if args.states is None:
            parser.error("train needs --states DIR")
        if args.first_epoch_points < 0:
            parser.error("--first-epoch-points must be >= 0 (0 = no saves inside the first epoch)")
        train(args.data, args.states, args.setting, args.epochs, args.first_epoch_points)
    else:
        print(json.dumps(evaluate(args.data, args.setting, args.weights)))


if __name__ == "__main__":
    main()
