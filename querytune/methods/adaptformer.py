"""AdaptFormer: a scaled bottleneck adapter beside every MLP (Chen et al., NeurIPS 2022).

Per block, the adapter reads the MLP's input (the residual stream after attention,
before ``norm2``) and its output is added beside the MLP branch:

    X_{l+1} = A + LS2(MLP(LN2(A))) + s * up(dropout(ReLU(down(A))))

``down`` (D -> 64) keeps PyTorch's Linear init (kaiming-uniform, a = sqrt(5)), ``up``
(64 -> D) and both biases start at zero, so a new model equals the backbone exactly.
The backbone stays frozen; the adapters and a new linear head on the final class
token train. Each block becomes an :class:`AdaptedBlock` holding the block's own modules and
the adapter (``blocks.N.mlp_parallel``), as plain memory puts its ``MemoryAttention`` in place
of ``attn`` and LoRA its ``LoRAQKV`` in place of ``qkv``: the block itself is the one module
that sees the MLP's un-normalised input.

Defaults from the official code (github.com/ShoufaChen/AdaptFormer, main_image.py and
models/adapter.py): bottleneck 64, scale 0.1, "parallel" placement, no LayerNorm in
the adapter, "lora" init, dropout 0.1 inside the adapter; training with SGD
(momentum 0.9), lr 0.1 x batch / 256, no weight decay, 100 epochs, 20 warm-up epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..backbones.vit import Block, VisionTransformer
from ..errors import ConfigError
from ..options import option
from ..trunk import TrunkInput
from .base import Method
from .registry import register


@dataclass
class AdaptFormerOptions:
    adapter_dim: int = option(64, "adapter bottleneck width", min=1)
    adapter_scale: float = option(0.1, "scale of the adapter's output")
    adapter_dropout: float = option(0.1, "dropout inside the adapter", min=0, max=1, max_open=True)


class ParallelAdapter(nn.Module):
    """s * up(dropout(ReLU(down(a)))), zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, a: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(a)))) * self.scale


class AdaptedBlock(Block):
    """A block with a :class:`ParallelAdapter` beside its MLP branch: AdaptFormer puts it in the block's place.
    It holds the base block's modules (the same tensors under the same names) and the adapter as
    ``mlp_parallel``; every forward (the ordinary one and the rows one) adds the adapter through
    :meth:`mlp_branch`."""

    def __init__(self, base: Block, adapter: ParallelAdapter) -> None:
        nn.Module.__init__(self)
        for name, module in base.named_children():
            self.add_module(name, module)
        self.checkpointing = base.checkpointing
        self.mlp_parallel = adapter

    def mlp_branch(self, a: Tensor) -> Tensor:
        return super().mlp_branch(a) + self.mlp_parallel(a)


def add_adapters(backbone: VisionTransformer, options: AdaptFormerOptions) -> None:
    """Put a :class:`ParallelAdapter` beside every block's MLP (the backbone stays frozen)."""
    device = backbone.device
    for index, block in enumerate(backbone.blocks):
        if isinstance(block, AdaptedBlock):
            raise ConfigError("the backbone already carries adapters; build each method on a freshly loaded backbone")
        adapter = ParallelAdapter(backbone.config.embed_dim, options.adapter_dim, options.adapter_scale,
                                  options.adapter_dropout)
        backbone.blocks[index] = AdaptedBlock(block, adapter.to(device))


@register
class AdaptFormer(Method):
    name = "adaptformer"
    reads = TrunkInput.IMAGES
    not_mergeable = "its adapters add a nonlinear branch beside every MLP"
    Options = AdaptFormerOptions
    train_defaults = {"epochs": 100, "warmup_epochs": 20, "batch_size": 64, "optimizer": "sgd",
                      "lr": 0.1 * 64 / 256, "weight_decay": 0.0}

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: AdaptFormerOptions) -> None:
        super().__init__(backbone, num_classes, options)
        add_adapters(backbone, options)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

