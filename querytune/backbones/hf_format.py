"""Hugging Face (transformers) ViT checkpoints: a model folder's config and tensors, mapped onto
:class:`ViTConfig` and timm names."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .checkpoint import build, read_json, vit_config
from .vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, ViTConfig

# transformers config defaults for the keys read here (old config.json files may omit some)
_HF_COMMON = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "gelu",
              "image_size": 224, "num_channels": 3, "qkv_bias": True}
HF_DEFAULTS = {
    "vit": {**_HF_COMMON, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "patch_size": 16},
    "deit": {**_HF_COMMON, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "patch_size": 16},
    "dinov2": {**_HF_COMMON, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 14, "use_swiglu_ffn": False},
    "dinov2_with_registers": {**_HF_COMMON, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 16,
                              "use_swiglu_ffn": False, "num_register_tokens": 4},
}

# Hugging Face tensor names -> timm names. Layers are named ``encoder.layer.N.attention.attention.query``
# on disk (and in memory before transformers 5) and ``[encoder.]layers.N.attention.q_proj`` in memory
# in transformers 5; both are accepted.
_HF_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.register_tokens": "reg_token",
    "embeddings.distillation_token": "reg_token",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER = re.compile(r"(?:encoder\.)?layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)")
_HF_LAYER_MODULES = {
    "layernorm_before": "norm1", "norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_HF_QKV = {
    "attention.attention.query": 0, "attention.q_proj": 0,
    "attention.attention.key": 1, "attention.k_proj": 1,
    "attention.attention.value": 2, "attention.v_proj": 2,
}
_HF_BASE_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.")  # inside *ForImageClassification
_HF_DROPPED = ("embeddings.mask_token", "pooler.", "classifier.", "cls_classifier.", "distillation_classifier.")


def from_hf_folder(folder: Path, config: dict[str, Any], state: dict[str, Tensor], name: str,
                   where: str) -> VisionTransformer:
    """A Hugging Face model folder's ViT: its ``config.json`` (read as ``config``), its weights (``state``)
    and, where present, its ``preprocessor_config.json`` (the input normalisation)."""
    preprocessor_path = folder / "preprocessor_config.json"
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else {}
    vit_config = hf_vit_config(config, preprocessor, str(folder / "config.json"), name)
    return build(vit_config, hf_state_dict(state, where), where)


def from_hf_module(module: Any) -> VisionTransformer:
    """An in-memory transformers model (or ``*ForImageClassification`` around one)."""
    hf_config = module.config.to_dict()
    name = hf_config.get("_name_or_path") or type(module).__name__
    vit_config = hf_vit_config(hf_config, {}, name, name)
    return build(vit_config, hf_state_dict(module.base_model.state_dict(), name), name)


def hf_vit_config(config: dict[str, Any], preprocessor: dict[str, Any], where: str, name: str) -> ViTConfig:
    model_type = config.get("model_type")
    if model_type not in HF_DEFAULTS:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(HF_DEFAULTS)})"
        )
    config = {**HF_DEFAULTS[model_type], **config}
    if config["hidden_act"] != "gelu":
        raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only gelu)")
    if config.get("use_swiglu_ffn"):
        raise CheckpointError(f"{where}: use_swiglu_ffn (a SwiGLU MLP) is not supported")
    width = config["hidden_size"]
    dinov2 = model_type.startswith("dinov2")
    distilled = model_type == "deit"  # transformers' DeiT always has a distillation token
    return vit_config(
        where,
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        in_chans=config["num_channels"],
        embed_dim=width,
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=config["mlp_ratio"] if dinov2 else config["intermediate_size"] / width,
        qkv_bias=config["qkv_bias"],
        layer_scale=dinov2,  # transformers' DINOv2 layers always have LayerScale
        num_reg_tokens=config.get("num_register_tokens", 0) + distilled,
        pos_embed_prefix=2 if distilled else 1,
        pos_embed_antialias=model_type == "dinov2_with_registers",
        norm_eps=config["layer_norm_eps"],
        # the preprocessor config's, else DINOv2's own (ImageNet); a ViT or DeiT folder without one: unknown
        mean=preprocessor.get("image_mean", IMAGENET_MEAN if dinov2 else None),
        std=preprocessor.get("image_std", IMAGENET_STD if dinov2 else None),
        name=name,
    )


def hf_state_dict(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Hugging Face tensor names -> timm names; unknown names are kept for the strict check to report."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        for prefix in _HF_BASE_PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(_HF_DROPPED):
            continue
        match = _HF_LAYER.fullmatch(key)
        if key in _HF_NAMES:
            out[_HF_NAMES[key]] = tensor
        elif match and match[2] in _HF_QKV:
            qkv[(match[1], match[3])][_HF_QKV[match[2]]] = tensor
        elif match and match[2] in _HF_LAYER_MODULES:
            param = "gamma" if match[3] == "lambda1" else match[3]
            out[f"blocks.{match[1]}.{_HF_LAYER_MODULES[match[2]]}.{param}"] = tensor
        else:
            out[key] = tensor
    for (index, param), parts in qkv.items():
        if len(parts) != 3:
            raise CheckpointError(f"{where}: layer {index} lacks some of its query/key/value {param} tensors")
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]])
    return out
