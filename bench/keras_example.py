"""The keras.io example "Image classification with Perceiver", rebuilt in Keras 3 on the torch backend.

Written from the example's published architecture (same layer types, order, arguments and weight sharing) so
that the benchmark times what a Keras user of the example runs; at the "keras" setting it has the example's
9,697,637 trainable parameters, as this project's `Perceiver` does. The step benchmark leaves the example's input
layers (normalise, resize, flip, zoom) out and feeds images already at `image_size`; `build_example` adds them for
the whole-process benchmarks.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # must precede the first `import keras`

from collections.abc import Callable

import numpy as np

try:
    import keras
    from keras import layers, ops
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError('the Keras peer needs keras: pip install -e ".[bench]"') from error

from bench.settings import Setting


def ffn(units: tuple[int, int], dropout_rate: float) -> keras.Sequential:
    """Dense(gelu) -> Dense -> Dropout: the example's feed-forward, also its classifier head."""
    return keras.Sequential(
        [layers.Dense(units[0], activation="gelu"), layers.Dense(units[1]), layers.Dropout(dropout_rate)]
    )


def layer_norm() -> layers.LayerNormalization:
    return layers.LayerNormalization(epsilon=1e-6)


class PatchEncoder(layers.Layer):
    """Non-overlapping patches -> Dense(channels) + a learned position Embedding: the data array (B, M, C)."""

    def __init__(self, setting: Setting, **kwargs) -> None:
        super().__init__(**kwargs)
        self.patch_size, self.num_inputs = setting.patch_size, setting.num_inputs
        self.projection = layers.Dense(setting.channels)
        self.position = layers.Embedding(setting.num_inputs, setting.channels)

    def call(self, images):
        p = self.patch_size
        patches = ops.image.extract_patches(images, size=p, strides=p, padding="valid")
        patches = ops.reshape(patches, (ops.shape(images)[0], self.num_inputs, -1))
        return self.projection(patches) + self.position(ops.arange(self.num_inputs))


def cross_attention(setting: Setting) -> keras.Model:
    """Latents (1, N, C) attend to the data (B, M, C); residuals add the normalised latents, as the example does."""
    latent_in = layers.Input((setting.num_latents, setting.channels))
    data_in = layers.Input((setting.num_inputs, setting.channels))
    latents, data = layer_norm()(latent_in), layer_norm()(data_in)
    q, k, v = (layers.Dense(setting.channels)(x) for x in (latents, data, data))
    # [q, k, v] as in the example, although `Attention` reads its inputs as [query, value, key].
    attended = layers.Attention(use_scale=True, dropout=setting.attention_dropout_rate)([q, k, v])
    attended = layer_norm()(attended + latents)
    out = ffn((setting.channels, setting.channels), setting.dropout_rate)(attended) + attended
    return keras.Model([latent_in, data_in], out, name="cross_attention")


def latent_transformer(setting: Setting) -> keras.Model:
    """`num_blocks` pre-LayerNorm self-attention blocks over the latents."""
    latent_in = layers.Input((setting.num_latents, setting.channels))
    x = latent_in
    for _ in range(setting.num_blocks):
        h = layer_norm()(x)
        mha = layers.MultiHeadAttention(
            setting.num_heads, key_dim=setting.key_dim, dropout=setting.attention_dropout_rate
        )
        x = mha(h, h) + x
        x = ffn((setting.channels, setting.channels), setting.dropout_rate)(layer_norm()(x)) + x
    return keras.Model(latent_in, x, name="latent_transformer")


class KerasPerceiver(keras.Model):
    """Images (B, H, W, 3) -> logits; one cross-attention and one transformer reused every iteration."""

    def __init__(self, setting: Setting, **kwargs) -> None:
        super().__init__(**kwargs)
        self.setting = setting
        self.encoder = PatchEncoder(setting)
        self.cross_attention = cross_attention(setting)
        self.transformer = latent_transformer(setting)
        self.head = ffn((setting.channels, setting.num_classes), setting.dropout_rate)  # dropout after the logits

    def build(self, input_shape) -> None:
        shape = (self.setting.num_latents, self.setting.channels)
        self.latents = self.add_weight(shape=shape, initializer="random_normal", name="latents")
        super().build(input_shape)

    def call(self, images, training=None):
        data = self.encoder(images)
        latents = ops.expand_dims(self.latents, 0)  # broadcast over the batch inside the cross-attention
        for _ in range(self.setting.num_iterations):
            latents = self.cross_attention([latents, data], training=training)
            latents = self.transformer(latents, training=training)
        return self.head(ops.mean(latents, axis=1), training=training)


def build_model(setting: Setting) -> KerasPerceiver:
    """Compiled like the example: Adam(1e-3), sparse cross-entropy on the logits."""
    model = KerasPerceiver(setting)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def build_example(train_images: np.ndarray, setting: Setting, augment: bool = False) -> keras.Model:
    """The example's model on (N, H, W, C) images, compiled as the example compiles it: its Normalization adapted on
    the training images inside the model (with `augment` also its Resizing, RandomFlip("horizontal") and
    RandomZoom(0.2, 0.2), active in training only), AdamW(1e-3, weight decay 1e-4), sparse cross-entropy on the
    logits, accuracy as `acc`."""
    normalize = layers.Normalization()
    normalize.adapt(train_images)
    random = [layers.RandomFlip("horizontal"), layers.RandomZoom(height_factor=0.2, width_factor=0.2)]
    size = setting.image_size
    inputs = keras.Input(train_images.shape[1:])
    prepare = keras.Sequential([normalize, *([layers.Resizing(size, size), *random] if augment else [])])
    model = keras.Model(inputs, KerasPerceiver(setting)(prepare(inputs)))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
    )
    return model


def make_keras_step(setting: Setting, seed: int = 0) -> tuple[Callable[[], None], int]:
    """One `train_on_batch` on a fixed random batch per call, and the trainable parameter count.

    The batch is converted to backend tensors once, so a step times the model, not a host-to-device copy. On the
    torch backend `train_on_batch` runs eagerly (`jit_compile="auto"` resolves to False there) and turns the loss
    into a Python float, a device sync each step on a GPU: what a Keras user of the example gets.
    """
    if keras.backend.backend() != "torch":
        raise RuntimeError(f"the Keras peer runs on KERAS_BACKEND=torch, not {keras.backend.backend()}")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    size, batch = setting.image_size, setting.batch_size
    x = ops.convert_to_tensor(rng.standard_normal((batch, size, size, 3), dtype=np.float32))
    y = ops.convert_to_tensor(rng.integers(0, setting.num_classes, batch).astype(np.int32))
    model = build_model(setting)
    model(x[:1])  # creates the weights
    num_params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)

    def step() -> None:
        model.train_on_batch(x, y)

    return step, num_params
