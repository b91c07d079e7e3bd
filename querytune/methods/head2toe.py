"""Head2Toe: a linear head on selected features of every layer (Evci et al., ICML 2022).

The frozen trunk's features of every layer are pooled, each layer's group scaled to unit L2
norm, and concatenated with the final class token's; a linear head trained on all of them
with a group-lasso penalty ranks the features, and a fresh head is trained on the top
fraction. Nothing before the head trains, so the trunk runs once (or is read from the feature
cache) and grid members share the pooled features.

Formulation, from the official code (github.com/google-research/head2toe, models/finetune.py
and finetune_fs.py):

- **Features.** A (B, N, D) output is average-pooled over windows of tokens, flattened
  window-major, to about ``target_size`` T features (with T at most D, the mean token). Each
  group is scaled to unit L2 norm (a zero row stays zero) before it is concatenated.
- **Selection** (``connectivity_l2``): a head trained with ``group_lasso`` times the sum over input
  features of the L2 norm of their weight columns; each feature scores the sum of its squared
  weights; the top int(F * ``keep_fraction``) features are kept. The final head reads them,
  each group's kept features scaled to unit norm anew, and trains without the penalty. Both
  heads start as Keras' ``Dense`` (Glorot-uniform weight, zero bias) and train with the same
  settings.

What querytune reads: per block l the normalised block input ``norm1(X_l)`` (what the feature
cache holds, :mod:`querytune.trunk.features`), and the final class token. The official ViT-B/16
configuration (finetune_h2t.py) also pools the attention and MLP outputs inside each block;
the cache does not hold those, so they are not among the features. The official windows are
int(N / (T / D)) tokens long, as many as fit in N with the trailing tokens left out; here there
are always T // D windows (at least one) of about N / (T // D) tokens that cover all N (adaptive
average pooling, neighbouring windows sharing a token where N is not a multiple), so
that the head's size does not depend on the input size. At the paper's setting (ViT-B/16,
224 px, 197 tokens) both make the same number of windows for every T it uses (512 to 8192).

Training here: the main training is the group-lasso head; :meth:`Head2Toe.post_train` selects the
features and trains the final head on them, on the pooled features computed once.

Defaults: the README's dSprites-orientation command: target size 512, keep 0.2, group lasso
1e-5, Adam at lr 0.01 with cosine decay to 0 and no warm-up or weight decay, 500 steps of
batch 128 (63 epochs of VTAB-1k's 1,000 training images). The paper picks these per task on
validation data; ``querytune bench --search`` searches lr {0.1, 0.01}, the official config's
default and the README's, crossed with keep_fraction {0.2, 0.05, 1.0} (the default, fewer features for
fewer images, and no selection; see docs/small-data.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..options import option
from ..trunk import TrunkInput
from ..trunk.features import Features
from .base import Method, SharedRows, concatenated
from .heads import (
    SelectingHead,
    apply_stacked_heads,
    group_lasso,
    grouped,
    precompute,
    stack_heads,
    stacked,
    train_head,
)
from .registry import register


@dataclass
class Head2ToeOptions:
    target_size: int = option(512, "features a layer is pooled to (tokens averaged in windows); at most the "
                                   "width: the mean token", min=0)
    keep_fraction: float = option(0.2, "fraction of the features the final head reads", min=0, max=1,
                                  min_open=True)
    group_lasso: float = option(1e-5, "group-lasso coefficient of the head that ranks the features", min=0)


def pooled_windows(target_size: int, dim: int) -> int:
    """How many windows a layer's tokens are averaged in: as many as fit ``target_size`` features, at least one."""
    return max(1, target_size // dim)


def pool_tokens(tokens: Tensor, windows: int) -> Tensor:
    """(B, N, D) tokens -> (B, windows * D): the means over ``windows`` consecutive runs of tokens that
    cover them all, window-major."""
    count = tokens.shape[1]
    # adaptive average pooling's windows, written out (the ONNX exporter cannot take adaptive_avg_pool1d)
    bounds = [(i * count // windows, -(-(i + 1) * count // windows)) for i in range(windows)]
    return torch.cat([tokens[:, start:end].mean(1) for start, end in bounds], dim=1)


def dense_head(in_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """``nn.Linear`` initialised as Keras' ``Dense``: Glorot-uniform weight, zero bias."""
    head = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        nn.init.xavier_uniform_(head.weight, generator=generator)
        head.bias.zero_()
    return head


def pooled_groups(features: Features, windows: int) -> list[Tensor]:
    """The pooled features, one (B, size) group per layer after the final class token's (float32)."""
    assert features.layers is not None  # Head2Toe reads LAYERS
    pooled = [pool_tokens(layer, windows).float() for layer in features.layers.unbind(1)]
    return [features.pooled.float(), *pooled]


class Head2ToeHeads(SharedRows):
    """Head2Toe heads served together. Tasks of one pooling, kept-feature count and class count are answered
    as one group: their kept features gathered from the pooled features, each task's kept features of a layer
    scaled to unit norm (a scatter-add of the squares per task and layer), and their heads as one batched matmul.
    The heads' weights are copied; the methods are not registered as submodules."""

    def __init__(self, methods: Sequence[Head2Toe]) -> None:
        super().__init__()
        self.methods = list(methods)
        # per group: its pooling windows, tasks, kept features (K, n), their layer groups (K, n), head weights, biases
        self.groups = []
        for (windows, _, _), members in grouped([(m.windows, m.head.in_features, m.num_classes)
                                                 for m in methods]).items():
            group = [self.methods[k] for k in members]
            kept = stacked([method.kept_or_all() for method in group])
            layer_of = stacked([method.layer_of(features) for method, features in zip(group, kept)])
            self.groups.append((windows, members, kept, layer_of, *stack_heads([method.head for method in group])))
        self.layer_groups = 1 + methods[0].backbone.config.depth if methods else 0

    def forward(self, features: Features, backbone: VisionTransformer) -> list[Tensor]:
        logits: dict[int, Tensor] = {}
        pooled: dict[int, Tensor] = {}
        for windows, members, kept, layer_of, weight, bias in self.groups:
            if windows not in pooled:
                pooled[windows] = torch.cat(pooled_groups(features, windows), dim=-1)
            inputs = pooled[windows][:, kept]  # B, K, n
            layers = layer_of.expand(inputs.shape[0], -1, -1)
            squares = inputs.new_zeros(*inputs.shape[:2], self.layer_groups).scatter_add_(2, layers, inputs.square())
            inputs = inputs / squares.sqrt().clamp_min(1e-12).gather(2, layers)  # F.normalize per task and layer
            logits.update(zip(members, apply_stacked_heads(inputs, weight, bias).unbind(1)))
        return [logits[k] for k in range(len(self.methods))]

    @classmethod
    def merge(cls, parts: Sequence[Head2ToeHeads]) -> tuple[Head2ToeHeads, list[list[int]]]:
        return concatenated(cls, [part.methods for part in parts])


@register
class Head2Toe(SelectingHead):
    name = "head2toe"
    reads = TrunkInput.LAYERS
    not_mergeable = "its head reads pooled features of every layer"
    Options: ClassVar[type[Head2ToeOptions]] = Head2ToeOptions
    train_defaults = {"epochs": 63, "warmup_epochs": 0, "batch_size": 128, "optimizer": "adam", "lr": 0.01,
                      "weight_decay": 0.0, "min_lr": 0.0}
    search_grid = {"lr": (0.1, 0.01), "weight_decay": (0.0,)}
    # the fraction was tuned per task on 1,000 images; the members share the ranking head's training and
    # differ only in the final head (post_train)
    search_options = {"keep_fraction": (0.2, 0.05, 1.0)}

    def __init__(self, backbone, num_classes, options: Head2ToeOptions) -> None:
        super().__init__(backbone, num_classes, options)
        config = backbone.config
        self.windows = pooled_windows(options.target_size, config.embed_dim)
        self.head = dense_head(config.embed_dim * (1 + config.depth * self.windows), num_classes)

    def groups(self, features: Features) -> list[Tensor]:
        """The pooled features, one (B, size) group per layer after the final class token's."""
        return pooled_groups(features, self.windows)

    def kept_or_all(self) -> Tensor:
        """The features the head reads: the kept ones, or all of them."""
        if self.kept_features is not None:
            return self.kept_features
        return torch.arange(self.head.in_features, device=self.head.weight.device)

    def layer_of(self, features: Tensor) -> Tensor:
        """The group (0: the final class token, then one per layer) of each of these features."""
        dim = self.backbone.config.embed_dim
        return (features - dim).div(dim * self.windows, rounding_mode="floor").add(1).clamp_min(0)

    def shared_rows(self) -> Head2ToeHeads:
        return Head2ToeHeads([self])

    def head_input(self, groups: Sequence[Tensor]) -> Tensor:
        """Each group's (kept) features at unit norm, concatenated."""
        if self.kept_features is None:
            return torch.cat([F.normalize(group, dim=-1) for group in groups], dim=-1)
        pieces, start = [], 0
        for group in groups:
            end = start + group.shape[1]
            kept = self.kept_features[(self.kept_features >= start) & (self.kept_features < end)] - start
            if len(kept):
                pieces.append(F.normalize(group[:, kept], dim=-1))
            start = end
        return torch.cat(pieces, dim=-1)

    def forward(self, features: Features) -> Tensor:
        return self.head(self.head_input(self.groups(features)))

    @staticmethod
    def forward_members(members: Sequence[Method], inputs: Any,
                        random_stream: Callable[[int], AbstractContextManager[None]]) -> list[Tensor]:
        """The members' features are the same (nothing before the head trains): pooled once."""
        heads = cast("list[Head2Toe]", members)
        groups = heads[0].groups(inputs)
        return [head.head(head.head_input(groups)) for head in heads]

    def loss_penalty(self) -> Tensor | None:
        if self.kept_features is not None or not self.options.group_lasso:
            return None
        return self.options.group_lasso * group_lasso(self.head.weight)

    def post_train(self, source: Any, cfg: Any, device: torch.device) -> dict[str, Any]:
        """Rank the features by the trained head's squared weights, keep the top fraction, and train a fresh
        head on them (on the pooled features, computed once)."""
        scores = self.head.weight.detach().pow(2).sum(0)
        total = len(scores)
        kept_count = max(1, int(total * self.options.keep_fraction))
        kept = scores.topk(kept_count).indices.sort().values
        pooled = precompute(lambda features: torch.cat(self.groups(features), dim=-1), source, device, cfg)
        dim = self.backbone.config.embed_dim
        sizes = [dim] + [dim * self.windows] * self.backbone.config.depth
        generator = torch.Generator().manual_seed(cfg.seed)  # the same fresh head on every rank
        head = dense_head(kept_count, self.num_classes, generator).to(device)
        self.keep_features(kept, head)
        train_head(head, lambda rows: self.head_input(rows.split(sizes, dim=1)), pooled, cfg, device, 0.0)
        return {"kept_features": kept_count, "total_features": total}
