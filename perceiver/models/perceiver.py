"""The Perceiver (Jaegle et al., 2021) for image classification.

Laid out like the keras.io example "Image classification with Perceiver" so that the default
arguments compute the same function with the same trainable parameters:

    image -> patches -> PatchEncoder -> data array (B, M, D) [-> FixedPermutation of the M inputs]
    latents (N, D) -> [CrossAttention(latents, data) -> LatentTransformer] x num_iterations
    -> mean over latents -> classifier head -> logits

Every axis the paper ablates is a constructor argument; the names follow the example
(`latent_dim` is the NUMBER of latents N, `projection_dim` their width D).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from perceiver.models import checks, folding, layers
from perceiver.models.permutation import FixedPermutation, check_permutation_arguments
from perceiver.models.position import POSITION_ENCODINGS, PatchEncoder
from perceiver.models.registry import register_model

WEIGHT_SHARING = ("all", "all_but_first", "none")


class FeedForward(nn.Sequential):
    """Dense(gelu) -> Dense -> Dropout: the example's `create_ffn` with two widths."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout_rate: float) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
            layers.Dropout(dropout_rate),
        )


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, length, width = x.shape
    return x.view(b, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


class CrossAttention(nn.Module):
    """Latents attend to the data array; the example's cross-attention module.

    Both inputs are LayerNorm-ed, and the residuals add the *normalised* tensors (as the example
    does). Scores are q.k^T times a learned scalar initialised to 1 (Keras `Attention(use_scale=True)`),
    not divided by sqrt(d). There is no output projection. (The example hands `[query, key, value]` to
    Keras `Attention`, which reads `[query, value, key]`, so its "key" Dense makes the values and its
    "value" Dense the keys; both project the same array, so only the names differ. Mind it when
    porting weights.)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_units: int,
        dropout_rate: float,
        attention_dropout_rate: float,
        eps: float,
        score_scale: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout_rate = attention_dropout_rate
        self.latent_norm = nn.LayerNorm(dim, eps=eps)
        self.data_norm = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # The example starts the learned scale at 1: with D-wide heads q.k then has a spread of ~sqrt(D), and at
        # D = 128 each latent attends to about one input at initialisation (docs/recipes.md). None starts it at
        # 1/sqrt(head width), the Transformer's scaling; training then learns it as before.
        initial = (dim // num_heads) ** -0.5 if score_scale is None else score_scale
        self.score_scale = nn.Parameter(torch.full((), float(initial)))
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_units, dim, dropout_rate)

    def project_data(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the data array, (B, heads, M, D/heads) each: they depend only on the data and
        this module's weights, so iterations that share the module compute them once (`Perceiver`)."""
        data = self.data_norm(data)
        weight = torch.cat([self.to_k.weight, self.to_v.weight])  # one GEMM reads the data array once
        bias = torch.cat([self.to_k.bias, self.to_v.bias])
        keys, values = F.linear(data, weight, bias).chunk(2, dim=-1)
        return split_heads(keys, self.num_heads), split_heads(values, self.num_heads)

    def forward(
        self, latents: torch.Tensor, data: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        keys, values = self.project_data(data) if keys_values is None else keys_values
        latents, q = self.queries(latents, keys.shape[0])
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        attended = layers.attention(q, keys, values, 1.0, dropout_p)
        x = self.ffn_norm(merge_heads(attended) + latents)
        return self.ffn(x) + x

    def queries(self, latents: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(LayerNorm-ed latents (., N, D), queries (batch, heads, N, D/heads)): the one home of the query math,
        shared by `forward` and `attention_weights` so the attention maps are the forward pass's weights.

        The learned scale multiplies q: (s q) k^T = s (q k^T), and attention then runs with scale=1. The
        latents may have batch 1 (the learned array): q is projected once and expanded, not copied.
        """
        latents = self.latent_norm(latents)
        q = (self.to_q(latents) * self.score_scale).expand(batch, -1, -1)
        return latents, split_heads(q, self.num_heads)

    def attention_weights(self, latents: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T) over the inputs, (B, heads, N, M): the weights `forward` averages the values with
        (before attention dropout, so exactly them in eval mode); `keys` as `project_data` returns them."""
        _, q = self.queries(latents, keys.shape[0])
        return torch.softmax(q @ keys.transpose(-2, -1), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention like Keras `MultiHeadAttention(num_heads, key_dim)`.

    Each head has its own `key_dim`-wide query/key/value (the example uses key_dim = projection_dim,
    so 8 heads are 8x wider than the model); the heads are concatenated and projected back to `dim`.
    Q, K and V come from one fused projection, which holds exactly the three Keras kernels.

    On the CPU, when it takes fewer FLOPs (`folding.saves_flops`: heads about as wide as the model, as in the
    example), the same function is computed through the products of the weights (`perceiver.models.folding`):
    about 1.5x faster at the example's size on a 2-core CPU (docs/benchmarks.md). Elsewhere the heads run on
    `scaled_dot_product_attention`'s fused kernels, which never store the scores. `fold_weights=False` keeps the
    unfolded form everywhere.
    """

    def __init__(
        self, dim: int, num_heads: int, key_dim: int, attention_dropout_rate: float, fold_weights: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.attention_dropout_rate = attention_dropout_rate
        self.fold_weights = fold_weights
        self.qkv = nn.Linear(dim, 3 * num_heads * key_dim)
        self.out = nn.Linear(num_heads * key_dim, dim)

    def folds(self, x: torch.Tensor) -> bool:
        """Whether `forward` takes the folded form for this input."""
        width, length = x.shape[-1], x.shape[-2]
        return self.fold_weights and x.device.type == "cpu" and folding.saves_flops(width, self.key_dim, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        if self.folds(x):
            return folding.self_attention(x, self.qkv, self.out, self.num_heads, dropout_p, self.training)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        attended = layers.attention(q, k, v, q.shape[-1] ** -0.5, dropout_p)
        return self.out(merge_heads(attended))


class LatentBlock(nn.Module):
    """Pre-LayerNorm Transformer block on the latents: x + MHA(LN(x)), then y + FFN(LN(y))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        key_dim: int,
        ffn_units: int,
        dropout_rate: float,
        attention_dropout_rate: float,
        eps: float,
        fold_weights: bool = True,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.attention = SelfAttention(dim, num_heads, key_dim, attention_dropout_rate, fold_weights)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_units, dim, dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class LatentTransformer(nn.Sequential):
    """`num_blocks` LatentBlocks in a row: what each iteration applies to the latents after its cross-attend."""

    def __init__(
        self,
        num_blocks: int,
        dim: int,
        num_heads: int,
        key_dim: int,
        ffn_units: int,
        dropout_rate: float,
        attention_dropout_rate: float,
        eps: float,
        fold_weights: bool = True,
    ) -> None:
        block = (dim, num_heads, key_dim, ffn_units, dropout_rate, attention_dropout_rate, eps, fold_weights)
        super().__init__(*(LatentBlock(*block) for _ in range(num_blocks)))


def sharing_plan(weight_sharing: str, num_iterations: int) -> tuple[list[int], list[int]]:
    """Which cross-attend and which latent Transformer each iteration uses.

    `all`: one of each (the example). `all_but_first`: the first cross-attend has its own weights,
    later ones share, the latent Transformer is shared (the paper's ImageNet model, Table 7).
    `none`: every iteration has its own modules.
    """
    steps = list(range(num_iterations))
    if weight_sharing == "all":
        return [0] * num_iterations, [0] * num_iterations
    if weight_sharing == "all_but_first":
        return [min(i, 1) for i in steps], [0] * num_iterations
    return steps, steps


@register_model
class Perceiver(nn.Module):
    """Perceiver image classifier; defaults are the Keras example's CIFAR-100 settings."""

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 3,
        num_classes: int = 100,
        latent_dim: int = 256,
        projection_dim: int = 256,
        num_heads: int = 8,
        key_dim: int | None = None,
        cross_attention_heads: int = 1,
        cross_attention_scale: float | None = 1.0,
        num_transformer_blocks: int = 4,
        num_iterations: int = 2,
        ffn_units: int | None = None,
        classifier_units: int | None = None,
        dropout_rate: float = 0.2,
        attention_dropout_rate: float = 0.1,
        logit_dropout: bool = True,
        weight_sharing: str = "all",
        position_encoding: str = "learned",
        fourier_num_bands: int = 64,
        fourier_max_freq: float | None = None,
        latent_init_std: float = 0.05,
        layer_norm_eps: float = 1e-6,
        permute_inputs: bool = False,
        permutation_seed: int = 0,
        fold_attention_weights: bool = True,
        conv_stem: int | None = None,
    ) -> None:
        super().__init__()
        key_dim = projection_dim if key_dim is None else key_dim
        ffn_units = projection_dim if ffn_units is None else ffn_units
        classifier_units = projection_dim if classifier_units is None else classifier_units
        check_arguments(**{name: value for name, value in locals().items() if name in ARGUMENTS})
        self.num_classes, self.latent_init_std = num_classes, latent_init_std
        encoding = (position_encoding, fourier_num_bands, fourier_max_freq, conv_stem)
        self.encoder = PatchEncoder(image_size, patch_size, in_channels, projection_dim, *encoding)
        # The paper's Table 2: one fixed shuffle of the inputs *after* their position encoding is attached,
        # so each input keeps its own position; cross-attention ignores the order, so the logits don't change.
        self.permutation = FixedPermutation(self.encoder.num_patches, permutation_seed) if permute_inputs else None
        self.latents = nn.Parameter(torch.empty(latent_dim, projection_dim))
        self.cross_index, self.latent_index = sharing_plan(weight_sharing, num_iterations)
        dropouts = (dropout_rate, attention_dropout_rate, layer_norm_eps)
        self.cross_attends = nn.ModuleList(
            CrossAttention(projection_dim, cross_attention_heads, ffn_units, *dropouts, cross_attention_scale)
            for _ in range(max(self.cross_index) + 1)
        )
        self.latent_transformers = nn.ModuleList(
            LatentTransformer(
                num_transformer_blocks, projection_dim, num_heads, key_dim, ffn_units, *dropouts, fold_attention_weights
            )
            for _ in range(max(self.latent_index) + 1)
        )
        # The example ends in Dropout *after* the logits (create_ffn always appends one); logit_dropout=False drops it
        self.head = FeedForward(projection_dim, classifier_units, num_classes, dropout_rate if logit_dropout else 0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras initialisers: Glorot-uniform kernels, zero biases, U(-0.05, 0.05) embeddings,
        N(0, latent_init_std) latents (Keras `random_normal` has std 0.05)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.uniform_(module.weight, -0.05, 0.05)
        nn.init.normal_(self.latents, std=self.latent_init_std)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, N, D) final latents."""
        return self._encode(images, None)

    def _encode(self, images: torch.Tensor, maps: list[torch.Tensor] | None) -> torch.Tensor:
        """The forward loop, for `forward_features` and `attention_maps`: with a `maps` list, each cross-attend's
        weights are appended to it, (B, heads, N, M) in the order the model attended in (permuted, if so)."""
        data = self.encoder(images)
        if self.permutation is not None:
            data = self.permutation(data)
        latents = self.latents.unsqueeze(0)
        keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per cross-attend module
        for cross, latent in zip(self.cross_index, self.latent_index, strict=True):
            if cross not in keys_values:
                keys_values[cross] = self.cross_attends[cross].project_data(data)
            if maps is not None:
                maps.append(self.cross_attends[cross].attention_weights(latents, keys_values[cross][0]))
            latents = self.cross_attends[cross](latents, data, keys_values[cross])
            latents = self.latent_transformers[latent](latents)
        return latents

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, unpermute: bool = True) -> list[torch.Tensor]:
        """Cross-attention weights, to see where the latents look: one (B, cross_attention_heads, N, M) tensor
        per iteration, in application order (following `cross_index`); each row sums to 1 over the M inputs.

        They are the softmax weights of the same forward pass: in eval mode (`model.eval()`) exactly what the logits
        use; the mode is left as it is. With `permute_inputs`, `unpermute=True` puts the M axis back in patch-grid
        (row-major) order so a map can be drawn on the image; `unpermute=False` keeps the order attended in.
        """
        maps: list[torch.Tensor] = []
        self._encode(images, maps)
        if unpermute and self.permutation is not None:
            maps = [self.permutation.undo(weights, dim=-1) for weights in maps]
        return maps

    def forward_head(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, D) final latents -> (B, num_classes) logits: mean over latents, then the classifier."""
        return self.head(latents.mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_flops(self, batch_size: int) -> tuple[int, int]:
        """(FLOPs of the forward pass of one batch, of which the first layer's): matrix products and convolutions,
        2 per multiply-add, as `torch.utils.flop_counter` counts them, of `forward` with the self-attention unfolded:
        the model's FLOPs, the measure of MFU (the folded self-attention on the CPU computes the same with fewer).
        The data's keys and values are computed once per cross-attention module."""
        m = self.encoder.num_patches
        n, d = self.latents.shape
        encoder, first = self.encoder.multiply_adds()
        per_image = len(set(self.cross_index)) * m * d * 2 * d  # keys and values, once per module
        shared = 0
        for step, (c, t) in enumerate(zip(self.cross_index, self.latent_index, strict=True)):
            if step == 0:
                shared += n * d * d  # the first queries, once per batch: the latents are the same for every image
            else:
                per_image += n * d * d
            ffn_hidden = self.cross_attends[c].ffn[0].out_features
            per_image += 2 * n * m * d + 2 * n * d * ffn_hidden  # scores and weighted sum; feed-forward
            for block in self.latent_transformers[t]:
                qkv_width = block.attention.qkv.out_features
                inner = qkv_width // 3  # heads x key_dim
                hidden = block.ffn[0].out_features
                per_image += n * d * qkv_width + 2 * n * n * inner + n * inner * d + 2 * n * d * hidden
        head_in, head_hidden = self.head[0].in_features, self.head[0].out_features
        per_image += head_in * head_hidden + head_hidden * self.head[2].out_features
        return 2 * (batch_size * (per_image + encoder) + shared), 2 * batch_size * first

    def training_flops(self, batch_size: int) -> int:
        """FLOPs of one training step on `batch_size` images: a product's backward pass costs two products
        (input and weight gradients), except the first layer's, whose input (the image) needs no gradient."""
        forward, first = self.forward_flops(batch_size)
        return 3 * forward - first


ARGUMENTS = tuple(inspect.signature(Perceiver).parameters)  # what check_arguments is given


def check_arguments(**args: object) -> None:
    """Reject impossible settings with a message naming the argument, its value and what is valid."""
    positive = (
        "image_size",
        "patch_size",
        "in_channels",
        "num_classes",
        "latent_dim",
        "projection_dim",
        "num_heads",
        "key_dim",
        "cross_attention_heads",
        "num_transformer_blocks",
        "num_iterations",
        "ffn_units",
        "classifier_units",
        "fourier_num_bands",
    )
    checks.positive_integers(args, positive)
    checks.rates(args, ("dropout_rate", "attention_dropout_rate"))
    checks.booleans(args, ("fold_attention_weights",))
    checks.patches_tile(args["image_size"], args["patch_size"])
    heads, width = args["cross_attention_heads"], args["projection_dim"]
    checks.heads_divide("cross_attention_heads", heads, "projection_dim", width, "the cross-attention")
    _check_choice("weight_sharing", args["weight_sharing"], WEIGHT_SHARING)
    _check_choice("position_encoding", args["position_encoding"], POSITION_ENCODINGS)
    max_freq = args["fourier_max_freq"]
    if max_freq is not None and (not isinstance(max_freq, int | float) or max_freq < 2):
        raise ValueError(
            f"fourier_max_freq={max_freq!r} is invalid: it must be a number >= 2 "
            "(or null for the patch grid's Nyquist frequency)"
        )
    scale = args["cross_attention_scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0):
        raise ValueError(
            f"cross_attention_scale={scale!r} is invalid: it must be a positive number (or null for 1/sqrt(head width))"
        )
    std = args["latent_init_std"]
    if not isinstance(std, int | float) or std <= 0:
        raise ValueError(f"latent_init_std={std!r} is invalid: it must be a positive number")
    check_permutation_arguments(args["permute_inputs"], args["permutation_seed"])
    _check_conv_stem(args["conv_stem"], args["patch_size"])


def _check_conv_stem(channels: object, patch_size: int) -> None:
    if channels is None:
        return
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"conv_stem={channels!r} is invalid: it must be a positive number of channels (or null)")
    if patch_size % 2:
        raise ValueError(
            f"conv_stem={channels} needs an even patch_size (the stem halves the image's side): got patch_size="
            f"{patch_size}; use an even patch_size or conv_stem=null"
        )


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: choose one of {', '.join(choices)}")
