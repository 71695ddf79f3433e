"""Step time against the number of inputs M: the Perceiver's cross-attention is linear in M, a ViT's
self-attention quadratic (the paper's motivation, Jaegle et al., 2021, Sec. 2).

Both models have width 128 and four attention layers over their tokens' latents (Perceiver: the small
setting's 64 latents, 2 blocks x 2 iterations; ViT: depth 4, 4 heads, MLP ratio 1 like the Perceiver's
feed-forward), trained on batches of 8 with M = (image / patch)^2 inputs.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.measure import make_torch_step, perceiver_kwargs, time_steps
from bench.settings import SETTINGS, Setting
from perceiver.training.metrics import training_flops

POINTS = ((32, 8), (32, 4), (32, 2), (32, 1), (64, 1))  # (image size, patch size): M = 16 ... 4096
BATCH = 8


def build(kind: str, setting: Setting) -> torch.nn.Module:
    """The small setting's Perceiver, or a ViT of its width and attention depth, at `setting`'s input size."""
    from perceiver import Perceiver, ViT

    if kind == "perceiver":
        return Perceiver(**perceiver_kwargs(setting))
    width = {"embed_dim": setting.channels, "depth": setting.num_blocks * setting.num_iterations, "mlp_ratio": 1.0}
    return ViT(setting.image_size, setting.patch_size, num_classes=setting.num_classes, num_heads=4, **width)


def measure_scaling(seconds: float = 2.0, kinds: tuple[str, ...] = ("perceiver", "vit")) -> list[dict[str, object]]:
    rows = []
    for image_size, patch_size in POINTS:
        setting = replace(SETTINGS["small"], image_size=image_size, patch_size=patch_size, batch_size=BATCH)
        for kind in kinds:
            torch.manual_seed(0)
            model = build(kind, setting)
            step_seconds, steps = time_steps(make_torch_step(model, setting, "fp32", False), 1, seconds, 2)
            rows.append(
                {
                    "model": kind,
                    "image_size": image_size,
                    "patch_size": patch_size,
                    "num_inputs": setting.num_inputs,
                    "step_seconds": step_seconds,
                    "steps_timed": steps,
                    "flops_per_step": training_flops(model, BATCH),
                }
            )
            print(f"  scaling: {kind:9s} M={rows[-1]['num_inputs']:5d}  {step_seconds * 1e3:9.1f} ms/step", flush=True)
    return rows


def plot_scaling(rows: list[dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(row["model"] for row in rows):
        points = sorted((row["num_inputs"], row["step_seconds"]) for row in rows if row["model"] == kind)
        axis.plot(*zip(*points, strict=True), marker="o", label=kind)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("inputs M = (image / patch)^2")
    axis.set_ylabel("training step (s), batch 8")
    axis.set_title("Step time against input size")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
