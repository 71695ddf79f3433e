"""A Vision Transformer (timm) of about the default Perceiver's size: the baseline of the permutation ablation.

The Perceiver paper (Jaegle et al., 2021, Table 2) shuffles the pixels of every image by one fixed
permutation: models that rely on the 2-D grid (a ViT's patches mix neighbouring pixels) degrade,
the Perceiver does not. Here the shuffle is applied to the image's pixels before the patch embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver.models import checks
from perceiver.models.permutation import FixedPermutation, check_permutation_arguments
from perceiver.models.registry import register_model


@register_model
class ViT(nn.Module):
    """timm's `VisionTransformer` (class token, learned position embeddings, pre-LayerNorm blocks),
    trained from scratch, with an optional fixed pixel permutation in front.

    The defaults (embed_dim 256, depth 12, 8 heads, patch 4 on 64 x 64 images: 256 tokens) give
    9,581,924 trainable parameters for 100 classes, 1.2% fewer than the default Perceiver's 9,697,637.
    """

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 100,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        permute_inputs: bool = False,
        permutation_seed: int = 0,
    ) -> None:
        super().__init__()
        check_arguments(
            image_size=image_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            drop_path_rate=drop_path_rate,
            permute_inputs=permute_inputs,
            permutation_seed=permutation_seed,
        )
        self.num_classes = num_classes
        self.permutation = FixedPermutation(image_size * image_size, permutation_seed) if permute_inputs else None
        import timm  # here, not at the top: importing timm also imports wandb when it is installed

        # Every architecture argument is overridden; the name only picks timm's ViT family, never weights.
        self.vit = timm.create_model(
            "vit_small_patch16_224",
            pretrained=False,
            img_size=image_size,
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_rate=dropout_rate,  # before the classifier
            proj_drop_rate=dropout_rate,  # after every attention projection and MLP
            attn_drop_rate=attention_dropout_rate,
            drop_path_rate=drop_path_rate,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, num_classes) logits."""
        if self.permutation is not None:
            images = self.permutation.permute_pixels(images)
        return self.vit(images)

    def forward_flops(self, batch_size: int) -> tuple[int, int]:
        """(FLOPs of timm's ViT forward pass for one batch, of which the patch embedding's), counted as
        `Perceiver.forward_flops` counts them."""
        vit = self.vit
        tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
        d = vit.embed_dim
        embedding = vit.patch_embed.num_patches * vit.patch_embed.proj.weight[0].numel() * d
        per_image = d * vit.num_classes
        for block in vit.blocks:
            per_image += tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d
            per_image += 2 * tokens * d * block.mlp.fc1.out_features
        return 2 * batch_size * (per_image + embedding), 2 * batch_size * embedding

    def training_flops(self, batch_size: int) -> int:
        """FLOPs of one training step; the patch embedding's input needs no gradient."""
        forward, embedding = self.forward_flops(batch_size)
        return 3 * forward - embedding


def check_arguments(**args: object) -> None:
    """Reject impossible settings with a message naming the argument, its value and what is valid."""
    checks.positive_integers(
        args, ("image_size", "patch_size", "in_channels", "num_classes", "embed_dim", "depth", "num_heads")
    )
    ratio = args["mlp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio <= 0:
        raise ValueError(f"mlp_ratio={ratio!r} is invalid: it must be a positive number")
    checks.rates(args, ("dropout_rate", "attention_dropout_rate", "drop_path_rate"))
    checks.patches_tile(args["image_size"], args["patch_size"])
    checks.heads_divide("num_heads", args["num_heads"], "embed_dim", args["embed_dim"], "the attention")
    check_permutation_arguments(args["permute_inputs"], args["permutation_seed"])
