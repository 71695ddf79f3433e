"""The model sizes every peer is benchmarked at, named once so that all peers build the same shapes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One model size and batch: `num_latents` latents of `channels` width over `num_inputs` patches."""

    name: str
    image_size: int
    patch_size: int
    num_latents: int
    channels: int
    num_heads: int
    key_dim: int
    num_blocks: int
    num_iterations: int
    batch_size: int
    num_classes: int = 100
    dropout_rate: float = 0.2
    attention_dropout_rate: float = 0.1

    @property
    def num_inputs(self) -> int:
        """M, the number of patches the latents cross-attend to."""
        return (self.image_size // self.patch_size) ** 2

    def model_kwargs(self) -> dict[str, int | float]:
        """This project's `Perceiver` arguments for this size (the classes and channels come from the data)."""
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "latent_dim": self.num_latents,
            "projection_dim": self.channels,
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "num_transformer_blocks": self.num_blocks,
            "num_iterations": self.num_iterations,
            "dropout_rate": self.dropout_rate,
            "attention_dropout_rate": self.attention_dropout_rate,
        }

    def train_overrides(self) -> list[str]:
        """The `python train.py` overrides that build this size and batch."""
        model = [f"model.{name}={value}" for name, value in self.model_kwargs().items()]
        return [*model, f"trainer.batch_size={self.batch_size}"]


SETTINGS: dict[str, Setting] = {
    # The keras.io example "Image classification with Perceiver": 64x64 images in 2x2 patches (M = 1024).
    "keras": Setting("keras", 64, 2, 256, 256, 8, 256, 4, 2, 16),
    # Small enough to time on a CPU.
    "small": Setting("small", 32, 4, 64, 128, 4, 32, 2, 2, 64),
    # The small size on Fashion-MNIST's 28x28 images: patch 4 = 49 inputs (`python -m bench tta`).
    "fashion_mnist": Setting("fashion_mnist", 28, 4, 64, 128, 4, 32, 2, 2, 64, num_classes=10),
    # `python -m bench tta --tiny`: 16 inputs, 8 latents x 16 channels, one block, one iteration.
    "tiny": Setting("tiny", 28, 7, 8, 16, 2, 8, 1, 1, 32, num_classes=10),
}
