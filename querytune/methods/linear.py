"""Linear probe: a linear head on the frozen trunk's pooled final feature (the normalised final class token,
or with ``global_pool`` the normalised mean of the patch tokens)."""

from __future__ import annotations

from torch import Tensor, nn

from ..trunk import TrunkInput
from ..trunk.features import Features
from .base import Method
from .registry import register


@register
class LinearProbe(Method):
    name = "linear"
    reads = TrunkInput.CLASS_TOKEN
    not_mergeable = None
    train_defaults = {"epochs": 100, "optimizer": "adamw", "lr": 0.03, "weight_decay": 1e-4, "batch_size": 64}

    def __init__(self, backbone, num_classes, options) -> None:
        super().__init__(backbone, num_classes, options)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, features: Features) -> Tensor:
        return self.head(features.pooled)
