"""lucidrains' `perceiver-pytorch` (`Perceiver`), configured as close to a `Setting` as its API allows.

It reads the patch array: images (B, H, W, 3) become a (B, H/p, W/p, p*p*3) grid (`input_axis=2`), so the latents
cross-attend to the same M = `num_inputs` inputs as the example. Shapes match (N latents of width C, one cross head
of width C, `num_heads` x `key_dim` self-attention, `num_blocks` per iteration), the math does not:

- feed-forwards are GEGLU, Linear(C, 8C) -> x * gelu(gate) -> Linear(4C, C) -> Dropout, ~4x the example's FFN cost;
- every attention has an output projection Linear(heads * dim_head, C); q/k/v have no bias; scores are divided by
  sqrt(dim_head) rather than scaled by a learned scalar; the cross-attention's k/v read the raw input channels
  (p*p*3 pixels + Fourier features) with no Dense(C) embedding first;
- positions are fixed Fourier features concatenated to the input channels (`num_freq_bands=6, max_freq=10`, the
  README's values; the constructor has no defaults), not a learned Embedding;
- residuals add the un-normalised stream; LayerNorm eps is 1e-5; the head is mean -> LayerNorm -> Linear, with no
  hidden layer and no dropout on the logits; the latents are initialised N(0, 1).

`weight_tie_layers=True` shares weights only from the second iteration on (the paper's "all but first"), so with
two iterations nothing would be shared; the first block is tied too, to share across all iterations as the example.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.settings import Setting

try:
    from einops.layers.torch import Rearrange
    from perceiver_pytorch import Perceiver
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError('the perceiver-pytorch peer needs perceiver-pytorch: pip install -e ".[bench]"') from error


def build_model(setting: Setting) -> nn.Module:
    """Images (B, H, W, 3) -> patch grid -> `Perceiver` -> logits."""
    p = setting.patch_size
    perceiver = Perceiver(
        input_channels=p * p * 3,
        input_axis=2,
        num_freq_bands=6,
        max_freq=10.0,
        depth=setting.num_iterations,
        num_latents=setting.num_latents,
        latent_dim=setting.channels,
        cross_heads=1,
        cross_dim_head=setting.channels,
        latent_heads=setting.num_heads,
        latent_dim_head=setting.key_dim,
        num_classes=setting.num_classes,
        attn_dropout=setting.attention_dropout_rate,
        ff_dropout=setting.dropout_rate,
        weight_tie_layers=True,
        fourier_encode_data=True,
        self_per_cross_attn=setting.num_blocks,
    )
    for i in range(1, len(perceiver.layers)):  # tie the first block as well (see the module docstring)
        perceiver.layers[i] = perceiver.layers[0]
    return nn.Sequential(Rearrange("b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=p, p2=p), perceiver)


def make_perceiver_pytorch_step(setting: Setting, seed: int = 0) -> tuple[Callable[[], None], int]:
    """One Adam step on a fixed random batch per call (train mode, fp32), and the trainable parameter count."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where bench.measure times
    model = build_model(setting).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    size = setting.image_size
    x = torch.randn(setting.batch_size, size, size, 3, generator=generator).to(device)
    y = torch.randint(0, setting.num_classes, (setting.batch_size,), generator=generator).to(device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step, num_params
