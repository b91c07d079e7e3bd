"""timm checkpoints: a state-dict file (``.safetensors``, ``.pth``), a hub folder's weights, or a timm
model's state dict, read with or without a timm architecture name (inferred from the shapes without one)."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .checkpoint import CONFIG_METADATA_KEY, IMAGENET, INCEPTION, build, read_checkpoint, vit_config
from .vit import VisionTransformer, ViTConfig

# timm size name -> (width, depth, heads)
TIMM_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
HEADS_BY_WIDTH = {width: heads for width, _, heads in TIMM_SIZES.values()}


class TimmFamily(NamedTuple):
    pattern: str  # full match of the architecture name, with groups size, patch and (optionally) reg
    layer_scale: bool
    distilled: bool  # has a distillation token, loaded as one register token
    norm: tuple[tuple[float, ...], tuple[float, ...]]  # default mean, std


TIMM_FAMILIES = (
    TimmFamily(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_\d+", False, False, INCEPTION),
    TimmFamily(r"deit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_\d+", False, False, IMAGENET),
    TimmFamily(r"deit_(?P<size>[a-z]+)_distilled_patch(?P<patch>\d+)_\d+", False, True, IMAGENET),
    TimmFamily(r"deit3_(?P<size>[a-z]+)_patch(?P<patch>\d+)_\d+", True, False, IMAGENET),
    TimmFamily(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_dinov2", True, False, IMAGENET),
    TimmFamily(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_reg(?P<reg>\d+)_dinov2", True, False, IMAGENET),
)
IMAGENET_TAGS = ("mae", "dino")  # timm vit_* weights normalised with ImageNet mean/std

# timm checkpoint keys that belong to the classifier, or to training only
_TIMM_DROPPED = ("head.", "head_dist.", "pre_logits.", "fc_norm.", "mask_token")
_TIMM_RENAMES = {"dist_token": "reg_token", "register_tokens": "reg_token"}  # DeiT distilled, original DINOv2


def is_timm_name(text: str) -> bool:
    """A supported timm architecture name, with or without a ``.tag`` (``vit_base_patch16_224.augreg_in21k``)."""
    arch, _, tag = text.partition(".")
    return re.fullmatch(r"[\w-]*", tag) is not None and any(re.fullmatch(f.pattern, arch) for f in TIMM_FAMILIES)


def from_timm_file(path: Path, model_name: str | None) -> VisionTransformer:
    state, saved_config = read_checkpoint(path)
    if saved_config is not None and model_name is None:
        try:
            config = ViTConfig.from_dict(json.loads(saved_config))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: invalid {CONFIG_METADATA_KEY} metadata ({error})") from error
        config.name = path.name
        return build(config, _timm_state_dict(state, str(path))[0], str(path))
    return from_timm_state(state, str(path), path.name, model_name)

def from_timm_state(
    state: dict[str, Tensor],
    where: str,
    name: str,
    model_name: str | None,
    pretrained_cfg: dict[str, Any] | None = None,
    num_heads: int | None = None,
    norm_eps: float = 1e-6,
) -> VisionTransformer:
    state, global_pool = _timm_state_dict(state, where)
    if model_name is not None:
        fields, (mean, std) = _timm_architecture(model_name)
    else:
        fields, (mean, std) = _infer_architecture(state, where, num_heads), (None, None)  # unknown
    if "pos_embed" not in state:
        raise CheckpointError(f"{where}: no pos_embed; not a ViT checkpoint with absolute position embeddings")
    grid, prefix = _split_positions(state["pos_embed"].shape[1], fields["num_reg_tokens"], where)
    if pretrained_cfg:
        mean, std = pretrained_cfg.get("mean", mean), pretrained_cfg.get("std", std)
    config = vit_config(
        where, **fields, image_size=grid * fields["patch_size"], pos_embed_prefix=prefix, pos_embed_antialias=True,
        norm_eps=norm_eps, mean=mean, std=std, name=name, global_pool=global_pool,
    )
    return build(config, state, where)


def _timm_state_dict(state: dict[str, Any], where: str) -> tuple[dict[str, Tensor], bool]:
    """Unwrap, strip ``module.``, drop classifier keys and rename the few non-timm token names; and whether
    the model pools globally: an ``fc_norm`` and no final ``norm`` (MAE's fine-tuned layout, timm's
    ``global_pool='avg'``), whose ``fc_norm`` then serves as our final norm."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {key.removeprefix("module."): tensor for key, tensor in state.items()}
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"{where}: {key} is a {type(tensor).__name__}, not a tensor; not a state dict")
    if any(key.endswith("embeddings.patch_embeddings.projection.weight") for key in state):
        raise CheckpointError(f"{where}: a Hugging Face checkpoint; load the folder holding it and its config.json")
    global_pool = "fc_norm.weight" in state and "norm.weight" not in state
    if global_pool:
        state = {("norm" + key[len("fc_norm"):] if key.startswith("fc_norm.") else key): tensor
                 for key, tensor in state.items()}
    return {_TIMM_RENAMES.get(key, key): tensor for key, tensor in state.items()
            if not key.startswith(_TIMM_DROPPED)}, global_pool


def _timm_architecture(model_name: str) -> tuple[dict[str, Any], tuple]:
    arch, _, tag = model_name.partition(".")
    for family in TIMM_FAMILIES:
        match = re.fullmatch(family.pattern, arch)
        if match and match["size"] in TIMM_SIZES:
            width, depth, heads = TIMM_SIZES[match["size"]]
            registers = match.groupdict().get("reg")
            fields = {
                "embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": int(match["patch"]),
                "layer_scale": family.layer_scale,
                "num_reg_tokens": int(registers) if registers else int(family.distilled),
            }
            return fields, IMAGENET if tag.startswith(IMAGENET_TAGS) else family.norm
    supported = ("vit_{size}_patch{P}_{res}, deit_{size}[_distilled]_patch{P}_{res}, deit3_{size}_patch{P}_{res}, "
                 "vit_{size}_patch{P}[_reg{K}]_dinov2")
    raise ConfigError(
        f"timm architecture {model_name!r} is not supported; supported: {supported} "
        f"with size in {', '.join(TIMM_SIZES)} (see querytune.backbones.loading)"
    )


def _infer_architecture(state: dict[str, Tensor], where: str, num_heads: int | None) -> dict[str, Any]:
    """Architecture from tensor shapes; the head count is invisible in them and taken from
    ``num_heads`` or the standard head count of the width."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise CheckpointError(f"{where}: no patch_embed.proj.weight; not a timm ViT checkpoint")
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    reg = state.get("reg_token")
    fields = {
        "embed_dim": width, "depth": depth, "patch_size": patch, "in_chans": in_chans,
        "num_heads": num_heads or HEADS_BY_WIDTH.get(width),
        "mlp_ratio": fc1.shape[0] / width if fc1 is not None else 4.0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "layer_scale": "blocks.0.ls1.gamma" in state,
        "num_reg_tokens": reg.shape[1] if reg is not None else 0,
    }
    if fields["num_heads"] is None:
        raise CheckpointError(
            f"{where}: cannot tell the number of attention heads of a width-{width} ViT from its weights; "
            "pass model_name, or save it with querytune.backbones.save_backbone"
        )
    if num_heads is None:
        warnings.warn(
            f"{where}: no model_name given; inferred a ViT of width {width}, depth {depth}, "
            f"{fields['num_heads']} heads (the usual count for this width), patch {patch}, "
            f"{fields['num_reg_tokens']} register tokens, LayerScale {fields['layer_scale']}; "
            "its normalisation is unknown (give mean and std)",
            stacklevel=1,  # the default: the warning points here
        )
    return fields


def _split_positions(num_positions: int, num_reg_tokens: int, where: str) -> tuple[int, int]:
    """(grid side, prefix tokens with a position embedding) from the length of ``pos_embed``."""
    side = math.isqrt(num_positions)
    prefix = num_positions - side * side
    if prefix > 1 + num_reg_tokens:
        raise CheckpointError(
            f"{where}: pos_embed has {num_positions} positions, not a square grid plus at most "
            f"{1 + num_reg_tokens} prefix tokens"
        )
    return side, prefix
