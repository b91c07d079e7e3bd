"""timm checkpoints: a state-dict file (``.safetensors``, ``.pth``), a hub folder's weights, or a timm
model's state dict. The weights show most of the architecture; the head count is not in them and comes from
a timm architecture name (or the model object), never guessed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .checkpoint import CONFIG_METADATA_KEY, IMAGENET, INCEPTION, OPENAI_CLIP, build, read_checkpoint, vit_config
from .vit import VisionTransformer, ViTConfig

# timm size name -> (width, depth, heads)
TIMM_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "so400m": (1152, 27, 16),
    "giant": (1536, 40, 24),
}


class TimmFamily(NamedTuple):
    pattern: str  # full match of the architecture name, with groups size, patch and (optionally) reg
    layer_scale: bool
    distilled: bool  # has a distillation token, loaded as one register token
    norm: tuple[tuple[float, ...], tuple[float, ...]]  # default mean, std
    act: str = "gelu"  # the MLP activation (a SwiGLU MLP, seen in the weights, has its own)
    norm_eps: float = 1e-6
    rope: str = ""  # rotary position embeddings (ViTConfig.rope), with their _ROPE settings
    registers: int = 0  # register tokens where the name has no reg{K}


_SIZE_PATCH = r"(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)"
TIMM_FAMILIES = (
    TimmFamily(rf"vit_{_SIZE_PATCH}_\d+", False, False, INCEPTION),
    TimmFamily(rf"deit_{_SIZE_PATCH}_\d+", False, False, IMAGENET),
    TimmFamily(r"deit_(?P<size>[a-z]+)_distilled_patch(?P<patch>\d+)_\d+", False, True, IMAGENET),
    TimmFamily(rf"deit3_{_SIZE_PATCH}_\d+", True, False, IMAGENET),
    TimmFamily(rf"vit_{_SIZE_PATCH}_dinov2", True, False, IMAGENET),
    TimmFamily(rf"vit_{_SIZE_PATCH}_reg(?P<reg>\d+)_dinov2", True, False, IMAGENET),
    TimmFamily(rf"vit_{_SIZE_PATCH}_clip_\d+", False, False, OPENAI_CLIP, norm_eps=1e-5),
    TimmFamily(rf"vit_{_SIZE_PATCH}_clip_quickgelu_\d+", False, False, OPENAI_CLIP, "quick_gelu", 1e-5),
    TimmFamily(rf"vit_{_SIZE_PATCH}_siglip_\d+", False, False, INCEPTION),  # timm runs them with exact GELU
    TimmFamily(rf"eva02_{_SIZE_PATCH}_\d+", False, False, OPENAI_CLIP, rope="eva"),
    TimmFamily(rf"vit_{_SIZE_PATCH}_dinov3(?:_qkvb)?", True, False, IMAGENET, norm_eps=1e-5, rope="dinov3",
               registers=4),
)
# timm's rotary embeddings by kind: EVA-02's RotaryEmbeddingCat (the 16 x 16 grid of 224 px at patch 14 is its
# reference), DINOv3's RotaryEmbeddingDinoV3
_ROPE = {"eva": {"rope_temperature": 10000.0, "rope_grid": 16}, "dinov3": {"rope_temperature": 100.0}}
DEFAULT_IMAGE_SIZE = 224  # a RoPE-only model's input size where neither name nor pretrained_cfg gives one (timm's)
_SUPPORTED_NAMES = ("vit_{size}_patch{P}_{res}, deit_{size}[_distilled]_patch{P}_{res}, deit3_{size}_patch{P}_{res}, "
                    "vit_{size}_patch{P}[_reg{K}]_dinov2, vit_{size}_patch{P}_clip[_quickgelu]_{res}, "
                    "vit_{size}_patch{P}_siglip_{res}, eva02_{size}_patch{P}_{res}, vit_{size}_patch{P}_dinov3[_qkvb]")
IMAGENET_TAGS = ("mae", "dino")  # timm vit_* weights normalised with ImageNet mean/std

# timm checkpoint keys that belong to the classifier, or to training only
_TIMM_DROPPED = ("head.", "head_dist.", "pre_logits.", "fc_norm.", "mask_token")
_TIMM_RENAMES = {"dist_token": "reg_token", "register_tokens": "reg_token"}  # DeiT distilled, original DINOv2
# timm's Eva blocks (EVA-02, DINOv3) -> our block names; q/k/v and the SwiGLU's two inputs are packed below
_EVA_RENAMES = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
_EVA_QKV = re.compile(r"blocks\.(\d+)\.attn\.(?:(q|k|v)_proj\.(weight|bias)|(q|v)_(bias))")
_EVA_GLU = re.compile(r"blocks\.(\d+)\.mlp\.fc1_(g|x)\.(weight|bias)")


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

_TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}  # by class name


def from_timm_module(module: Any, model_name: str | None) -> VisionTransformer:
    """A timm ``VisionTransformer`` object: its state dict, with its head count, norm eps and MLP activation
    read from its modules."""
    pretrained_cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
    tagged = ".".join(filter(None, (pretrained_cfg.get("architecture"), pretrained_cfg.get("tag"))))
    name = tagged or type(module).__name__
    block = module.blocks[0]
    activation = type(block.mlp.act).__name__
    if activation == "SiLU":  # a SwiGLU MLP (seen in the weights), whose activation is its own
        act = "gelu"
    elif activation == "GELU" and block.mlp.act.approximate == "tanh":
        act = "gelu_tanh"
    elif activation in _TIMM_ACTIVATIONS:
        act = _TIMM_ACTIVATIONS[activation]
    else:
        raise CheckpointError(f"{name}: MLP activation {activation} is not supported "
                              f"(supported: {', '.join(_TIMM_ACTIVATIONS)})")
    return from_timm_state(module.state_dict(), name, name, model_name, pretrained_cfg,
                           num_heads=block.attn.num_heads, norm_eps=block.norm1.eps, act=act,
                           rope=_module_rope(module, name))


def _module_rope(module: Any, name: str) -> dict[str, Any]:
    """The ViTConfig rope fields of a timm model's rotary embedding (none: {})."""
    rope = getattr(module, "rope", None)
    kind = type(rope).__name__
    if rope is None:
        return {}
    if kind == "RotaryEmbeddingCat" and not rope.rotate_half and rope.grid_type == "index" and not rope.grid_offset:
        reference = rope.ref_feat_shape
        if reference is not None and reference[0] != reference[1]:
            raise CheckpointError(f"{name}: a non-square rotary reference grid {reference} is not supported")
        return {"rope": "eva", "rope_temperature": float(rope.temperature),
                "rope_grid": int(reference[0]) if reference is not None else 0}
    if (kind == "RotaryEmbeddingDinoV3" and rope.rotate_half and rope.normalize_coords == "separate"
            and rope.min_period is None and not rope.grid_offset):
        return {"rope": "dinov3", "rope_temperature": float(rope.temperature)}
    raise CheckpointError(f"{name}: rotary embedding {kind} with these settings is not supported "
                          "(supported: EVA-02's and DINOv3's)")


def from_timm_state(
    state: dict[str, Tensor],
    where: str,
    name: str,
    model_name: str | None,
    pretrained_cfg: dict[str, Any] | None = None,
    num_heads: int | None = None,
    norm_eps: float = 1e-6,
    act: str = "gelu",
    rope: dict[str, Any] | None = None,
) -> VisionTransformer:
    """Our ViT from a timm-named state dict. What the weights show (width, depth, patch, MLP, tokens, norms,
    pooling) is read from them; the head count, the activation, the norms' eps and the normalisation are
    not in them and come from ``model_name`` (a timm architecture), or from the caller (``num_heads``,
    ``norm_eps``, ``act``: a timm model object, an ``.npz`` file). Without a head count it is refused."""
    state, global_pool = _timm_state_dict(state, where)
    fields = _shape_fields(state, where)
    mean = std = None  # unknown unless a name or pretrained_cfg says
    if model_name is not None:
        named, (mean, std) = _timm_architecture(model_name)
        fields.update(named)
    elif num_heads is not None:
        fields.update(num_heads=num_heads, norm_eps=norm_eps, act=act, **(rope or {}))
    else:
        raise CheckpointError(
            f"{where}: the number of attention heads of a width-{fields['embed_dim']} ViT cannot be told from "
            "its weights; name its timm architecture (model_name, or a folder whose config.json says "
            '{"architecture": NAME}), or save it with querytune.backbones.save_backbone'
        )
    if "pos_embed" in state:
        grid, prefix = _split_positions(state["pos_embed"].shape[1],
                                        fields["num_reg_tokens"] + fields["class_token"], where)
    elif fields.get("rope"):  # positions by rotation only (DINOv3): the weights show no input size
        grid, prefix = _rotary_only_size(model_name, pretrained_cfg) // fields["patch_size"], 0
    else:
        raise CheckpointError(f"{where}: no pos_embed; not a ViT checkpoint with absolute position embeddings")
    if pretrained_cfg:
        mean, std = pretrained_cfg.get("mean", mean), pretrained_cfg.get("std", std)
    config = vit_config(
        where, **fields, image_size=grid * fields["patch_size"], pos_embed_prefix=prefix, pos_embed_antialias=True,
        mean=mean, std=std, name=name, global_pool=global_pool,
    )
    return build(config, state, where)


def _rotary_only_size(model_name: str | None, pretrained_cfg: dict[str, Any] | None) -> int:
    """The native input size of a model whose weights hold no position embedding: the name's resolution, else its
    pretrained_cfg's square ``input_size`` (a hub folder's: DINOv3's 256), else timm's default."""
    resolution = re.search(r"_(\d+)$", (model_name or "").partition(".")[0])
    if resolution:
        return int(resolution[1])
    input_size = (pretrained_cfg or {}).get("input_size")
    if input_size and input_size[-1] == input_size[-2]:
        return int(input_size[-1])
    return DEFAULT_IMAGE_SIZE


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
    state = {_TIMM_RENAMES.get(key, key): tensor for key, tensor in state.items()
             if not key.startswith(_TIMM_DROPPED)}
    return _eva_blocks(state, where), global_pool


def _eva_blocks(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """timm's Eva block tensors under our names: LayerScale ``gamma_1/2``; separate q/k/v projections, or a
    fused qkv with ``q_bias`` and ``v_bias`` only, as one qkv (the key bias 0); the SwiGLU's ``fc1_g`` and
    ``fc1_x`` packed in ``fc1`` (gate first). Other state dicts pass unchanged."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    glu: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in state.items():
        block, _, leaf = key.rpartition(".")
        if (match := _EVA_QKV.fullmatch(key)) is not None:
            part, param = (match[2], match[3]) if match[2] else (match[4], match[5])
            qkv.setdefault((match[1], param), {})[part] = tensor
        elif (match := _EVA_GLU.fullmatch(key)) is not None:
            glu.setdefault((match[1], match[3]), {})[match[2]] = tensor
        elif key.startswith("blocks.") and leaf in _EVA_RENAMES:
            out[f"{block}.{_EVA_RENAMES[leaf]}"] = tensor
        else:
            out[key] = tensor
    for (index, param), parts in qkv.items():
        if param == "bias":  # EVA has no key bias
            parts = {"k": torch.zeros_like(next(iter(parts.values()))), **parts}
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{where}: block {index} lacks some of its q/k/v {param} tensors")
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for (index, param), halves in glu.items():
        out[f"blocks.{index}.mlp.fc1.{param}"] = torch.cat([halves["g"], halves["x"]])
    return out


def _timm_architecture(model_name: str) -> tuple[dict[str, Any], tuple]:
    arch, _, tag = model_name.partition(".")
    if arch.startswith("beit"):
        raise ConfigError(f"timm architecture {model_name!r} is not supported: BEiT's blocks add a relative "
                          "position bias to the attention, which the task path's rows do not carry")
    for family in TIMM_FAMILIES:
        match = re.fullmatch(family.pattern, arch)
        if match and match["size"] in TIMM_SIZES:
            width, depth, heads = TIMM_SIZES[match["size"]]
            registers = match.groupdict().get("reg")
            fields = {
                "embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": int(match["patch"]),
                "layer_scale": family.layer_scale,
                "num_reg_tokens": int(registers) if registers else int(family.distilled) or family.registers,
                "act": family.act, "norm_eps": family.norm_eps,
            }
            if family.rope:
                fields.update(rope=family.rope, **_ROPE[family.rope])
            return fields, IMAGENET if tag.startswith(IMAGENET_TAGS) else family.norm
    raise ConfigError(
        f"timm architecture {model_name!r} is not supported; supported: {_SUPPORTED_NAMES} "
        f"with size in {', '.join(TIMM_SIZES)} (see querytune.backbones.timm_format)"
    )


def _shape_fields(state: dict[str, Tensor], where: str) -> dict[str, Any]:
    """What a timm state dict's names and shapes tell of its architecture (all but the head count, the
    activation and the norms' eps)."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise CheckpointError(f"{where}: no patch_embed.proj.weight; not a timm ViT checkpoint")
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]  # packed gate and input
    reg = state.get("reg_token")
    return {
        "embed_dim": width, "patch_size": patch, "in_chans": in_chans,
        "depth": len({key.split(".")[1] for key in state if key.startswith("blocks.")}),
        "mlp_ratio": fc2.shape[1] / width if fc2 is not None else 4.0,
        "swiglu": swiglu,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "layer_scale": "blocks.0.ls1.gamma" in state,
        "num_reg_tokens": reg.shape[1] if reg is not None else 0,
        "class_token": "cls_token" in state,
        "patch_bias": "patch_embed.proj.bias" in state,
        "norm_pre": "norm_pre.weight" in state,
        "map_pool": "attn_pool.latent" in state,
        "mlp_norm": "blocks.0.mlp.norm.weight" in state,
        "absolute_pos_embed": "pos_embed" in state,
    }


def _split_positions(num_positions: int, num_prefix_tokens: int, where: str) -> tuple[int, int]:
    """(grid side, prefix tokens with a position embedding) from the length of ``pos_embed``."""
    side = math.isqrt(num_positions)
    prefix = num_positions - side * side
    if prefix > num_prefix_tokens:
        raise CheckpointError(
            f"{where}: pos_embed has {num_positions} positions, not a square grid plus at most "
            f"{num_prefix_tokens} prefix tokens"
        )
    return side, prefix
