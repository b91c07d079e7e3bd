"""BitFit: train only the backbone's bias terms, and a new head (Ben Zaken et al., ACL 2022).

Every parameter named ``*.bias`` trains, as in BitFit's "all" setting (its code selects
every parameter whose name contains "bias", LayerNorm biases included;
github.com/benzakenelad/BitFit). For a querytune ViT these are, per block, the biases
of ``norm1``, ``attn.qkv`` (q, k and v), ``attn.proj``, ``norm2``, ``mlp.fc1`` and
``mlp.fc2``, plus ``patch_embed.proj.bias`` and the final ``norm.bias``. LayerNorm
gains, LayerScale and every weight matrix stay frozen. (The key bias adds the same
amount to every logit of a query, so it cancels in the softmax and gets no gradient.)

Training (a judgement call; the paper tunes BERT on GLUE): AdamW, lr 1e-3, no weight
decay on the biases (as VPT's protocol, WEIGHT_DECAY_BIAS = 0), 100 epochs, 10 warm-up.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..trunk import TrunkInput
from .base import Method, NoOptions
from .registry import register


@register
class BitFit(Method):
    name = "bitfit"
    reads = TrunkInput.IMAGES
    not_mergeable = None
    train_defaults = {"epochs": 100, "warmup_epochs": 10, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3,
                      "weight_decay": 0.0}
    search_grid = {"lr": (5e-3, 1e-3, 5e-4, 1e-4), "weight_decay": (1e-4, 0.0)}  # AdamW

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: NoOptions) -> None:
        super().__init__(backbone, num_classes, options)
        for name, param in backbone.named_parameters():
            param.requires_grad_(name.endswith(".bias"))
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))
