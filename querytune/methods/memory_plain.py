"""Learnable memory tokens, plain (Sandler et al., CVPR 2022): every token of the backbone
attends to the memory, so the features change and the trunk runs with autograd (this
trains like VPT-deep). The head reads the final class token; ``--train-class-token`` also
trains the class token's input. The non-destructive variant is :mod:`.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..options import option
from ..trunk import TrunkInput
from .base import Method
from .memory import MEMORY_INIT_STD, SEARCH_GRID, TRAIN_DEFAULTS
from .registry import register


@dataclass
class MemoryPlainOptions:
    memory_tokens: int = option(5, "memory tokens per layer (m; 0 for none)", min=0)
    train_class_token: bool = option(True, "train the (new) class token")


@register
class MemoryPlain(Method):
    name = "memory-plain"
    reads = TrunkInput.IMAGES
    not_mergeable = "its memory tokens join every block's attention"
    Options = MemoryPlainOptions
    train_defaults = TRAIN_DEFAULTS
    search_grid = SEARCH_GRID

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: MemoryPlainOptions) -> None:
        super().__init__(backbone, num_classes, options)
        depth, dim = backbone.config.depth, backbone.config.embed_dim
        class_token = backbone.class_token_input()[0].detach().clone()  # (D,)
        memory = torch.randn(depth, options.memory_tokens, dim) * MEMORY_INIT_STD
        self.class_token = nn.Parameter(class_token, requires_grad=options.train_class_token)
        self.memory = nn.Parameter(memory, requires_grad=memory.numel() > 0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.backbone.embed(images)
        # the class token's input is always ours: untrained it equals the backbone's, value for value
        x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x[:, 1:]], dim=1)
        x = self.backbone.run_blocks(x, memory=self.memory if self.options.memory_tokens else None)
        return self.head(self.backbone.pool(x))
