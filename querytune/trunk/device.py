"""Where the work runs: default device and loader workers, moving a batch to the device (in the run's
:class:`~.precision.Precision`), torch.compile."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, overload

import torch

from ..errors import ConfigError
from .features import Features
from .precision import Precision


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device a user named (None: :func:`default_device`), refused in one line where it is not a
    device name or is absent here."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"--device {device!r}: not a device name (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} found)")
    return device


def resolve_workers(workers: int | None) -> int:
    """The number of image-loading processes a user asked for (None: :func:`default_workers`)."""
    return default_workers() if workers is None else workers


@overload
def to_device(inputs: Features, device: torch.device, precision: Precision = Precision.FP32) -> Features: ...


@overload
def to_device(inputs: torch.Tensor, device: torch.device, precision: Precision = Precision.FP32) -> torch.Tensor: ...


def to_device(inputs: Features | torch.Tensor, device: torch.device,
              precision: Precision = Precision.FP32) -> Features | torch.Tensor:
    """Move a batch to the device: images in float32, features as :meth:`Features.to` says, their per-layer
    tokens in ``precision``'s :attr:`~Precision.features_dtype`."""
    if isinstance(inputs, Features):
        return inputs.to(device, precision.features_dtype)
    return inputs.to(device, torch.float32)


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compiled(module: torch.nn.Module, mode: str) -> Callable[..., Any]:
    """``module``'s forward through ``torch.compile`` in ``mode`` (``off``: the module itself). The
    compiled forward shares the module's parameters; it computes the same function up to float rounding,
    but its dropout masks are drawn differently, so a compiled run does not replay an eager one exactly."""
    return module if mode == "off" else torch.compile(module, mode=None if mode == "default" else mode)
