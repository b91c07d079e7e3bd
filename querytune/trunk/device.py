"""Where and in what precision the work runs: default device and loader workers, moving a
batch to the device, autocast."""

from __future__ import annotations

import os
from typing import overload

import torch

from .features import Features


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


@overload
def to_device(inputs: Features, device: torch.device, bf16: bool = False) -> Features: ...


@overload
def to_device(inputs: torch.Tensor, device: torch.device, bf16: bool = False) -> torch.Tensor: ...


def to_device(inputs: Features | torch.Tensor, device: torch.device, bf16: bool = False) -> Features | torch.Tensor:
    """Move a batch to the device: images in float32, features as :meth:`Features.to` says."""
    if isinstance(inputs, Features):
        return inputs.to(device, bf16)
    return inputs.to(device, torch.float32)


def autocast(device: torch.device, bf16: bool, fp16: bool = False) -> torch.autocast:
    """bfloat16 or float16 autocast (neither: a no-op context)."""
    return torch.autocast(device_type=device.type, dtype=torch.float16 if fp16 else torch.bfloat16,
                          enabled=bf16 or fp16)
