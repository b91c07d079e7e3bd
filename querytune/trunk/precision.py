"""The precision a run computes in: one :class:`Precision` value, resolved once with the device
(:func:`resolve_precision`) and handed down to the trunk, the feature cache, the training step,
evaluation, serving and ``measure``."""

from __future__ import annotations

import os
from enum import Enum

import torch

from ..errors import ConfigError


class Precision(Enum):
    """fp32; bf16: the trunk and the task path in bfloat16 autocast; fp16: the task path in float16
    autocast with a gradient scaler (for GPUs without bfloat16), the trunk in float32."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value  # as --precision spells it

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the task path computes in under autocast (None: float32, no autocast)."""
        return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self)

    @property
    def trunk(self) -> Precision:
        """The precision the frozen trunk runs in, which its cached features are keyed by: bf16 in a bf16
        run, fp32 otherwise."""
        return Precision.BF16 if self is Precision.BF16 else Precision.FP32

    @property
    def features_dtype(self) -> torch.dtype:
        """The dtype per-layer trunk features reach the task path in: bfloat16 in a bf16 run (autocast
        would cast them to it anyway, once per use), float32 otherwise."""
        return torch.bfloat16 if self is Precision.BF16 else torch.float32

    @property
    def scales_loss(self) -> bool:
        """Whether training scales the loss, so that small float16 gradients do not underflow."""
        return self is Precision.FP16

    def autocast(self, device: torch.device) -> torch.autocast:
        """Autocast to :attr:`autocast_dtype` on ``device`` (fp32: a no-op context)."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


PRECISIONS = ("auto", *(precision.value for precision in Precision))  # what --precision takes
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


def resolve_precision(precision: str, device: torch.device) -> tuple[Precision, str]:
    """The precision ``auto`` means on ``device``: $QUERYTUNE_PRECISION where set, else bf16 where the
    device computes it natively and fp32 elsewhere; or the one given (one of :data:`PRECISIONS`, which the
    settings' ``option`` declarations check). And why, in words."""
    if precision != "auto":
        return Precision(precision), "as given"
    chosen = os.environ.get("QUERYTUNE_PRECISION")
    if chosen:
        if chosen not in PRECISIONS[1:]:
            raise ConfigError(f"$QUERYTUNE_PRECISION must be one of {', '.join(PRECISIONS[1:])} (got {chosen!r})")
        return Precision(chosen), f"auto: $QUERYTUNE_PRECISION is {chosen}"
    reason = native_bf16(device)
    if reason:
        return Precision.BF16, f"auto: {reason}"
    return Precision.FP32, f"auto: {device.type} without native bfloat16"
