"""The Keras peer of `python -m bench digits`: the keras.io example's model and training set-up, Keras 3 on the
torch backend, trained on the same PNG folders as `python train.py data=imagefolder`. Prints one JSON line.

    python -m bench.keras_digits --train DIR --test DIR [--epochs 15]

As the example: Normalization adapted on the training images inside the model, AdamW(1e-3, weight decay 1e-4),
ReduceLROnPlateau(factor 0.2, patience 3), EarlyStopping(patience 15, best weights restored), 10% validation split;
no random augmentation (as the timed `augmentation=none` run), at the small setting (bench/settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from bench.keras_example import build_example, keras
from bench.settings import SETTINGS


def load_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) float32 images and int labels: class folders in sorted order, files sorted in each."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    paths = [(p, label) for label, d in enumerate(classes) for p in sorted(d.glob("*.png"))]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p, _ in paths])
    return images, np.array([label for _, label in paths], dtype=np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    keras.utils.set_random_seed(42)
    x, y = load_folder(args.train)
    order = np.random.default_rng(0).permutation(len(x))  # Keras' validation_split takes the last 10%: mix classes
    x, y = x[order], y[order]
    x_test, y_test = load_folder(args.test)
    model = build_example(x, dataclasses.replace(SETTINGS["small"], num_classes=int(y.max()) + 1))
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=3),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=15, restore_best_weights=True),
    ]
    model.fit(x, y, batch_size=SETTINGS["small"].batch_size, epochs=args.epochs, validation_split=0.1,
              callbacks=callbacks, verbose=2)  # fmt: skip
    _, accuracy = model.evaluate(x_test, y_test, batch_size=SETTINGS["small"].batch_size, verbose=0)
    print(json.dumps({"test_top1": float(accuracy), "train_images": len(x), "test_images": len(x_test)}))


if __name__ == "__main__":
    main()
