"""Fresh linear heads trained on a method's frozen head inputs, after its main training: VQT's head
compression (:func:`querytune.methods.vqt.compress_head`) and Head2Toe's final head
(:mod:`querytune.methods.head2toe`) both rank features by a group-lasso head and retrain on the kept ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed
from ..train import Learner, Schedule, TrainConfig, make_optimizer, train_epoch
from ..trunk.device import to_device
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
    so that a method's dropout stays on if it is in train mode) plus ``lasso`` times :func:`group_lasso`,
    by the training loop's step and epoch (:func:`querytune.train.train_epoch`): the optimiser of ``cfg``
    restricted to Adam with weight decay on the weight only, its warm-up + cosine schedule per step, its
    epochs and batch size; no clipping, label smoothing or gradient scaling (the head computes in float32).
    Every process trains the whole head alike."""
    head_cfg = replace(cfg, optimizer="adam", grad_clip=None, label_smoothing=0.0)
    params = list(head.parameters())
    learner = Learner(head_cfg, params, make_optimizer(params, head_cfg, decay_vectors=False),
                      torch.amp.GradScaler(device.type, enabled=False),
                      lambda: lasso * group_lasso(head.weight) if lasso else None)

    def logits_of(inputs: Any) -> list[Tensor]:
        with torch.no_grad(), cfg.resolved_precision.autocast(device):
            features = head_input(inputs).float()
        return [head(features)]

    schedule = Schedule.of(cfg, len(source))
    with distributed.alone():  # no slicing of the batches, no gradient sum
        for epoch in range(cfg.epochs):
            train_epoch([learner], logits_of, source, epoch, schedule, cfg, device)


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
