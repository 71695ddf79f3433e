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


SETTINGS: dict[str, Setting] = {
    # The keras.io example "Image classification with Perceiver": 64x64 images in 2x2 patches (M = 1024).
    "keras": Setting("keras", 64, 2, 256, 256, 8, 256, 4, 2, 16),
    # Small enough to time on a CPU.
    "small": Setting("small", 32, 4, 64, 128, 4, 32, 2, 2, 64),
}
