"""VPT: visual prompt tuning (Jia et al., ECCV 2022).

P learnable prompt tokens are inserted after the class (and register) tokens, after
the position embeddings, and every token attends to them:

- shallow: prompts enter block 0 only and then travel through the blocks like any token;
- deep: block l gets its own fresh prompts, which replace the prompt outputs of
  block l-1 (those never reach block l).

Prompts are initialised U(-v, v), v = sqrt(6 / (3 * patch^2 + D)), with dropout on
them while training. The backbone stays frozen; the prompts and a new linear head on
the final class token (after the final norm) train.

Defaults from the official code (github.com/KMnP/vpt): deep prompts; prompt dropout
0.1 for deep (its VTAB-1k final runs) and none for shallow ("we don't use dropout for
VPT-shallow", demo.ipynb). The prompt length is searched per task over {1, 5, 10, 50,
100, 200} in the paper; 10 is our default. Training (configs/base-prompt.yaml,
tune_vtab.py): SGD momentum 0.9, cosine, 100 epochs, 10 warm-up, lr = base x batch /
256 with base from {0.05 ... 50} (1.0 here: 0.25 at batch 64), weight decay from
{0, 1e-4, 1e-3, 1e-2} (1e-3 here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..errors import ConfigError
from ..options import option
from ..trunk import TrunkInput
from .base import Method
from .registry import register


def vpt_init_bound(backbone: VisionTransformer) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch^2 + D)) (Xavier over the patch projection's fan-in)."""
    patch = backbone.config.patch_size
    return math.sqrt(6.0 / (3 * patch * patch + backbone.config.embed_dim))

VPT_MODES = ("deep", "shallow")


@dataclass
class VPTOptions:
    prompts: int = option(10, "prompt tokens per layer (P)", min=1)
    vpt_mode: str = option("deep", "deep (fresh prompts at every block) | shallow", choices=VPT_MODES)
    prompt_dropout: float | None = option(None, "dropout on the prompts (default 0.1 deep, 0 shallow)",
                                          min=0, max=1, max_open=True)

    def __post_init__(self) -> None:
        if self.prompt_dropout is None:
            self.prompt_dropout = 0.1 if self.vpt_mode == "deep" else 0.0


class Prompts(nn.Module):
    """VPT's prompt tokens and where they enter the token sequence."""

    def __init__(self, backbone: VisionTransformer, options: VPTOptions) -> None:
        super().__init__()
        config = backbone.config
        if config.rope:
            raise ConfigError(f"vpt on {config.name}: its prompts would sit among the tokens that rotary position "
                              "embeddings rotate; not supported on RoPE backbones (EVA-02, DINOv3)")
        sets = config.depth if options.vpt_mode == "deep" else 1
        bound = vpt_init_bound(backbone)
        tokens = torch.empty(sets, options.prompts, config.embed_dim, device=backbone.device)
        self.tokens = nn.Parameter(tokens.uniform_(-bound, bound))
        assert options.prompt_dropout is not None  # VPTOptions.__post_init__ sets its default
        self.dropout = nn.Dropout(options.prompt_dropout)
        self.start = config.num_prefix_tokens  # prompts go right after the class and register tokens

    def before_block(self, index: int, x: Tensor) -> Tensor:
        """The tokens entering block ``index``: block 0 gets the prompts inserted; in deep mode
        every later block gets fresh prompts in place of the previous block's prompt outputs."""
        if index >= len(self.tokens):
            return x
        prompts = self.dropout(self.tokens[index].expand(x.shape[0], -1, -1))  # per-sample dropout masks
        rest = x[:, self.start :] if index == 0 else x[:, self.start + prompts.shape[1] :]
        return torch.cat([x[:, : self.start], prompts, rest], dim=1)


@register
class VPT(Method):
    name = "vpt"
    reads = TrunkInput.IMAGES
    not_mergeable = "its prompt tokens join the token sequence"
    Options = VPTOptions
    train_defaults = {"epochs": 100, "warmup_epochs": 10, "batch_size": 64, "optimizer": "sgd",
                      "lr": 1.0 * 64 / 256, "weight_decay": 1e-3}
    # VPT's SGD grid for prompts (tune_vtab.py), scaled by batch/256
    search_grid = {"lr": (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05),
                   "weight_decay": (1e-2, 1e-3, 1e-4, 0.0), "scale_lr_by_batch": True}

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: VPTOptions) -> None:
        super().__init__(backbone, num_classes, options)
        self.prompts = Prompts(backbone, options)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.backbone.run_blocks(self.backbone.embed(images), self.prompts.before_block)
        return self.head(self.backbone.pool(x, inserted=self.prompts.tokens.shape[1]))
