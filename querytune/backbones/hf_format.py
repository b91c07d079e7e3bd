"""Hugging Face (transformers) ViT checkpoints: a model folder's config and tensors, mapped onto
:class:`ViTConfig` and timm names."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .checkpoint import IMAGENET, INCEPTION, OPENAI_CLIP, build, read_json, vit_config
from .vit import VisionTransformer, ViTConfig

# transformers config defaults for the keys read here (old config.json files may omit some)
_HF_COMMON = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "gelu",
              "image_size": 224, "num_channels": 3, "qkv_bias": True}
_HF_VIT = {**_HF_COMMON, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "patch_size": 16}
_HF_SIGLIP = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-6,
              "vision_use_head": True}
HF_DEFAULTS = {
    "vit": _HF_VIT,
    "deit": _HF_VIT,
    "vit_mae": _HF_VIT,
    "vit_msn": {**_HF_VIT, "layer_norm_eps": 1e-6},
    "dinov2": {**_HF_COMMON, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 14, "use_swiglu_ffn": False},
    "dinov2_with_registers": {**_HF_COMMON, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 16,
                              "use_swiglu_ffn": False, "num_register_tokens": 4},
    "clip_vision_model": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072, "hidden_act": "quick_gelu", "image_size": 224, "patch_size": 32,
                          "num_channels": 3, "layer_norm_eps": 1e-5},
    "siglip_vision_model": {**_HF_SIGLIP, "image_size": 224},
    "siglip2_vision_model": {**_HF_SIGLIP, "num_patches": 256},
    "dinov3_vit": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-5, "rope_theta": 100.0, "image_size": 224,
                   "patch_size": 16, "num_channels": 3, "query_bias": True, "key_bias": False, "value_bias": True,
                   "use_gated_mlp": False, "num_register_tokens": 0},
}
_HF_RELATIVE_POSITIONS = ("beit", "data2vec-vision")  # refused, saying why
# a full (image and text) model folder -> the model type of its vision tower, read from ``vision_config``
_HF_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "quick_gelu": "quick_gelu"}
# each family's own normalisation, used where a folder has no preprocessor config (None: it varies, not guessed)
_HF_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "dinov2": IMAGENET, "dinov2_with_registers": IMAGENET, "vit_mae": IMAGENET, "vit_msn": IMAGENET,
    "clip_vision_model": OPENAI_CLIP, "siglip_vision_model": INCEPTION, "siglip2_vision_model": INCEPTION,
    "dinov3_vit": IMAGENET,
}

# Hugging Face tensor names -> timm names. Layers are named ``encoder.layer.N.attention.attention.query``
# on disk (and in memory before transformers 5) and ``[encoder.]layers.N.attention.q_proj`` in memory
# in transformers 5; both are accepted. CLIP and SigLIP name them ``encoder.layers.N.self_attn.q_proj``.
_HF_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.register_tokens": "reg_token",
    "embeddings.distillation_token": "reg_token",
    "pre_layrnorm.weight": "norm_pre.weight",
    "pre_layrnorm.bias": "norm_pre.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
_HF_LAYER = re.compile(r"(?:encoder\.|model\.)?layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)")
_HF_LAYER_MODULES = {
    "layernorm_before": "norm1", "norm1": "norm1", "layer_norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2", "layer_norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj", "self_attn.out_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1", "mlp.weights_in": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2", "mlp.weights_out": "mlp.fc2", "mlp.down_proj": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_HF_QKV = {
    "attention.attention.query": 0, "attention.q_proj": 0, "self_attn.q_proj": 0,
    "attention.attention.key": 1, "attention.k_proj": 1, "self_attn.k_proj": 1,
    "attention.attention.value": 2, "attention.v_proj": 2, "self_attn.v_proj": 2,
}
# DINOv3's MLP input: a plain MLP's fc1, or a gated one's gate and input, packed in fc1 (gate first)
_HF_GATED = {"mlp.gate_proj": 0, "mlp.up_proj": 1}
# inside *ForImageClassification, ViTMAEForPreTraining, and full CLIP/SigLIP models (the vision tower)
_HF_BASE_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "vision_model.")
_HF_DROPPED = ("embeddings.mask_token", "pooler.", "classifier.", "cls_classifier.", "distillation_classifier.",
               "decoder.", "text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def from_hf_folder(folder: Path, config: dict[str, Any], state: dict[str, Tensor], name: str,
                   where: str) -> VisionTransformer:
    """A Hugging Face model folder's ViT: its ``config.json`` (read as ``config``), its weights (``state``)
    and, where present, its ``preprocessor_config.json`` (the input normalisation)."""
    preprocessor_path = folder / "preprocessor_config.json"
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else {}
    vit_config = hf_vit_config(config, preprocessor, str(folder / "config.json"), name)
    return build(vit_config, hf_state_dict(state, where, vit_config), where)


def from_hf_module(module: Any) -> VisionTransformer:
    """An in-memory transformers model (or ``*ForImageClassification`` around one)."""
    hf_config = module.config.to_dict()
    name = hf_config.get("_name_or_path") or type(module).__name__
    vit_config = hf_vit_config(hf_config, {}, name, name)
    return build(vit_config, hf_state_dict(module.base_model.state_dict(), name, vit_config), name)


def hf_vit_config(config: dict[str, Any], preprocessor: dict[str, Any], where: str, name: str) -> ViTConfig:
    model_type = config.get("model_type")
    if model_type in _HF_TOWERS:  # a full image-text model: its vision tower
        config, model_type = {**config.get("vision_config", {})}, _HF_TOWERS[model_type]
    if model_type in _HF_RELATIVE_POSITIONS:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported: its blocks add a relative "
                              "position bias to the attention, which the task path's rows do not carry")
    if model_type not in HF_DEFAULTS:
        supported = ", ".join([*HF_DEFAULTS, *_HF_TOWERS])
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported (supported: {supported})")
    config = {**HF_DEFAULTS[model_type], **config}
    dinov2 = model_type.startswith("dinov2")
    swiglu = bool(config.get("use_swiglu_ffn") or config.get("use_gated_mlp"))
    if config["hidden_act"] not in _HF_ACTIVATIONS and not swiglu:  # DINOv2's SwiGLU MLP ignores hidden_act
        raise CheckpointError(
            f"{where}: hidden_act {config['hidden_act']!r} is not supported (supported: {', '.join(_HF_ACTIVATIONS)})"
        )
    dinov3 = model_type == "dinov3_vit"
    if dinov3 and swiglu and config["hidden_act"] != "silu":
        raise CheckpointError(f"{where}: a gated MLP with hidden_act {config['hidden_act']!r} is not supported "
                              "(supported: silu, SwiGLU)")
    siglip = model_type.startswith("siglip")
    if siglip and not config["vision_use_head"]:
        raise CheckpointError(f"{where}: a SigLIP vision model without its attention-pooling head "
                              "(vision_use_head false) has no pooled feature")
    width = config["hidden_size"]
    distilled = model_type == "deit"  # transformers' DeiT always has a distillation token
    if "num_patches" in config:  # SigLIP 2: a square grid of num_patches positions
        image_size = math.isqrt(config["num_patches"]) * config["patch_size"]
    else:
        image_size = config["image_size"]
    normalisation = _HF_NORMALISATION.get(model_type)
    return vit_config(
        where,
        image_size=image_size,
        patch_size=config["patch_size"],
        in_chans=config["num_channels"],
        embed_dim=width,
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=_dinov2_mlp_hidden(config) / width if dinov2 else config["intermediate_size"] / width,
        qkv_bias=config["query_bias"] or config["value_bias"] if dinov3 else config.get("qkv_bias", True),
        layer_scale=dinov2 or dinov3,  # transformers' DINOv2 and DINOv3 layers always have LayerScale
        num_reg_tokens=config.get("num_register_tokens", 0) + distilled,
        pos_embed_prefix=0 if siglip or dinov3 else 2 if distilled else 1,
        absolute_pos_embed=not dinov3,
        rope="dinov3" if dinov3 else "",
        rope_temperature=config["rope_theta"] if dinov3 else 10000.0,
        pos_embed_antialias=model_type in ("dinov2_with_registers", "siglip2_vision_model"),
        pos_embed_resize="bilinear" if model_type == "siglip2_vision_model" else "bicubic",
        norm_eps=config["layer_norm_eps"],
        mean=preprocessor.get("image_mean", normalisation[0] if normalisation else None),
        std=preprocessor.get("image_std", normalisation[1] if normalisation else None),
        name=name,
        class_token=not siglip,
        map_pool=siglip,
        patch_bias=model_type != "clip_vision_model",
        norm_pre=model_type == "clip_vision_model",
        act=_HF_ACTIVATIONS.get(config["hidden_act"], "gelu"),
        swiglu=swiglu,
    )


def _dinov2_mlp_hidden(config: dict[str, Any]) -> int:
    """The hidden width of a transformers DINOv2 MLP (its SwiGLU's: 2/3 of it, rounded up to a multiple of 8)."""
    hidden = int(config["hidden_size"] * config["mlp_ratio"])
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if config.get("use_swiglu_ffn") else hidden


def hf_state_dict(state: dict[str, Tensor], where: str, config: ViTConfig) -> dict[str, Tensor]:
    """Hugging Face tensor names -> timm names (and shapes); unknown names are kept for the strict check to
    report."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, Tensor]] = defaultdict(dict)
    gated: dict[tuple[str, str], dict[int, Tensor]] = defaultdict(dict)
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
        elif match and match[2] in _HF_GATED:
            gated[(match[1], match[3])][_HF_GATED[match[2]]] = tensor
        elif match and match[2] in _HF_LAYER_MODULES:
            param = "gamma" if match[3] == "lambda1" else match[3]
            out[f"blocks.{match[1]}.{_HF_LAYER_MODULES[match[2]]}.{param}"] = tensor
        else:
            out[key] = tensor
    for (index, param), parts in qkv.items():
        if param == "bias":  # DINOv3 has query and value biases only: the key's (or any missing one's) is 0
            parts = {part: parts.get(part, torch.zeros_like(next(iter(parts.values())))) for part in range(3)}
        if len(parts) != 3:
            raise CheckpointError(f"{where}: layer {index} lacks some of its query/key/value {param} tensors")
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]])
    for (index, param), halves in gated.items():
        out[f"blocks.{index}.mlp.fc1.{param}"] = torch.cat([halves[part] for part in sorted(halves)])
    return _timm_shapes(out, config)


def _timm_shapes(state: dict[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """CLIP's and SigLIP's tensors in timm's shapes (DINOv3's empty register tokens dropped): the class token
    and position embeddings with a batch axis, the attention pool's fused q/k/v split into ``q`` and ``kv``,
    and SigLIP 2's patch embedding (a linear map of patches flattened as (row, column, channel)) as a
    convolution."""
    if "reg_token" in state and not state["reg_token"].numel():  # DINOv3 keeps an empty one
        del state["reg_token"]
    for key in ("cls_token", "pos_embed"):
        if key in state and state[key].dim() < 3:
            state[key] = state[key].reshape(1, -1, config.embed_dim)
    for param in ("weight", "bias"):
        fused = state.pop(f"head.attention.in_proj_{param}", None)
        if fused is not None:
            state[f"attn_pool.q.{param}"], state[f"attn_pool.kv.{param}"] = fused.split(
                [config.embed_dim, 2 * config.embed_dim])
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.dim() == 2:
        side = config.patch_size
        state["patch_embed.proj.weight"] = patch.reshape(-1, side, side, config.in_chans).permute(0, 3, 1, 2)
    return state
