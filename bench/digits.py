"""Real data, whole processes: scikit-learn's digits as an image folder, `python train.py` against the Keras example.

    python -m bench digits [--pairs 5] [--out DIR] [--epochs 15]

1. Builds the folder itself: the 1,797 8x8 digits of `sklearn.datasets.load_digits` (16 grey levels), scaled to
   0-255 and upscaled to 32x32 PNGs in `train/<digit>/` and `test/<digit>/` (a seeded 20% held out).
2. Times whole processes, in interleaved pairs: this project's `python train.py data=imagefolder ...` at the small
   setting (bench/settings.py), 15 epochs, batch 64, no augmentation; then the keras.io example's model trained by
   Keras 3 on the same PNG files (bench/keras_digits.py). Each process starts cold (imports, data, model).
3. Prints each pair, the median ratio (Keras seconds / ours) with its range, and the commands.

The first of our runs meets an empty data cache (it decodes the folder and writes the cache); the later runs find
it warm. scikit-learn is needed for step 1 only: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.settings import SETTINGS

REPO = Path(__file__).resolve().parents[1]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (N, 8, 8) images in 0-255 and int labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise SystemExit('the digits benchmark needs scikit-learn: pip install -e ".[bench]"') from error
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    return images, digits.target.astype(np.int64)


def upscale(image: np.ndarray, size: int):
    """One greyscale array as a `size` x `size` PIL image, bilinear (the PNG that is written)."""
    from PIL import Image

    return Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BILINEAR)


def write_digit_folders(
    images: np.ndarray, labels: np.ndarray, root: Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, Path]:
    """`root/train/<label>/<index>.png` and `root/test/<label>/<index>.png`, a seeded `test_fraction` in test.
    Rewrites nothing that is already there, so a rerun leaves the files (and their mtimes) as they were."""
    order = np.random.default_rng(seed).permutation(len(images))
    held_out = set(order[: round(len(images) * test_fraction)].tolist())
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        split = "test" if index in held_out else "train"
        path = root / split / str(int(label)) / f"{index:04d}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            upscale(image, size).save(path)
    return root / "train", root / "test"


def ours_command(train: Path, test: Path, work: Path, epochs: int) -> list[str]:
    """`python train.py` on the folders at the small setting, no augmentation, W&B offline (a user without an
    account), the data cache and the run directories under `work`."""
    s = SETTINGS["small"]
    return [
        sys.executable,
        "train.py",
        "data=imagefolder",
        f"data.source.path={train}",
        f"data.source.test_path={test}",
        f"data.source.image_size={s.image_size}",
        "augmentation=none",
        *s.train_overrides(),
        f"trainer.epochs={epochs}",
        "trainer.progress_bar=false",
        "logger.mode=offline",
        f"paths.data_root={work / 'data_root'}",
        f"paths.output_dir={work / 'outputs'}",
    ]


def keras_command(train: Path, test: Path, epochs: int) -> list[str]:
    command = [sys.executable, "-m", "bench.keras_digits", "--train", str(train), "--test", str(test)]
    return [*command, "--epochs", str(epochs)]


def timed(command: Sequence[str]) -> tuple[float, str]:
    """Wall seconds of a whole process, and its output (which must end well)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def our_top1(output_dir: Path, after: float) -> float | None:
    """The test top-1 of the newest metrics.json written after `after` (our run's result)."""
    fresh = [p for p in output_dir.glob("runs/*/*/metrics.json") if p.stat().st_mtime >= after]
    return json.loads(max(fresh, key=lambda p: p.stat().st_mtime).read_text())["test"]["top1"] if fresh else None


def keras_top1(output: str) -> float | None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["test_top1"] if lines else None


def run_pairs(train: Path, test: Path, work: Path, epochs: int, pairs: int) -> list[dict[str, float | None]]:
    rows = []
    for pair in range(1, pairs + 1):
        started = time.time()
        ours, _ = timed(ours_command(train, test, work, epochs))
        keras, keras_output = timed(keras_command(train, test, epochs))
        row = {"pair": pair, "ours_s": ours, "keras_s": keras, "ratio": keras / ours}
        row |= {"ours_top1": our_top1(work / "outputs", started), "keras_top1": keras_top1(keras_output)}
        rows.append(row)
        print(
            f"pair {pair}: this project {ours:.1f} s (test top-1 {row['ours_top1']}), "
            f"Keras {keras:.1f} s (test top-1 {row['keras_top1']}): ratio {row['ratio']:.2f}",
            flush=True,
        )
    return rows


def table(rows: list[dict[str, float | None]]) -> str:
    lines = ["| pair | this project (s) | Keras example (s) | Keras / ours | test top-1 ours | test top-1 Keras |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['ours_s']:.1f} | {r['keras_s']:.1f} | {r['ratio']:.2f} | "
            f"{r['ours_top1']:.4f} | {r['keras_top1']:.4f} |"
        )
    ratios = [r["ratio"] for r in rows]
    lines.append(f"\nmedian ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/digits"), help="folders, runs and cache")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved (ours, Keras) pairs of processes")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    work = args.out.resolve()
    images, labels = digits_arrays()
    train, test = write_digit_folders(images, labels, work / "digits")
    counts = sum(1 for _ in train.rglob("*.png")), sum(1 for _ in test.rglob("*.png"))
    print(f"digits: {counts[0]} train / {counts[1]} test PNGs (32x32) in {work / 'digits'}", flush=True)
    print(f"ours:  {shlex.join(ours_command(train, test, work, args.epochs))}")
    print(f"Keras: {shlex.join(keras_command(train, test, args.epochs))}", flush=True)
    rows = run_pairs(train, test, work, args.epochs, args.pairs)
    report = table(rows)
    (work / "results.json").write_text(json.dumps({"command": sys.argv, "pairs": rows}, indent=2))
    print("\n" + report)


if __name__ == "__main__":
    main()
