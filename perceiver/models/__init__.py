"""Models: plain `nn.Module`s with typed constructor arguments; no configs, no tracking, no training loop.

Each model owns its arithmetic (`training_flops`), registers itself (`registry.py`), and no model imports another.
"""

from perceiver.models.perceiver import Perceiver
from perceiver.models.permutation import FixedPermutation
from perceiver.models.position import PatchEncoder
from perceiver.models.vit import ViT

__all__ = ["FixedPermutation", "PatchEncoder", "Perceiver", "ViT"]
