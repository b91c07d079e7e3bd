"""Linear probe: a linear head on the frozen trunk's pooled final feature (the normalised final class token,
or with ``global_pool`` the normalised mean of the patch tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..trunk import TrunkInput
from ..trunk.features import Features
from .base import Method, SharedRows, concatenated
from .heads import joined
from .registry import register


class LinearHeads(SharedRows):
    """Linear probes served together: all read the pooled feature, so their heads, concatenated over the
    classes, are one matmul (a copy of the weights; the heads are not registered as submodules)."""

    def __init__(self, heads: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.heads = list(heads)
        self.weight = joined([head.weight.detach() for head in heads])
        self.bias = joined([head.bias.detach() for head in heads])
        self.classes = [head.out_features for head in heads]

    def forward(self, features: Features, backbone: VisionTransformer) -> list[Tensor]:
        return list(F.linear(features.pooled, self.weight, self.bias).split(self.classes, dim=1))

    @classmethod
    def merge(cls, parts: Sequence[LinearHeads]) -> tuple[LinearHeads, list[list[int]]]:
        return concatenated(cls, [part.heads for part in parts])


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

    def shared_rows(self) -> LinearHeads:
        return LinearHeads([self.head])
