"""`python -m bench gpu [--tiny] [--out DIR]`: a CIFAR-100-sized epoch on the GPU, in one command.

Generated data the size of CIFAR-100's training split after the 10% validation split (45,000 uint8 32x32
images, 100 classes) on the device, the Keras recipe (normalise, resize 32 -> 64, flip, zoom; the Keras
example's model and Adam, fused), trained through `perceiver.training.loop.fit` for two epochs exactly as
train.py does: device-resident batches, batched augmentation, on-device metrics and non-finite checks
(`trainer.sync_free`, on CUDA), validation each epoch. Rows:

- bf16 autocast + torch.compile (the fast configuration; the goal is an epoch in under 10 s on an H100/H200);
- fp32 with TF32 matmuls + torch.compile;
- each of the two without torch.compile.

Per row: epoch seconds and img/s of the second epoch (the first also pays for compilation), the compile time
(first epoch minus second), MFU against the measured matmul peak of the row's precision and against the
bf16 peak, peak GPU memory, and which scaled-dot-product-attention kernels ran (from torch.profiler over one
training step), and for compiled rows the number of graphs dynamo made and its graph breaks. `--tiny`
(automatic without CUDA) runs a tiny model on 128 images on the CPU, compiling with dynamo's `eager`
backend (graph capture without code generation), so tests/test_bench.py runs the whole script in seconds.
(On the CPU the model's own dropout masks break the graph; on CUDA it uses F.dropout and SDPA, one graph.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perceiver import BatchAugment, Perceiver
from perceiver.data import ArrayDataset, DeviceBatches
from perceiver.training import TrainingParts, TrainSettings, fit
from perceiver.training.device import configure_determinism, matmul_peak

MEAN, STD = [129.3, 124.1, 112.4], [68.2, 65.4, 70.4]  # CIFAR-100's, in 0-255 units
ROWS = {  # name: (precision, torch.compile)
    "bf16+compile": ("bf16", True),
    "tf32+compile": ("fp32", True),
    "bf16": ("bf16", False),
    "tf32": ("fp32", False),
}
GOAL_SECONDS = 10.0  # a Keras-recipe CIFAR-100 epoch on one H100/H200 (the goal)
# Substrings of profiler event names (aten ops and CUDA kernels) -> the SDPA backend they belong to.
SDPA_BACKENDS = (
    ("flash", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd")),
    ("memory-efficient", ("_scaled_dot_product_efficient_attention", "fmha_cutlass", "efficient_attention")),
    ("cudnn", ("_scaled_dot_product_cudnn_attention", "cudnn_sdpa")),
    ("math", ("_scaled_dot_product_attention_math",)),
)


@dataclass(frozen=True)
class Plan:
    """What one row trains: the model, the data's size and the batch."""

    train_images: int = 45_000
    val_images: int = 5_000
    source_size: int = 32
    batch_size: int = 64
    model: dict[str, Any] = field(default_factory=dict)  # Perceiver arguments; {} = the Keras example's
    compile_backend: str = "inductor"
    profile_batch: int = 20  # the first epoch's training step that torch.profiler watches


TINY = Plan(
    train_images=128,
    val_images=32,
    source_size=16,
    batch_size=32,
    model={"image_size": 16, "patch_size": 4, "latent_dim": 16, "projection_dim": 32, "num_heads": 2, "key_dim": 16},
    compile_backend="eager",
    profile_batch=2,
)


def generated_split(count: int, size: int, device: torch.device, seed: int) -> ArrayDataset:
    """`count` random uint8 images with random labels of 100 classes, made on the device (no host copy)."""
    generator = torch.Generator(device).manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, device=device, generator=generator)
    return ArrayDataset(images, torch.randint(0, 100, (count,), device=device, generator=generator))


def sdpa_backends(names: set[str]) -> str:
    found = [backend for backend, marks in SDPA_BACKENDS if any(m in n for n in names for m in marks)]
    return " + ".join(found) or "none (attention spelled out)"


class ProfiledBatches:
    """A loader that runs torch.profiler over the training step of one batch of its first epoch and records
    which SDPA backends that step ran; otherwise it is the loader it wraps."""

    def __init__(self, loader: DeviceBatches, batch: int, device: torch.device) -> None:
        self.loader, self.batch, self.device = loader, batch, device
        self.backends: str | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        for index, batch in enumerate(self.loader, start=1):
            if index != self.batch or self.backends is not None:
                yield batch
                continue
            with torch.profiler.profile(activities=activities) as profile:
                yield batch  # the loop runs this batch's step before asking for the next
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            self.backends = sdpa_backends({event.name for event in profile.events()})


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """`torch.compile` as the loop calls it, with `backend` (the tiny mode's `eager`)."""
    original = torch.compile
    torch.compile = lambda model, **kwargs: original(model, backend=backend, **kwargs)
    try:
        yield
    finally:
        torch.compile = original


def peaks(device: torch.device, seconds: float) -> dict[str, float]:
    """The matmul peaks (FLOP/s) every row's MFU refers to, TF32 allowed for fp32 (what the fp32 rows run)."""
    configure_determinism(False)  # TF32 matmuls on CUDA, as train.py sets them
    return {p: matmul_peak(device, d, seconds) for p, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


def run_row(name: str, plan: Plan, device: torch.device, peak: dict[str, float]) -> dict[str, Any]:
    """Two epochs of `fit` for one row; the second epoch's figures, and what the first cost more."""
    precision, compiled = ROWS[name]
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = Perceiver(num_classes=100, **plan.model).to(device)
    augment = BatchAugment(plan.model.get("image_size", 64), 100).to(device)  # the Keras recipe: resize to 64
    augment.set_statistics(MEAN, STD)
    data = generated_split(plan.train_images, plan.source_size, device, 1)
    train = ProfiledBatches(DeviceBatches(data, plan.batch_size, device, shuffle=True), plan.profile_batch, device)
    val = DeviceBatches(generated_split(plan.val_images, plan.source_size, device, 2), plan.batch_size, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=True)  # conf/optimizer/adam.yaml
    settings = TrainSettings(
        epochs=2,
        batch_size=plan.batch_size,
        device=str(device),
        precision=precision,
        compile=compiled,
        early_stopping_patience=None,
        progress_bar=False,
        save_checkpoints=False,
        peak_tflops=peak[precision] / 1e12,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backend = compile_backend(plan.compile_backend) if compiled else contextlib.nullcontext()
    with backend, tempfile.TemporaryDirectory() as run_dir:
        result = fit(TrainingParts(model, augment, optimizer, None), train, val, settings, Path(run_dir))
    first, second = result.history
    per_image = second["perf/tflops"] * 1e12 / second["images_per_second"]
    return {
        "row": name,
        "precision": "bf16 autocast" if precision == "bf16" else ("fp32 + TF32" if device.type == "cuda" else "fp32"),
        "compile": f"torch.compile ({plan.compile_backend})" if compiled else "eager",
        "epoch_seconds": second["epoch_seconds"],
        "images_per_second": second["images_per_second"],
        "compile_seconds": first["epoch_seconds"] - second["epoch_seconds"] if compiled else None,
        "mfu": second["perf/mfu"],
        "mfu_vs_bf16_peak": second["images_per_second"] * per_image / peak["bf16"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "sdpa": train.backends,
        "graphs": counters["stats"]["unique_graphs"] if compiled else None,  # training and evaluation, all shapes
        "graph_breaks": sum(counters["graph_break"].values()) if compiled else None,
        "train_images": plan.train_images,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| row | precision | compile | epoch s | img/s | compile s | graphs (breaks) | MFU (own peak) "
        "| MFU (bf16 peak) | peak GiB | SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = f"{r['compile_seconds']:.1f}" if r["compile_seconds"] is not None else "-"
        graphs = f"{r['graphs']} ({r['graph_breaks']})" if r["graphs"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(
            f"| {r['row']} | {r['precision']} | {r['compile']} | {r['epoch_seconds']:.2f} | "
            f"{r['images_per_second']:.0f} | {compile_s} | {graphs} | {100 * r['mfu']:.1f}% | "
            f"{100 * r['mfu_vs_bf16_peak']:.1f}% | {memory} | {r['sdpa']} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return f"{name}; torch {torch.__version__}{cuda}"


def report(command: str, device: torch.device, plan: Plan, peak: dict[str, float], rows: list[dict]) -> str:
    lines = [
        f"command: `{command}`",
        f"machine: {machine(device)}",
        f"epoch: {plan.train_images} generated images {plan.source_size}x{plan.source_size}, batch {plan.batch_size}"
        f"; model {plan.model or 'the Keras example (image 64, patch 2, 256x256 latents, 8 heads, 4 blocks)'}",
        f"matmul peaks: bf16 {peak['bf16'] / 1e12:.1f} TFLOP/s, fp32 (TF32 on CUDA) {peak['fp32'] / 1e12:.1f} TFLOP/s",
        "",
        table(rows),
    ]
    fast = next((r for r in rows if r["row"] == "bf16+compile"), None)
    if fast is not None and device.type == "cuda":
        verdict = "met" if fast["epoch_seconds"] < GOAL_SECONDS else "not met"
        lines += ["", f"goal (bf16 + compile epoch < {GOAL_SECONDS:.0f} s): {verdict}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model on 256 images (automatic without CUDA)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS), help="which rows to run")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 64, the recipe's)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default outputs/bench/gpu_<time>)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    plan = TINY if tiny else Plan()
    if args.batch_size:
        plan = Plan(**{**plan.__dict__, "batch_size": args.batch_size})
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    command = " ".join(["python -m bench gpu", *(argv if argv is not None else sys.argv[2:])])
    print(f"{command}\n{machine(device)}{' (tiny mode)' if tiny else ''}", flush=True)
    peak = peaks(device, seconds=0.2 if tiny else 2.0)
    rows = []
    for name in args.rows:
        started = time.perf_counter()
        rows.append(run_row(name, plan, device, peak))
        print(f"  {name}: {rows[-1]['epoch_seconds']:.2f} s/epoch ({time.perf_counter() - started:.0f} s)", flush=True)
    out = args.out or Path("outputs/bench") / time.strftime("gpu_%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    text = report(command, device, plan, peak, rows)
    (out / "gpu.md").write_text(text)
    results = {"command": command, "machine": machine(device), "tiny": tiny, "peaks": peak, "rows": rows}
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    print("\n" + text + f"\nwritten to {out}/")


if __name__ == "__main__":
    main()
