"""Load pretrained ViTs from timm and Hugging Face formats into querytune's :class:`VisionTransformer`.

:func:`load_backbone` accepts

1. a local Hugging Face model folder: ``config.json`` + ``model.safetensors`` or
   ``pytorch_model.bin`` (an optional ``preprocessor_config.json`` gives mean/std);
2. a timm-format checkpoint file (``.safetensors``, ``.pth``, ``.bin``), with an optional
   ``model_name`` (a timm architecture name, see the table below); without one the
   architecture is inferred from the tensor shapes, with a warning. A safetensors file
   written by :func:`save_backbone` carries its exact config and needs neither. One with an
   ``fc_norm`` and no final ``norm`` (MAE fine-tuned, timm's ``global_pool='avg'``) is a global-pool
   model (``ViTConfig.global_pool``; its ``fc_norm`` is loaded as ``norm``);
3. a local timm hub folder (``config.json`` with ``architecture`` and ``pretrained_cfg``);
4. a hub name (``facebook/dinov2-small``, ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``, or
   a bare timm name such as ``vit_base_patch16_224.augreg_in21k``, which means ``timm/<name>``
   as in timm), resolved with ``huggingface_hub`` so that its local cache serves it offline
   (``HF_HUB_OFFLINE=1``);
5. an ``.npz`` checkpoint of the original JAX ViTs, as VPT, VQT, NOAH, SSF and V-PETL load
   it (``ViT-B_16.npz``, ``imagenet21k/ViT-B_16.npz``; any depth and width, the head count
   read from the attention kernels);
6. an in-memory ``transformers`` ViT/DeiT/DINOv2 model (or ``*ForImageClassification``
   around one) or timm ``VisionTransformer``, converted through its state dict;
7. a querytune :class:`VisionTransformer`, returned as is.

Hugging Face ``model_type``: ``vit``, ``deit``, ``dinov2``, ``dinov2_with_registers``.

Normalisation (mean/std) is never guessed: it comes from the checkpoint's own config (a
preprocessor config, a timm ``pretrained_cfg``, querytune's saved config), from a known name
(a timm architecture, DINOv2), or it is left unknown (``None``) and a run must be given
``--mean``/``--std`` (:meth:`querytune.data.Preprocess.for_backbone` says so).
Only GELU MLPs are supported (no SwiGLU, so no DINOv2 giant). DeiT in transformers
always has a distillation token; it is loaded as one register token with its own
position embedding (``pos_embed_prefix=2``), which reproduces ``DeiTModel`` exactly.

timm architectures (``model_name``; a ``.tag`` suffix is allowed)::

    name pattern                         LayerScale  extra tokens          mean/std
    vit_{size}_patch{P}_{res}            no          -                     0.5/0.5 (ImageNet for tags mae*, dino*)
    deit_{size}_patch{P}_{res}           no          -                     ImageNet
    deit_{size}_distilled_patch{P}_{res} no          distillation token    ImageNet
    deit3_{size}_patch{P}_{res}          yes         -                     ImageNet
    vit_{size}_patch{P}_dinov2           yes         -                     ImageNet
    vit_{size}_patch{P}_reg{K}_dinov2    yes         K registers           ImageNet

    size    width  depth  heads
    tiny     192     12      3
    small    384     12      6
    medium   512     12      8
    base     768     12     12
    large   1024     24     16
    huge    1280     32     16

All have a class token, QKV bias and MLP ratio 4. The position-embedding grid and
how many prefix tokens have a position embedding (timm's ``no_embed_class``) are read
from the checkpoint's ``pos_embed``, so ``{res}`` is not checked. A timm hub config's
``pretrained_cfg`` mean/std take precedence over the table.

Position embeddings are resampled (at run time, or once here for ``image_size``) the
way the source library does: with antialiasing for timm weights and DINOv2 with
registers, without for Hugging Face ViT, DeiT and DINOv2.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, QuerytuneError, one_line
from ..files import umask_modes
from .vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, ViTConfig

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

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

# timm checkpoint keys that belong to the classifier, or to training only
_TIMM_DROPPED = ("head.", "head_dist.", "pre_logits.", "fc_norm.", "mask_token")
_TIMM_RENAMES = {"dist_token": "reg_token", "register_tokens": "reg_token"}  # DeiT distilled, original DINOv2

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_METADATA_KEY = "querytune.vit_config"  # safetensors metadata written by save_backbone
_HUB_NAME = re.compile(r"(?:hf-hub:)?[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def load_backbone(
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
    image_size: int | None = None,
) -> VisionTransformer:
    """A frozen (eval mode, no grad) ViT in ``dtype`` from any source in the module docstring.

    ``model_name`` names the timm architecture of a timm-format checkpoint (it does
    not apply to Hugging Face formats). ``image_size`` resamples the position
    embeddings once, here, to that input size, exactly as the ViT would at run time.
    ``config.name`` becomes the source's name: hub name, folder or file name.
    """
    if isinstance(source, VisionTransformer):
        model = source
    elif isinstance(source, nn.Module):
        model = _from_module(source, model_name)
    elif isinstance(source, (str, Path)):
        model = _from_path_or_hub(source, model_name)
    else:
        raise QuerytuneError(f"cannot load a backbone from a {type(source).__name__}; give a path, hub name or model")
    if image_size is not None:
        _resample_positions(model, image_size)
    return model.to(dtype).eval().requires_grad_(False)


def save_backbone(model: VisionTransformer, path: str | Path) -> None:
    """Save as timm-named safetensors with the exact config in its metadata, so that
    :func:`load_backbone` needs no ``model_name`` and infers nothing."""
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})
    umask_modes(Path(path))


# ---------------------------------------------------------------- sources


def _from_path_or_hub(source: str | Path, model_name: str | None) -> VisionTransformer:
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path, model_name, name=path.resolve().name, where=str(path))
    if path.suffix == ".npz" and path.is_file():
        return _from_npz_file(path, model_name)
    if path.exists():
        return _from_timm_file(path, model_name)
    if isinstance(source, str) and _is_timm_name(text):  # a bare timm name is its timm/ hub repo, as in timm
        text = f"timm/{text}"
    if isinstance(source, str) and _HUB_NAME.fullmatch(text) and not text.endswith(_CHECKPOINT_SUFFIXES):
        repo_id = text.removeprefix("hf-hub:")
        return _from_folder(_hub_snapshot(repo_id), model_name, name=repo_id, where=repo_id)
    raise CheckpointError(f"{source}: no such file or directory")


def _is_timm_name(text: str) -> bool:
    """A supported timm architecture name, with or without a ``.tag`` (``vit_base_patch16_224.augreg_in21k``)."""
    arch, _, tag = text.partition(".")
    return re.fullmatch(r"[\w-]*", tag) is not None and any(re.fullmatch(f.pattern, arch) for f in TIMM_FAMILIES)


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub repo holding its config and weights (cached or downloaded)."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename))

    def fail(error: Exception) -> CheckpointError:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CheckpointError(
            f"{repo_id}: no such local path; as a hub name it was not found locally and could not be downloaded: "
            f"{reason}"
        )

    # The hub client raises OSError subclasses for missing repos, files and network
    # failures, and ValueError subclasses for malformed names.
    try:
        config = fetch("config.json")
    except (OSError, ValueError) as error:
        raise fail(error) from error
    for filename in WEIGHT_FILES:
        try:
            fetch(filename)
            break
        except (OSError, ValueError) as error:
            last_error = error
    else:
        raise fail(last_error) from last_error
    if "model_type" in _read_json(config):  # Hugging Face format: mean/std live in the preprocessor config
        try:
            fetch("preprocessor_config.json")
        except (OSError, ValueError):
            pass  # optional: without it a DINOv2 takes its own (ImageNet's) mean/std, a ViT or DeiT none
    return config.parent


def _from_folder(folder: Path, model_name: str | None, name: str, where: str) -> VisionTransformer:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{where}: no config.json; expected a Hugging Face or timm model folder")
    config = _read_json(config_path)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{where}: no {' or '.join(WEIGHT_FILES)}")
    where = f"{where}/{weights.name}"
    state, _ = _read_checkpoint(weights)
    if "architecture" in config:  # timm hub layout
        return _from_timm_state(
            state, where, name, model_name or config["architecture"], pretrained_cfg=config.get("pretrained_cfg")
        )
    if "model_type" in config:
        if model_name is not None:
            raise ConfigError(f"model_name applies to timm checkpoints; {where} is a Hugging Face model")
        preprocessor_path = folder / "preprocessor_config.json"
        preprocessor = _read_json(preprocessor_path) if preprocessor_path.is_file() else {}
        vit_config = _hf_vit_config(config, preprocessor, str(config_path), name)
        return _build(vit_config, _hf_state_dict(state, where), where)
    raise CheckpointError(f"{config_path}: neither a Hugging Face (model_type) nor a timm (architecture) config")


def _from_timm_file(path: Path, model_name: str | None) -> VisionTransformer:
    state, saved_config = _read_checkpoint(path)
    if saved_config is not None and model_name is None:
        try:
            config = ViTConfig.from_dict(json.loads(saved_config))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: invalid {CONFIG_METADATA_KEY} metadata ({error})") from error
        config.name = path.name
        return _build(config, _timm_state_dict(state, str(path))[0], str(path))
    return _from_timm_state(state, str(path), path.name, model_name)


def _from_module(module: Any, model_name: str | None) -> VisionTransformer:
    """``module``: an ``nn.Module`` from transformers or timm, read by duck typing."""
    config: Any = getattr(module, "config", None)
    if hasattr(module, "base_model") and hasattr(config, "model_type"):  # transformers
        if model_name is not None:
            raise ConfigError("model_name applies to timm checkpoints, not to a transformers model")
        hf_config = config.to_dict()
        name = hf_config.get("_name_or_path") or type(module).__name__
        vit_config = _hf_vit_config(hf_config, {}, name, name)
        return _build(vit_config, _hf_state_dict(module.base_model.state_dict(), name), name)
    pretrained_cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if hasattr(module, "patch_embed") and hasattr(module, "blocks") and pretrained_cfg is not None:  # timm
        tagged = ".".join(filter(None, (pretrained_cfg.get("architecture"), pretrained_cfg.get("tag"))))
        name = tagged or type(module).__name__
        return _from_timm_state(
            module.state_dict(), name, name, model_name, pretrained_cfg,
            num_heads=module.blocks[0].attn.num_heads, norm_eps=getattr(getattr(module, "norm", None), "eps", 1e-6),
        )
    raise QuerytuneError(
        f"cannot load a backbone from a {type(module).__name__}: expected a transformers ViT/DeiT/DINOv2 "
        "or a timm VisionTransformer"
    )


# ---------------------------------------------------------------- timm format


def _from_timm_state(
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
    config = _vit_config(
        where, **fields, image_size=grid * fields["patch_size"], pos_embed_prefix=prefix, pos_embed_antialias=True,
        norm_eps=norm_eps, mean=mean, std=std, name=name, global_pool=global_pool,
    )
    return _build(config, state, where)


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


# ---------------------------------------------------------------- .npz (Google ViT / VPT / VQT)


def _from_npz_file(path: Path, model_name: str | None) -> VisionTransformer:
    """The original JAX ViT checkpoints that VPT, VQT, NOAH, SSF and V-PETL load (``ViT-B_16.npz``,
    ``imagenet21k/ViT-B_16.npz``, any depth and width). Their normalisation is unknown unless
    ``model_name`` names it: the same file is used with ImageNet mean/std by VPT and VQT and with
    0.5/0.5 by SSF and NOAH's VPT script, so a run gives ``--mean``/``--std``."""
    state, num_heads = _npz_state_dict(_read_npz(path), str(path))
    return _from_timm_state(state, str(path), path.name, model_name, num_heads=num_heads)


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


# ---------------------------------------------------------------- Hugging Face format


def _hf_vit_config(config: dict[str, Any], preprocessor: dict[str, Any], where: str, name: str) -> ViTConfig:
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
    return _vit_config(
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


def _hf_state_dict(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
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


# ---------------------------------------------------------------- shared


def _vit_config(where: str, **fields: Any) -> ViTConfig:
    try:
        return ViTConfig(**fields)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: {error}") from error


def _build(config: ViTConfig, state: dict[str, Tensor], where: str) -> VisionTransformer:
    """Our ViT with ``state`` loaded under strict key and shape matching."""
    with torch.device("meta"):  # no memory and no random init: every tensor is overwritten below
        model = VisionTransformer(config)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = [f"{label} {_first_few(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{where}: tensor names do not match {_describe(config)}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(state[key].shape)} but {_describe(config)} "
                f"expects {tuple(tensor.shape)}"
            )
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    return model


def _resample_positions(model: VisionTransformer, image_size: int) -> None:
    patch = model.config.patch_size
    if image_size <= 0 or image_size % patch:
        raise ConfigError(f"image_size {image_size} is not a positive multiple of the patch size {patch}")
    side = image_size // patch
    with torch.no_grad():
        prefix, patches = model.position_embedding(side, side)
    model.pos_embed = nn.Parameter(torch.cat([prefix, patches], dim=1))
    model.config.image_size = image_size


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], str | None]:
    """(the loaded object, querytune config metadata or None)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as handle:
                state = {key: handle.get_tensor(key) for key in handle.keys()}
                return state, (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
        except Exception as error:  # safetensors raises its own types for torn or foreign files
            reason = f"{type(error).__name__}: {one_line(error)}"
            raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises assorted types, with paragraphs of advice, for torn or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}); not a PyTorch state dict "
                              "file") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state, None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error


def _describe(config: ViTConfig) -> str:
    return f"a ViT of width {config.embed_dim}, depth {config.depth}, patch {config.patch_size}"


def _first_few(keys: list[str], count: int = 4) -> str:
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more
