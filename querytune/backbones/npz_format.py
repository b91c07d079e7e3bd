"""The original JAX ViT checkpoints (``.npz``) that VPT, VQT, NOAH, SSF and V-PETL load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, one_line
from .timm_format import from_timm_state
from .vit import VisionTransformer


def from_npz_file(path: Path, model_name: str | None) -> VisionTransformer:
    """The original JAX ViT checkpoints that VPT, VQT, NOAH, SSF and V-PETL load (``ViT-B_16.npz``,
    ``imagenet21k/ViT-B_16.npz``, any depth and width). Their normalisation is unknown unless
    ``model_name`` names it: the same file is used with ImageNet mean/std by VPT and VQT and with
    0.5/0.5 by SSF and NOAH's VPT script, so a run gives ``--mean``/``--std``."""
    state, num_heads = _npz_state_dict(_read_npz(path), str(path))
    return from_timm_state(state, str(path), path.name, model_name, num_heads=num_heads)


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile and numpy raise assorted types for torn or foreign files
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise CheckpointError(f"{path}: unreadable .npz checkpoint ({reason})") from error


def _npz_state_dict(arrays: dict[str, Any], where: str) -> tuple[dict[str, Tensor], int]:
    """timm-named tensors and the head count from a JAX ViT checkpoint's arrays (kernels are stored
    (in, out), attention kernels (in, heads, head_dim) and (heads, head_dim, out)). The representation
    layer (``pre_logits``) and the classifier are left out, as VPT and VQT leave them."""
    arrays = {key.removeprefix("opt/target/"): value for key, value in arrays.items()}
    if "embedding/kernel" not in arrays:
        raise CheckpointError(f"{where}: no embedding/kernel; not a ViT .npz checkpoint")

    def take(key: str) -> Tensor:
        if key not in arrays:
            raise CheckpointError(f"{where}: {key} missing; not a complete ViT .npz checkpoint")
        return torch.from_numpy(np.ascontiguousarray(arrays[key])).float()

    state = {
        "patch_embed.proj.weight": take("embedding/kernel").permute(3, 2, 0, 1),
        "patch_embed.proj.bias": take("embedding/bias"),
        "cls_token": take("cls"),
        "pos_embed": take("Transformer/posembed_input/pos_embedding"),
        "norm.weight": take("Transformer/encoder_norm/scale"),
        "norm.bias": take("Transformer/encoder_norm/bias"),
    }
    blocks = sorted({int(m[1]) for key in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", key))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise CheckpointError(f"{where}: encoder blocks {blocks} are not numbered 0..n-1")
    num_heads = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape[1]
    for i in blocks:
        block, attn = f"Transformer/encoderblock_{i}", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1"
        qkv = [take(f"{attn}/{part}/kernel").flatten(1).T for part in ("query", "key", "value")]
        state.update({
            f"blocks.{i}.norm1.weight": take(f"{block}/LayerNorm_0/scale"),
            f"blocks.{i}.norm1.bias": take(f"{block}/LayerNorm_0/bias"),
            f"blocks.{i}.attn.qkv.weight": torch.cat(qkv),
            f"blocks.{i}.attn.qkv.bias": torch.cat([take(f"{attn}/{part}/bias").flatten()
                                                    for part in ("query", "key", "value")]),
            f"blocks.{i}.attn.proj.weight": take(f"{attn}/out/kernel").flatten(0, 1).T,
            f"blocks.{i}.attn.proj.bias": take(f"{attn}/out/bias"),
            f"blocks.{i}.norm2.weight": take(f"{block}/LayerNorm_2/scale"),
            f"blocks.{i}.norm2.bias": take(f"{block}/LayerNorm_2/bias"),
            f"blocks.{i}.mlp.fc1.weight": take(f"{block}/MlpBlock_3/Dense_0/kernel").T,
            f"blocks.{i}.mlp.fc1.bias": take(f"{block}/MlpBlock_3/Dense_0/bias"),
            f"blocks.{i}.mlp.fc2.weight": take(f"{block}/MlpBlock_3/Dense_1/kernel").T,
            f"blocks.{i}.mlp.fc2.bias": take(f"{block}/MlpBlock_3/Dense_1/bias"),
        })
    return {key: value.contiguous() for key, value in state.items()}, int(num_heads)
