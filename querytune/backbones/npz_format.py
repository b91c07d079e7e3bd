"""JAX ViT checkpoints (``.npz``): the original ones that VPT, VQT, NOAH, SSF and V-PETL load, and big_vision's
(its ViTs and SigLIP's image tower)."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
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
    ``imagenet21k/ViT-B_16.npz``, any depth and width), and big_vision's (``params/`` prefix: a ViT, or the image
    tower ``params/img/`` of a SigLIP; blocks one by one or scanned; a class token or the MAP head; tanh GELU).
    Their normalisation is unknown unless ``model_name`` names it: the same file is used with ImageNet mean/std
    by VPT and VQT and with 0.5/0.5 by SSF and NOAH's VPT script, so a run gives ``--mean``/``--std``."""
    arrays = _read_npz(path)
    state, num_heads, big_vision = _npz_state_dict(arrays, str(path))
    return from_timm_state(state, str(path), path.name, model_name, num_heads=num_heads,
                           act="gelu_tanh" if big_vision else "gelu")


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile and numpy raise assorted types for torn or foreign files
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise CheckpointError(f"{path}: unreadable .npz checkpoint ({reason})") from error


# prefixes of the image model's arrays: the original checkpoints', as saved and in a training state, and
# big_vision's, a ViT's and a two-tower (SigLIP) model's image tower
_PREFIXES = ("", "opt/target/", "params/", "params/img/")
# a block's (first norm, attention, second norm, MLP) in the original layout and in big_vision's
_ORIGINAL_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
_BIG_VISION_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
Take = Callable[[str], Tensor]  # an array by name, as a tensor


def _npz_state_dict(arrays: dict[str, Any], where: str) -> tuple[dict[str, Tensor], int, bool]:
    """timm-named tensors, the head count and whether the layout is big_vision's, from a JAX ViT checkpoint's
    arrays (kernels are stored (in, out), attention kernels (in, heads, head_dim) and (heads, head_dim, out); a
    scanned big_vision encoder stacks its blocks' arrays on a first axis). The representation layer
    (``pre_logits``) and the classifier or projection (``head``) are left out, as VPT and VQT leave them."""
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise CheckpointError(f"{where}: no embedding/kernel; not a ViT .npz checkpoint")
    arrays = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
    big_vision = prefix.startswith("params/") or "pos_embedding" in arrays

    def take(key: str, index: int | None = None) -> Tensor:
        if key not in arrays:
            raise CheckpointError(f"{where}: {prefix}{key} missing; not a complete ViT .npz checkpoint")
        value = arrays[key] if index is None else arrays[key][index]
        return torch.from_numpy(np.ascontiguousarray(value)).float()

    state = {
        "patch_embed.proj.weight": take("embedding/kernel").permute(3, 2, 0, 1),
        "patch_embed.proj.bias": take("embedding/bias"),
        "pos_embed": take("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"),
        "norm.weight": take("Transformer/encoder_norm/scale"),
        "norm.bias": take("Transformer/encoder_norm/bias"),
    }
    if "cls" in arrays:
        state["cls_token"] = take("cls")
    elif "MAPHead_0/probe" in arrays:
        head = "MAPHead_0/MultiHeadDotProductAttention_0"
        query, key, value, out = _attention(take, head)
        state.update({
            "attn_pool.latent": take("MAPHead_0/probe"),
            "attn_pool.q.weight": query[0], "attn_pool.q.bias": query[1],
            "attn_pool.kv.weight": torch.cat([key[0], value[0]]), "attn_pool.kv.bias": torch.cat([key[1], value[1]]),
            "attn_pool.proj.weight": out[0], "attn_pool.proj.bias": out[1],
            "attn_pool.norm.weight": take("MAPHead_0/LayerNorm_0/scale"),
            "attn_pool.norm.bias": take("MAPHead_0/LayerNorm_0/bias"),
            **{f"attn_pool.mlp.fc{j + 1}.{param}": tensor
               for j in range(2) for param, tensor in _dense(take, f"MAPHead_0/MlpBlock_0/Dense_{j}").items()},
        })
    else:
        raise CheckpointError(f"{where}: neither a class token (cls) nor a MAP head (MAPHead_0); a ViT that "
                              "averages its normalised tokens is not read")
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in arrays
    if scanned:
        blocks = list(range(arrays["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]))
    else:
        blocks = sorted({int(m[1]) for key in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", key))})
        if blocks != list(range(len(blocks))) or not blocks:
            raise CheckpointError(f"{where}: encoder blocks {blocks} are not numbered 0..n-1")
    norm1, attention, norm2, mlp = _BIG_VISION_BLOCK if big_vision else _ORIGINAL_BLOCK
    for i in blocks:
        block = "Transformer/encoderblock" if scanned else f"Transformer/encoderblock_{i}"
        block_take = partial(take, index=i if scanned else None)
        query, key, value, out = _attention(block_take, f"{block}/{attention}")
        state.update({
            f"blocks.{i}.norm1.weight": block_take(f"{block}/{norm1}/scale"),
            f"blocks.{i}.norm1.bias": block_take(f"{block}/{norm1}/bias"),
            f"blocks.{i}.attn.qkv.weight": torch.cat([query[0], key[0], value[0]]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([query[1], key[1], value[1]]),
            f"blocks.{i}.attn.proj.weight": out[0], f"blocks.{i}.attn.proj.bias": out[1],
            f"blocks.{i}.norm2.weight": block_take(f"{block}/{norm2}/scale"),
            f"blocks.{i}.norm2.bias": block_take(f"{block}/{norm2}/bias"),
            **{f"blocks.{i}.mlp.fc{j + 1}.{param}": tensor
               for j in range(2) for param, tensor in _dense(block_take, f"{block}/{mlp}/Dense_{j}").items()},
        })
    num_heads = take(f"Transformer/encoderblock{'' if scanned else '_0'}/{attention}/query/kernel",
                     0 if scanned else None).shape[1]
    return {key: value.contiguous() for key, value in state.items()}, int(num_heads), big_vision


def _attention(take: Take, prefix: str) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) of the query, key, value and output projections of the attention at ``prefix``."""
    parts = [(take(f"{prefix}/{part}/kernel").flatten(1).T, take(f"{prefix}/{part}/bias").flatten())
             for part in ("query", "key", "value")]
    return [*parts, (take(f"{prefix}/out/kernel").flatten(0, 1).T, take(f"{prefix}/out/bias"))]


def _dense(take: Take, prefix: str) -> dict[str, Tensor]:
    return {"weight": take(f"{prefix}/kernel").T, "bias": take(f"{prefix}/bias")}
