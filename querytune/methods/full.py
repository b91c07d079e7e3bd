"""Full fine-tuning: every backbone weight and a new linear head are trained."""

from __future__ import annotations

from torch import Tensor, nn

from ..trunk import TrunkInput
from .base import Method
from .registry import register


@register
class FullFineTune(Method):
    name = "full"
    reads = TrunkInput.IMAGES
    not_mergeable = None
    train_defaults = {"epochs": 100, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 64,
                      "grad_clip": 1.0}
    # VPT's grid for full FT with Adam
    search_grid = {"lr": (1e-3, 5e-4, 1e-4), "weight_decay": (1e-2, 1e-3, 1e-4, 0.0)}

    def __init__(self, backbone, num_classes, options) -> None:
        super().__init__(backbone, num_classes, options)
        backbone.requires_grad_(True)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))
