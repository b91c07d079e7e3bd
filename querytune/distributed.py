"""Data-parallel training with torch.distributed, launched by ``torchrun``.

``torchrun --nproc-per-node N -m querytune train ...`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`init_from_env` joins
them into one process group: gloo on CPU, nccl on CUDA with one GPU per process
(``cuda:LOCAL_RANK``). With one process every helper here does nothing, so the
single-process path is unchanged.

How the work is split:

- ``--batch-size`` is the global batch. Every rank takes an equal contiguous slice of
  each global batch of the epoch's order (:func:`rank_order`), so N processes train on
  the same batches, with the same schedule, as one process.
- Each rank backpropagates its share of the global batch's mean loss and the trainable
  gradients are summed across ranks by hand (:func:`sum_gradients`): the frozen
  backbone has no gradients and is never communicated, and a rank with no part of an
  epoch's last, short batch still joins the sum with zeros. Every rank then takes the
  same optimiser step.
- Training metrics are summed across ranks; evaluation splits the items across ranks.
- Only rank 0 writes run files and shows progress.
- Feature-cache shards are built round-robin by rank (:func:`querytune.trunk.cache.ensure_cache`).
- ``querytune bench`` under torchrun spreads whole tasks over the ranks instead: each rank trains
  its tasks on its own (:func:`alone`), and rank 0 writes the report once all are done.

Run folders and caches must be on a filesystem that every rank can read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device, timeout: timedelta | None = None) -> torch.device:
    """Join the process group torchrun describes (when WORLD_SIZE > 1); return this process's device.
    ``timeout``: how long a collective waits for the other ranks (default: torch's)."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        elif device.type == "cpu":
            dist.init_process_group("gloo", timeout=timeout)
        else:
            raise ConfigError(f"distributed training runs on cpu or cuda, not {device}")
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_alone = False  # see alone()


@contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process works on its own (a bench's rank training its own tasks): the
    helpers here see one process, rank 0, and never communicate."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() and not _alone else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() and not _alone else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def local_batch_size(batch_size: int) -> int:
    """This rank's part of the global ``batch_size``."""
    if batch_size % world_size():
        raise ConfigError(f"batch size {batch_size} does not split evenly over {world_size()} processes")
    return batch_size // world_size()


def rank_order(order: np.ndarray, batch_size: int) -> np.ndarray:
    """This rank's items of ``order``: its slice of every global batch of ``batch_size``.

    Batched by :func:`local_batch_size`, it yields one batch per global batch, except that
    a rank with no part of the last, short global batch has one batch fewer.
    """
    if world_size() == 1:
        return order
    position = np.arange(len(order)) % batch_size
    return order[position // local_batch_size(batch_size) == rank()]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Each value summed over all ranks."""
    if world_size() == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks in one flat all-reduce; a missing gradient counts as zeros."""
    if world_size() == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    for param, grad in zip(params, flat.split([p.numel() for p in params])):
        param.grad = grad.view_as(param)


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors`` (the trainable state, before training)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
