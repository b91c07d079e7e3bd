"""DTL and DTL+: disentangled transfer learning (Fu, Zhu, Wu, AAAI 2024).

A compact side network beside the frozen ViT. Every block l has a low-rank linear map
(no bias) of the tokens entering it, and the maps' outputs accumulate:

    R_l = sum_{j <= l} B_j A_j X_j        (A_j: r x D, B_j: D x r)

where X_j is block j's input. After each add-back block b (b >= ``add_from_block``),
the swish of the running sum joins the trunk's tokens:

    X_{b+1} = Block_b(X_b) + F(swish(R_b)),    swish(z) = z * sigmoid(beta * z)

F is the identity for DTL; for DTL+ it is a depthwise convolution (one k x k kernel per
channel, no bias, 'same' padding) over the patch tokens on their grid, the class (and
register) tokens passing unchanged. The head is linear on the normalised mean of the
final patch tokens (global average pooling, not the class token), initialised
trunc-normal (std 0.02) with zero bias as in the official code. A starts kaiming-uniform
(a = sqrt(5)), B at zero, so a new model's features are the backbone's pooled patch
tokens. The backbone stays frozen; A, B, the DTL+ convolution and the head train.

Which parts need the trunk's backward: the add-backs change the inputs of the blocks
after the first add-back block, so those blocks are backpropagated through (autograd
keeps their activations). The blocks up to and including the first add-back block get no
gradient (their inputs do not depend on trainable parameters); there autograd keeps only
the low-rank maps' inputs. DTL is therefore not a frozen-trunk (cacheable) method in its
published form; it would be one only if the add-back happened after the last block alone
(``--add-from-block`` = depth - 1 comes closest here, but its maps still read the live
tokens, so it too runs the trunk on images).

Source: github.com/heekhero/DTL (models/vision_transformer.py, train_vit_vtab.py,
train_scripts/vit/vtab/<task>/train_dtl.sh and train_dtl+.sh). Defaults from its VTAB-1k
scripts: rank 2, beta 100, low-rank maps before every block, add-backs after blocks 6-11
of a depth-12 ViT (here: from depth // 2 on), fusion kernel 0 (DTL) and 3 (DTL+; some
tasks use 4 or 5). Training: AdamW, weight decay 0.05 on matrices and none on biases
(``decay_vectors = False``; the 4-D convolution weight decays, as there), batch 32, 100
epochs with 10 warm-up, cosine to 1e-8, lr per task from 1e-4 to 1e-2; the defaults here
are cifar_100's (DTL 3e-4, DTL+ 5e-4).

Deviations from the official code:
- its per-task drop-path (0 to 0.2) on the frozen backbone's blocks is left out: the
  backbone here has no stochastic depth in its forward;
- its fusion reshapes the patch tokens to a hard-coded 14 x 14 grid and keeps only the
  class token's row; here the grid is the input's (height / patch, width / patch) and all
  prefix tokens (class and registers) pass the fusion unchanged;
- its schedule is timm's (per-epoch warm-up from 1e-7, then 10 more epochs at the final
  1e-8, 110 in all); here querytune's per-iteration warm-up from 0 and 100 epochs;
- the low-rank maps and the add-back blocks are given as one first add-back block (the
  official code takes arbitrary block lists; its scripts all use 0-11 and 6-11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..errors import ConfigError
from ..options import option
from ..trunk import TrunkInput
from .base import Method
from .registry import register


@dataclass
class DTLOptions:
    dtl_rank: int = option(2, "rank r of each block's low-rank map in the side network", min=1)
    swish_beta: float = option(100.0, "beta of the swish on the side network's output, z * sigmoid(beta * z)",
                               min=0)
    add_from_block: int | None = option(None, "first block after which the side network's output is added "
                                              "back (default: depth // 2, the second half)", min=0)
    fusion_size: int = option(0, "kernel size of the depthwise convolution over the patch grid on the "
                                 "added-back output (DTL+); 0: none", min=0)


@dataclass
class DTLPlusOptions(DTLOptions):
    fusion_size: int = option(3, "kernel size of the depthwise convolution over the patch grid on the "
                                 "added-back output (DTL+); 0: none", min=0)


def swish(z: Tensor, beta: float) -> Tensor:
    return z * torch.sigmoid(beta * z)


class SideNetwork(nn.Module):
    """The compact side network: per block a low-rank map (A, B), and the optional fusion convolution."""

    def __init__(self, backbone: VisionTransformer, options: DTLOptions) -> None:
        super().__init__()
        config = backbone.config
        dim, depth = config.embed_dim, config.depth
        if options.dtl_rank > dim:  # a map D -> r -> D has rank D at most
            raise ConfigError(f"--dtl-rank {options.dtl_rank}: must be at most the backbone's width {dim}")
        first = depth // 2 if options.add_from_block is None else options.add_from_block
        if not 0 <= first < depth:
            raise ConfigError(f"--add-from-block {first}: must be a block of the backbone, 0 to {depth - 1}")
        widest = 2 * config.grid_size - 1  # a wider kernel reaches past every patch of the pretrained grid
        if options.fusion_size > widest:
            raise ConfigError(f"--fusion-size {options.fusion_size}: must be at most {widest} (twice the "
                              f"backbone's patch grid of {config.grid_size} less one)")
        device = backbone.device
        bound = 1 / math.sqrt(dim)  # kaiming_uniform_(a=sqrt(5)) on an (r, D) matrix
        self.lora_a = nn.Parameter(torch.empty(depth, options.dtl_rank, dim, device=device).uniform_(-bound, bound))
        self.lora_b = nn.Parameter(torch.zeros(depth, dim, options.dtl_rank, device=device))
        self.lora_fusion = (nn.Conv2d(dim, dim, options.fusion_size, padding="same", groups=dim, bias=False,
                                      device=device) if options.fusion_size else None)
        self.first = first
        self.beta = options.swish_beta
        self.prefix = config.num_prefix_tokens
        self.patch_size = config.patch_size

    def low_rank(self, index: int, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_a[index]), self.lora_b[index])

    def added(self, residual: Tensor, grid: tuple[int, int]) -> Tensor:
        """What an add-back adds to the tokens: swish of the running sum, fused over the patch grid for DTL+."""
        act = swish(residual, self.beta)
        if self.lora_fusion is None:
            return act
        prefix, patches = act[:, : self.prefix], act[:, self.prefix :]
        maps = patches.transpose(1, 2).unflatten(2, grid)  # B, D, H, W
        fused = self.lora_fusion(maps).flatten(2).transpose(1, 2)
        return torch.cat([prefix, fused], dim=1)

    def run(self, backbone: VisionTransformer, images: Tensor) -> Tensor:
        """The last block's output tokens (before the final norm) with the side network's add-backs."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        residual: Tensor | None = None

        def before_block(index: int, x: Tensor) -> Tensor:
            nonlocal residual
            if residual is not None and index - 1 >= self.first:  # block index - 1 was an add-back block
                x = x + self.added(residual, grid)
            term = self.low_rank(index, x)
            residual = term if residual is None else residual + term
            return x

        x = backbone.run_blocks(backbone.embed(images), before_block)
        assert residual is not None  # the last block is always an add-back block (first < depth)
        return x + self.added(residual, grid)


@register
class DTL(Method):
    name = "dtl"
    reads = TrunkInput.IMAGES
    not_mergeable = "its side network adds a nonlinear branch to the tokens"
    decay_vectors = False
    Options = DTLOptions
    train_defaults = {"epochs": 100, "warmup_epochs": 10, "batch_size": 32, "optimizer": "adamw",
                      "lr": 3e-4, "weight_decay": 0.05, "min_lr": 1e-8}
    search_grid = {"lr": (1e-2, 5e-3, 1e-3, 3e-4, 1e-4), "weight_decay": (0.05,)}  # the scripts' range, AdamW

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: DTLOptions) -> None:
        super().__init__(backbone, num_classes, options)
        self.side = SideNetwork(backbone, options)
        self.head = nn.Linear(backbone.num_features, num_classes, device=backbone.device)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        x = self.side.run(self.backbone, images)
        return self.head(self.backbone.norm(x[:, self.backbone.config.num_prefix_tokens :].mean(1)))


@register
class DTLPlus(DTL):
    name = "dtl+"
    Options = DTLPlusOptions
    train_defaults = {**DTL.train_defaults, "lr": 5e-4}
