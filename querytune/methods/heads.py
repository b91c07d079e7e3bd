"""Fresh linear heads trained on a method's frozen head inputs, after its main training: VQT's head
compression (:func:`querytune.methods.vqt.compress_head`) and Head2Toe's final head
(:mod:`querytune.methods.head2toe`) both rank features by a group-lasso head and retrain on the kept ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train import TrainConfig, lr_at, make_optimizer
from ..trunk.device import to_device
from ..trunk.sources import epoch_order
from .base import Method


class SelectingHead(Method):
    """A method whose linear ``head`` may come to read only some of its input features (``kept_features``,
    a buffer saved with the adapter; None: all of them)."""

    head: nn.Linear
    kept_features: Tensor | None

    def __init__(self, backbone: Any, num_classes: int, options: Any) -> None:
        super().__init__(backbone, num_classes, options)
        self.register_buffer("kept_features", None)

    def keep_features(self, kept: Tensor, head: nn.Linear | None = None) -> None:
        """Make the head read only the ``kept`` features (a fresh head of that width unless ``head``)."""
        device = self.head.weight.device
        self.kept_features = kept.to(device)
        self.head = head if head is not None else nn.Linear(len(kept), self.num_classes).to(device)

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "adapter") -> None:
        if "kept_features" in state:
            self.keep_features(state["kept_features"])
        super().load_trainable_state_dict(state, source)


def group_lasso(weight: Tensor) -> Tensor:
    """The group-lasso penalty of a head's ``weight`` (classes, features): the L2 norm of each input
    feature's weight column, summed over the features."""
    return weight.norm(dim=0).sum()


def train_head(head: nn.Linear, head_input: Callable[[Any], Tensor], source: Any, cfg: TrainConfig,
               device: torch.device, lasso: float) -> None:
    """Train ``head`` on ``head_input(batch)`` of ``source`` (computed without gradient, afresh each step,
    so that a method's dropout stays on if it is in train mode) plus ``lasso`` times :func:`group_lasso`:
    the optimiser of ``cfg`` restricted to Adam with weight decay on the weight only, its warm-up +
    cosine schedule per step, its epochs and batch size."""
    optimizer = make_optimizer(list(head.parameters()), replace(cfg, optimizer="adam"), decay_vectors=False)
    steps_per_epoch = math.ceil(len(source) / cfg.batch_size)
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    for epoch in range(cfg.epochs):
        batches = source.batches(epoch_order(len(source), cfg.order_seed, epoch), cfg.batch_size)
        for batch_index, (inputs, labels) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + batch_index, total_steps, warmup_steps, cfg)
            with torch.no_grad(), cfg.resolved_precision.autocast(device):
                x = head_input(to_device(inputs, device, cfg.resolved_precision)).float()
            loss = F.cross_entropy(head(x), labels.to(device))
            if lasso:
                loss = loss + lasso * group_lasso(head.weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


class RowBatches:
    """Precomputed inputs (one row per item) with their labels, as a batch source."""

    def __init__(self, rows: Tensor, labels: np.ndarray) -> None:
        self.rows, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(order), batch_size):
            index = torch.as_tensor(order[start : start + batch_size])
            yield self.rows[index], torch.as_tensor(self.labels[index.numpy()])


@torch.no_grad()
def precompute(rows_of: Callable[[Any], Tensor], source: Any, device: torch.device, cfg: TrainConfig,
               batch_size: int = 256) -> RowBatches:
    """``rows_of(batch)`` for every item of ``source``, in its order, kept on ``device`` in float32."""
    rows = []
    for inputs, _ in source.batches(np.arange(len(source)), batch_size):
        with cfg.resolved_precision.autocast(device):
            rows.append(rows_of(to_device(inputs, device, cfg.resolved_precision)).float())
    return RowBatches(torch.cat(rows), np.asarray(source.labels))
