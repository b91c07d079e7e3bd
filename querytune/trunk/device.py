"""Where and in what precision the work runs: default device and loader workers, moving a
batch to the device, autocast, torch.compile."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, overload

import torch

from ..errors import ConfigError
from .features import Features


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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bfloat16 natively


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux's /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def native_bf16(device: torch.device) -> str | None:
    """Why ``device`` computes bfloat16 natively (a CUDA GPU with bf16; a CPU with AVX-512 BF16 or AMX),
    or None where it would be emulated (several times slower than float32 on a CPU)."""
    if device.type == "cuda":
        return "the GPU computes bfloat16" if torch.cuda.is_bf16_supported() else None
    found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
    return f"the CPU has {' and '.join(found)}" if found and device.type == "cpu" else None


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision ``auto`` means on ``device``: $QUERYTUNE_PRECISION where set, else bf16 where the
    device computes it natively and fp32 elsewhere; or the one given. And why, in words."""
    if precision != "auto":
        return precision, "as given"
    chosen = os.environ.get("QUERYTUNE_PRECISION")
    if chosen:
        if chosen not in PRECISIONS[1:]:
            raise ConfigError(f"$QUERYTUNE_PRECISION must be one of {', '.join(PRECISIONS[1:])} (got {chosen!r})")
        return chosen, f"auto: $QUERYTUNE_PRECISION is {chosen}"
    reason = native_bf16(device)
    return ("bf16", f"auto: {reason}") if reason else ("fp32", f"auto: {device.type} without native bfloat16")


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


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compiled(module: torch.nn.Module, mode: str) -> Callable[..., Any]:
    """``module``'s forward through ``torch.compile`` in ``mode`` (``off``: the module itself). The
    compiled forward shares the module's parameters; it computes the same function up to float rounding,
    but its dropout masks are drawn differently, so a compiled run does not replay an eager one exactly."""
    return module if mode == "off" else torch.compile(module, mode=None if mode == "default" else mode)
