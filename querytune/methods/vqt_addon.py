"""VQT as an add-on to the feature-adapting methods: ``vqt+lora``, ``vqt+adaptformer``, ``vqt+vpt``.

The adapting part (LoRA on q and v, AdaptFormer's adapters, VPT's prompts) changes the
trunk, which runs with autograd. VQT's queries then read the *adapted* normalised block
inputs through the adapted blocks: the rows forward sees LoRA's effective q/v weights
and the adapter beside each MLP. One linear head reads VQT's head input (the adapted
pooled final feature and the query summaries). Options of both parts apply, and the
gradient reaches the queries, the adapting part and the head. Head compression
(``--compress``) works as for ``vqt``.

With VPT, the queries' context at block l is the whole sequence entering block l,
prompts included (class, registers, prompts, patches), as in the VQT paper's VPT + VQT:
the queries read the prompts like any other token, while no token (prompt or not)
attends to the queries.

Training defaults are those of the adapting method: the part that backpropagates
through the trunk is the one that needs the gentler learning rate (VQT's own Adam at
0.05 would wreck LoRA or the adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..backbones.vit import VisionTransformer
from ..trunk import TrunkInput
from .adaptformer import AdaptFormer, AdaptFormerOptions, add_adapters
from .lora import LoRA, LoRAOptions, add_lora
from .registry import register
from .vpt import VPT, Prompts, VPTOptions
from .vqt import VQT, VQTOptions


class VQTAddOn(VQT):
    """VQT whose queries read the trunk of a feature-adapting method (set up by the subclass)."""

    reads = TrunkInput.IMAGES
    inserted_tokens = 0  # tokens before_block puts after the prefix tokens (VPT's prompts)

    def before_block(self, index: int, x: Tensor) -> Tensor:
        """A change to the tokens entering block ``index`` (VPT's prompts); none by default."""
        return x

    def published_way(self) -> None:
        return None  # the naive VQT runs the plain trunk, not the add-on's

    def head_input(self, images: Tensor) -> Tensor:
        layers: list[Tensor] = []
        x = self.backbone.run_blocks(self.backbone.embed(images), self.before_block,
                                    lambda _, u: layers.append(u))
        return self.query_path(layers, self.backbone.pool(x, self.inserted_tokens), self.backbone.blocks)


@dataclass
class VQTLoRAOptions(VQTOptions, LoRAOptions):
    pass


@dataclass
class VQTAdaptFormerOptions(VQTOptions, AdaptFormerOptions):
    pass


@dataclass
class VQTVPTOptions(VQTOptions, VPTOptions):
    pass  # VPTOptions.__post_init__ sets the prompt dropout's default


@register
class VQTWithLoRA(VQTAddOn):
    name = "vqt+lora"
    Options = VQTLoRAOptions
    train_defaults = LoRA.train_defaults

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: VQTLoRAOptions) -> None:
        super().__init__(backbone, num_classes, options)
        add_lora(backbone, options)


@register
class VQTWithAdaptFormer(VQTAddOn):
    name = "vqt+adaptformer"
    Options = VQTAdaptFormerOptions
    train_defaults = AdaptFormer.train_defaults

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: VQTAdaptFormerOptions) -> None:
        super().__init__(backbone, num_classes, options)
        add_adapters(backbone, options)


@register
class VQTWithVPT(VQTAddOn):
    name = "vqt+vpt"
    Options = VQTVPTOptions
    train_defaults = VPT.train_defaults

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: VQTVPTOptions) -> None:
        super().__init__(backbone, num_classes, options)
        self.prompts = Prompts(backbone, options)
        self.inserted_tokens = options.prompts

    def before_block(self, index: int, x: Tensor) -> Tensor:
        return self.prompts.before_block(index, x)
