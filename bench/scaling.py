"""Step time against the number of inputs M: the Perceiver's cross-attention is linear in M, a ViT's
self-attention quadratic (the paper's motivation, Jaegle et al., 2021, Sec. 2).

Both models have width 128 and four attention layers over their tokens' latents (Perceiver: the small
setting's 64 latents, 2 blocks x 2 iterations; ViT: depth 4, 4 heads, MLP ratio 1 like the Perceiver's
feed-forward), trained on batches of 8 with M = (image / patch)^2 inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.measure import time_steps
from perceiver.engine import classification_loss
from perceiver.flops import training_flops

POINTS = ((32, 8), (32, 4), (32, 2), (32, 1), (64, 1))  # (image size, patch size): M = 16 ... 4096
BATCH = 8


def build(kind: str, image_size: int, patch_size: int) -> torch.nn.Module:
    from perceiver import Perceiver, ViT

    if kind == "perceiver":
        return Perceiver(
            image_size=image_size,
            patch_size=patch_size,
            num_classes=100,
            latent_dim=64,
            projection_dim=128,
            num_heads=4,
            key_dim=32,
            num_transformer_blocks=2,
            num_iterations=2,
        )
    width = {"embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 1.0}
    return ViT(image_size=image_size, patch_size=patch_size, num_classes=100, **width)


def training_step(model: torch.nn.Module, image_size: int) -> Callable[[], None]:
    images = torch.randn(BATCH, 3, image_size, image_size)
    labels = torch.randint(0, 100, (BATCH,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    model.train()

    def step() -> None:
        loss = classification_loss(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_scaling(seconds: float = 2.0, kinds: tuple[str, ...] = ("perceiver", "vit")) -> list[dict[str, object]]:
    rows = []
    for image_size, patch_size in POINTS:
        for kind in kinds:
            torch.manual_seed(0)
            model = build(kind, image_size, patch_size)
            step_seconds, steps = time_steps(training_step(model, image_size), 1, seconds, 2)
            rows.append(
                {
                    "model": kind,
                    "image_size": image_size,
                    "patch_size": patch_size,
                    "num_inputs": (image_size // patch_size) ** 2,
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
