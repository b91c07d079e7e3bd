"""Fresh linear heads trained on a method's frozen head inputs, after its main training: VQT's head
compression (:func:`querytune.methods.vqt.compress_head`) and Head2Toe's final head
(:mod:`querytune.methods.head2toe`) both rank features by a group-lasso head and retrain on the kept ones.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

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


def apply_stacked_heads(inputs: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Head k (``weight[k]`` (C, F), ``bias[k]`` (C,)) on its own inputs ``inputs[:, k]``: (B, K, F) -> (B, K, C),
    as one batched matmul (how serving answers many tasks' heads of one shape at once)."""
    return torch.baddbmm(bias.unsqueeze(1), inputs.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack``, but one tensor is a view of it (no copy: a lone task's set costs no memory)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def joined(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat``, but one tensor is itself (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def stack_heads(heads: Sequence[nn.Linear]) -> tuple[Tensor, Tensor]:
    """The weights (K, C, F) and biases (K, C) of heads of one shape, for :func:`apply_stacked_heads` (copied where
    there are several)."""
    return stacked([head.weight.detach() for head in heads]), stacked([head.bias.detach() for head in heads])


Key = TypeVar("Key", bound=Hashable)


def grouped(keys: Sequence[Key]) -> dict[Key, list[int]]:
    """The positions of each distinct key, keys in order of first appearance."""
    groups: dict[Key, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups


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
