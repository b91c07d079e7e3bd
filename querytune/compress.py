"""VQT head compression (Tu et al., Sec. on parameter efficiency).

1. Freeze the trained query path and compute every training image's head input once.
2. Retrain the head with a group-lasso penalty: the sum over input features j of the
   L2 norm of weight column W[:, j], which drives whole columns to zero.
3. Keep the top fraction of features by column norm and retrain the head on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .train import TrainConfig, autocast, epoch_order, to_device

GROUP_LASSO = 1e-4


@torch.no_grad()
def head_inputs(method: Any, source: Any, device: torch.device, batch_size: int, bf16: bool) -> tuple[Tensor, Tensor]:
    """Every training image's head input (float32), computed in the precision the method trained in."""
    method.eval()
    inputs, labels = [], []
    for features, batch_labels in source.batches(np.arange(len(source)), batch_size):
        with autocast(device, bf16):
            inputs.append(method.head_input(to_device(features, device, bf16)).float())
        labels.append(batch_labels.to(device))
    return torch.cat(inputs), torch.cat(labels)


def fit_head(head: nn.Linear, x: Tensor, y: Tensor, cfg: TrainConfig, group_lasso: float) -> None:
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(epoch_order(len(x), cfg.seed, epoch)).to(x.device)
        for start in range(0, len(x), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(head(x[index]), y[index])
            if group_lasso:
                loss = loss + group_lasso * head.weight.norm(dim=0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def compress_head(method: Any, source: Any, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    keep_fraction = method.options.compress
    x, y = head_inputs(method, source, device, cfg.batch_size, cfg.bf16)
    num_features = x.shape[1]
    params_before = method.head.weight.numel() + method.head.bias.numel()

    lasso_head = nn.Linear(num_features, method.num_classes).to(device)
    lasso_head.load_state_dict(method.head.state_dict())
    fit_head(lasso_head, x, y, cfg, GROUP_LASSO)

    kept_count = max(1, round(keep_fraction * num_features))
    kept = lasso_head.weight.detach().norm(dim=0).topk(kept_count).indices.sort().values
    head = nn.Linear(kept_count, method.num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(lasso_head.weight[:, kept])
        head.bias.copy_(lasso_head.bias)
    fit_head(head, x[:, kept], y, cfg, 0.0)
    method.keep_features(kept, head)
    return {"head_params_before": params_before, "head_params_after": head.weight.numel() + head.bias.numel(),
            "kept_features": kept_count, "total_features": num_features}
