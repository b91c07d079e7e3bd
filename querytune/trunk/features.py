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

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

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
    run, over the weights held in bfloat16: :func:`held_weights`); features are rounded to ``dtype``, the
    cache's storage dtype, so that live and cached training see identical inputs."""
    trunk = precision.trunk
    if trunk.autocast_dtype is not None:
        backbone = held_weights(backbone, trunk.autocast_dtype)
    layers = None
    if with_layers:  # every block's normalised tokens, each converted once, straight into place
        config, (height, width) = backbone.config, images.shape[-2:]
        tokens = config.num_prefix_tokens + (height // config.patch_size) * (width // config.patch_size)
        layers = images.new_empty((images.shape[0], len(backbone.blocks), tokens, config.embed_dim), dtype=dtype)

    def keep(index: int, u: Tensor) -> None:
        assert layers is not None
        layers[:, index].copy_(u)

    with trunk.autocast(images.device):
        x = backbone.run_blocks(backbone.embed(images), after_norm=keep if with_layers else None)
        pooled = backbone.pool(x).to(dtype)
    return Features(pooled, layers)


# backbone -> (its weights' identity and versions, the twin with matmul weights in a dtype)
_HELD: weakref.WeakKeyDictionary[VisionTransformer, tuple[tuple, VisionTransformer]] = weakref.WeakKeyDictionary()


def held_weights(backbone: VisionTransformer, dtype: torch.dtype) -> VisionTransformer:
    """A twin of the frozen ``backbone`` whose linear and convolution weights and biases are held in ``dtype``,
    the other parameters shared with it. Under ``dtype`` autocast it computes exactly what ``backbone`` does
    (autocast rounds those same tensors to ``dtype`` before each matmul), without re-casting the frozen
    weights on every call. Made once per backbone and remade where its parameters change (their storage
    or version counter)."""
    stamp = (dtype, *((p.data_ptr(), p._version) for p in backbone.parameters()))
    held = _HELD.get(backbone)
    if held is not None and held[0] == stamp:
        return held[1]
    memo: dict[int, Any] = {id(p): p for p in backbone.parameters()}
    memo.update({id(b): b for b in backbone.buffers()})
    for module in backbone.modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            for param in module.parameters(recurse=False):
                memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    twin = copy.deepcopy(backbone, memo)
    _HELD[backbone] = (stamp, twin)
    return twin
