"""Learnable memory tokens, plain (Sandler et al., CVPR 2022): every token of the backbone
attends to the memory (each block's ``attn`` becomes a :class:`MemoryAttention`), so the features
change and the trunk runs with autograd (this trains like VPT-deep). The head reads the final
class token; ``--train-class-token`` also trains the class token's input. On a backbone without a
class token (SigLIP) the method adds one as a row: it reads the tokens, itself and the memory at
every block (:meth:`Block.forward_rows`), the tokens do not read it, and the head reads it after
the final norm. The non-destructive variant is :mod:`.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbones.vit import Attention, VisionTransformer
from ..errors import ConfigError
from ..options import option
from ..trunk import TrunkInput
from .base import Method
from .memory import MEMORY_INIT_STD, SEARCH_GRID, TRAIN_DEFAULTS, initial_class_token
from .registry import register


@dataclass
class MemoryPlainOptions:
    memory_tokens: int = option(5, "memory tokens per layer (m; 0 for none)", min=0)
    train_class_token: bool = option(True, "train the (new) class token")


class MemoryAttention(Attention):
    """A block's attention whose keys and values also come from its memory tokens (normalised by the block's
    ``norm1``; they have no outputs): plain memory puts it in place of the block's ``attn``, as LoRA puts
    ``LoRAQKV`` in place of its ``qkv``. It shares the base attention's projections (the same tensors, under
    the same names); the memory, ``memory[index]`` (m, D), stays the method's parameter."""

    def __init__(self, base: Attention, norm: nn.LayerNorm, memory: nn.Parameter, index: int) -> None:
        nn.Module.__init__(self)
        self.rope, self.num_heads, self.head_dim, self.scale = base.rope, base.num_heads, base.head_dim, base.scale
        self.qkv, self.proj = base.qkv, base.proj
        self.shared = (norm, memory, index)  # a tuple: not submodules or parameters of this module

    def forward(self, u: Tensor) -> Tensor:
        norm, memory, index = self.shared
        q, k, v = self.projections(u)
        _, memory_k, memory_v = self.qkv(norm(memory[index]).expand(u.shape[0], -1, -1)).chunk(3, dim=-1)
        return self.attend(q, torch.cat([k, memory_k], dim=1), torch.cat([v, memory_v], dim=1))


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
        class_token = initial_class_token(backbone)  # (D,)
        memory = torch.randn(depth, options.memory_tokens, dim) * MEMORY_INIT_STD
        self.class_token = nn.Parameter(class_token, requires_grad=options.train_class_token)
        self.memory = nn.Parameter(memory, requires_grad=memory.numel() > 0)
        self.head = nn.Linear(dim, num_classes)
        if options.memory_tokens:
            for index, block in enumerate(backbone.blocks):
                if isinstance(block.attn, MemoryAttention):
                    raise ConfigError("the backbone already carries memory; build each method on a freshly "
                                      "loaded backbone")
                block.attn = MemoryAttention(block.attn, block.norm1, self.memory, index)

    def forward(self, images: Tensor) -> Tensor:
        backbone = self.backbone
        x = backbone.embed(images)
        batch = x.shape[0]
        memory = self.memory if self.options.memory_tokens else None
        if backbone.cls_token is not None:
            # the class token's input is always ours: untrained it equals the backbone's, value for value
            x = torch.cat([self.class_token.expand(batch, 1, -1), x[:, 1:]], dim=1)
            return self.head(backbone.pool(backbone.run_blocks(x)))
        rows = self.class_token.expand(batch, 1, -1)

        def class_row(index: int, u: Tensor) -> None:  # our class token reads the tokens, itself and the memory
            nonlocal rows
            extra = rows if memory is None else torch.cat([rows, memory[index].expand(batch, -1, -1)], dim=1)
            rows = backbone.blocks[index].forward_rows(rows, u, extra).out

        backbone.run_blocks(x, after_norm=class_row)
        return self.head(backbone.norm(rows[:, 0]))
