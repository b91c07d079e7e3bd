"""Trunk execution: what the frozen-backbone methods read, and the trunk with autograd.

For every image the trunk yields, per block l, the block's normalised input
``U_l = norm1(X_l)`` (B, N, D): the keys and values of block l are affine maps of it,
so it is all a query row needs (see :meth:`Block.forward_rows`). It also yields the
backbone's pooled final feature, :meth:`VisionTransformer.pool` (the final class token after
the final norm, or with ``global_pool`` the normalised mean of the patch tokens; what a linear
probe reads). The trunk runs
under ``torch.no_grad``; the feature cache (:mod:`querytune.trunk.cache`) stores exactly
these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.vit import VisionTransformer
from .precision import Precision


@dataclass
class Features:
    """Frozen-trunk outputs for a batch.

    ``layers``: (B, L, N, D) normalised block inputs, or None when only the pooled
    feature was asked for. ``pooled``: (B, D) the backbone's final feature,
    :meth:`VisionTransformer.pool` of the last block's output.
    """

    pooled: Tensor
    layers: Tensor | None = None

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def to(self, device: torch.device | str, layers_dtype: torch.dtype = torch.float32) -> Features:
        """On ``device`` for computing: the pooled feature in float32, the per-layer tokens in ``layers_dtype``
        (a run's :attr:`Precision.features_dtype <querytune.trunk.precision.Precision.features_dtype>`)."""
        layers = self.layers
        if layers is not None:
            layers = layers.to(device, non_blocking=True)
            if layers.dtype != layers_dtype:
                layers = layer_major(layers, layers_dtype)
        return Features(self.pooled.to(device, torch.float32, non_blocking=True), layers)


def empty_layer_major(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None,
                      pin_memory: bool = False) -> Tensor:
    """An uninitialised (B, L, N, D) tensor stored layer-major, so that each layer's (B, N, D)
    slice, which the rows' batched matmuls read, is contiguous."""
    batch, num_layers, *rest = shape
    return torch.empty(num_layers, batch, *rest, dtype=dtype, device=device, pin_memory=pin_memory).transpose(0, 1)


def layer_major(layers: Tensor, dtype: torch.dtype) -> Tensor:
    """``layers`` (B, L, N, D) converted to ``dtype`` and stored layer-major."""
    out = empty_layer_major(layers.shape, dtype, layers.device)
    for index, layer in enumerate(layers.unbind(1)):
        copy_converted(out[:, index], layer)
    return out


def copy_converted(out: Tensor, values: Tensor) -> Tensor:
    """``out.copy_(values)``, on a CPU float16 to bfloat16 through float32: torch converts that pair
    element by element, and float32 both ways with vector instructions (several times faster)."""
    if values.dtype == torch.float16 and out.dtype == torch.bfloat16 and values.device.type == "cpu":
        values = values.float()
    return out.copy_(values)


@torch.no_grad()
def extract_features(
    backbone: VisionTransformer,
    images: Tensor,
    with_layers: bool = True,
    dtype: torch.dtype = torch.float16,
    precision: Precision = Precision.FP32,
) -> Features:
    """Run the frozen trunk once, in ``precision``'s :attr:`~Precision.trunk` (bfloat16 autocast in a bf16
    run); features are rounded to ``dtype``, the cache's storage dtype, so that live and cached training
    see identical inputs."""
    layers: list[Tensor] = []
    with precision.trunk.autocast(images.device):
        x = backbone.run_blocks(backbone.embed(images),
                                after_norm=(lambda _, u: layers.append(u.to(dtype))) if with_layers else None)
        pooled = backbone.pool(x).to(dtype)
    # Stacking float16 tensors fails under an autocast a caller may have entered around us.
    with torch.autocast(device_type=images.device.type, enabled=False):
        return Features(pooled, torch.stack(layers, dim=1) if with_layers else None)
