"""The default model against the real Keras layers: a Keras 3 model (torch backend) assembled here from the
keras.io example's published architecture, its weights copied into `Perceiver`, the logits compared.

The strongest independent reference for "same computation as the example": Keras' own LayerNormalization,
Attention(use_scale=True), MultiHeadAttention, Dense(gelu), Embedding and extract_patches.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import pytest
import torch
from keras import layers, ops

from perceiver import Perceiver
from tests.helpers.models import TINY

if keras.backend.backend() != "torch":  # pragma: no cover - a user's KERAS_BACKEND would change the layers
    raise RuntimeError(f"these tests need KERAS_BACKEND=torch, not {keras.backend.backend()}")


def keras_ffn(units: list[int], dropout: float) -> keras.Sequential:
    return keras.Sequential(
        [layers.Dense(units[0], activation="gelu"), layers.Dense(units[1]), layers.Dropout(dropout)]
    )


class KerasPerceiver:
    """The example's modules, built with the example's layer types, order and arguments."""

    def __init__(self, image: int, patch: int, latents: int, width: int, heads: int, blocks: int, classes: int) -> None:
        self.patch, self.iterations = patch, 2
        self.num_patches = (image // patch) ** 2
        self.projection = layers.Dense(width)
        self.position = layers.Embedding(self.num_patches, width)
        self.latent = keras.Variable(np.zeros((latents, width), dtype="float32"))
        self.cross = self._cross_attention(latents, width)
        self.transformer_blocks: list[tuple] = []
        self.transformer = self._transformer(latents, width, heads, blocks)
        self.head = keras_ffn([width, classes], 0.2)
        self.head.build((None, width))
        self.projection.build((None, patch * patch * 3))
        self.position.build((None,))

    def _cross_attention(self, latents: int, width: int) -> keras.Model:
        latent_in, data_in = layers.Input((latents, width)), layers.Input((self.num_patches, width))
        self.latent_norm, self.data_norm = (
            layers.LayerNormalization(epsilon=1e-6),
            layers.LayerNormalization(epsilon=1e-6),
        )
        self.q, self.k, self.v = layers.Dense(width), layers.Dense(width), layers.Dense(width)
        self.attention = layers.Attention(use_scale=True, dropout=0.1)
        self.ffn_norm, self.cross_ffn = layers.LayerNormalization(epsilon=1e-6), keras_ffn([width, width], 0.2)
        latent_array, data_array = self.latent_norm(latent_in), self.data_norm(data_in)
        # As in the example: [query, key, value] is handed to a layer whose argument order is [query, value, key].
        attended = self.attention([self.q(latent_array), self.k(data_array), self.v(data_array)])
        attended = self.ffn_norm(attended + latent_array)
        return keras.Model([latent_in, data_in], self.cross_ffn(attended) + attended)

    def _transformer(self, latents: int, width: int, heads: int, blocks: int) -> keras.Model:
        inputs = layers.Input((latents, width))
        x0 = inputs
        for _ in range(blocks):
            norm1, norm2 = layers.LayerNormalization(epsilon=1e-6), layers.LayerNormalization(epsilon=1e-6)
            mha = layers.MultiHeadAttention(num_heads=heads, key_dim=width, dropout=0.1)
            ffn = keras_ffn([width, width], 0.2)
            x1 = norm1(x0)
            x2 = mha(x1, x1) + x0
            x0 = ffn(norm2(x2)) + x2
            self.transformer_blocks.append((norm1, mha, norm2, ffn))
        return keras.Model(inputs, x0)

    def trainable_count(self) -> int:
        parts = [self.projection, self.position, self.cross, self.transformer, self.head]
        return sum(int(np.prod(w.shape)) for part in parts for w in part.trainable_weights) + int(
            np.prod(self.latent.shape)
        )

    def randomize(self, seed: int) -> None:
        """Random values everywhere (LayerNorm gains and the attention scale included), so copying is tested."""
        rng = np.random.default_rng(seed)
        parts = [self.projection, self.position, self.cross, self.transformer, self.head]
        for weight in [w for part in parts for w in part.weights] + [self.latent]:
            weight.assign(rng.normal(0.0, 0.3, weight.shape).astype("float32"))

    def __call__(self, images_nhwc: np.ndarray) -> np.ndarray:
        patches = ops.image.extract_patches(images_nhwc, size=self.patch, strides=self.patch, padding="valid")
        patches = ops.reshape(patches, (images_nhwc.shape[0], self.num_patches, -1))
        data = self.projection(patches) + self.position(ops.arange(self.num_patches))
        latent = ops.expand_dims(self.latent, 0)
        for _ in range(self.iterations):
            latent = self.transformer(self.cross([latent, data], training=False), training=False)
        return ops.convert_to_numpy(self.head(ops.mean(latent, axis=1), training=False))


def as_torch(weight: keras.Variable) -> torch.Tensor:
    return torch.tensor(ops.convert_to_numpy(weight))


def copy_dense(linear: torch.nn.Linear, dense: layers.Dense) -> None:
    linear.weight.copy_(as_torch(dense.kernel).T)
    linear.bias.copy_(as_torch(dense.bias))


def copy_norm(norm: torch.nn.LayerNorm, keras_norm: layers.LayerNormalization) -> None:
    norm.weight.copy_(as_torch(keras_norm.gamma))
    norm.bias.copy_(as_torch(keras_norm.beta))


@torch.no_grad()
def load_keras_weights(model: Perceiver, reference: KerasPerceiver) -> None:
    model.latents.copy_(as_torch(reference.latent))
    copy_dense(model.encoder.projection, reference.projection)
    model.encoder.position_embedding.weight.copy_(as_torch(reference.position.embeddings))
    cross = model.cross_attends[0]
    copy_norm(cross.latent_norm, reference.latent_norm)
    copy_norm(cross.data_norm, reference.data_norm)
    copy_dense(cross.to_q, reference.q)
    # Keras Attention reads [query, value, key]: the example's `key` Dense makes the values, `value` the keys.
    copy_dense(cross.to_k, reference.v)
    copy_dense(cross.to_v, reference.k)
    cross.score_scale.copy_(as_torch(reference.attention.scale).reshape(()))
    copy_norm(cross.ffn_norm, reference.ffn_norm)
    copy_dense(cross.ffn[0], reference.cross_ffn.layers[0])
    copy_dense(cross.ffn[2], reference.cross_ffn.layers[1])
    for block, (norm1, mha, norm2, ffn) in zip(model.latent_transformers[0], reference.transformer_blocks, strict=True):
        copy_norm(block.attention_norm, norm1)
        copy_norm(block.ffn_norm, norm2)
        dense = (mha._query_dense, mha._key_dense, mha._value_dense)  # kernels (D, H, key_dim), biases (H, key_dim)
        block.attention.qkv.weight.copy_(torch.cat([as_torch(d.kernel).flatten(1).T for d in dense]))
        block.attention.qkv.bias.copy_(torch.cat([as_torch(d.bias).flatten() for d in dense]))
        output = mha._output_dense  # kernel (H, key_dim, D)
        block.attention.out.weight.copy_(as_torch(output.kernel).flatten(0, 1).T)
        block.attention.out.bias.copy_(as_torch(output.bias))
        copy_dense(block.ffn[0], ffn.layers[0])
        copy_dense(block.ffn[2], ffn.layers[1])
    copy_dense(model.head[0], reference.head.layers[0])
    copy_dense(model.head[2], reference.head.layers[1])


def test_keras_model_at_the_example_defaults_has_the_same_trainable_parameters() -> None:
    reference = KerasPerceiver(image=64, patch=2, latents=256, width=256, heads=8, blocks=4, classes=100)
    reference(np.zeros((1, 64, 64, 3), dtype="float32"))  # builds the attention layers' weights
    assert reference.trainable_count() == sum(p.numel() for p in Perceiver().parameters()) == 9_697_637


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_equal_the_keras_layers_with_the_same_weights(seed: int) -> None:
    reference = KerasPerceiver(
        image=TINY["image_size"],
        patch=TINY["patch_size"],
        latents=TINY["latent_dim"],
        width=TINY["projection_dim"],
        heads=TINY["num_heads"],
        blocks=TINY["num_transformer_blocks"],
        classes=TINY["num_classes"],
    )
    images = np.random.default_rng(100 + seed).normal(size=(3, 8, 8, 3)).astype("float32")
    reference(images)  # build
    reference.randomize(seed)
    model = Perceiver(**{**TINY, "num_iterations": 2}).eval()  # the Keras model above applies 2 iterations
    load_keras_weights(model, reference)
    ours = model(torch.from_numpy(images).permute(0, 3, 1, 2)).detach().numpy()
    expected = reference(images)
    assert np.abs(expected).max() > 1.0  # a non-trivial output
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)
