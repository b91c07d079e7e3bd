"""Load pretrained ViTs from timm and Hugging Face formats into querytune's :class:`VisionTransformer`.

This module picks the reader by the source's form; each format has its own module:
``hf_format`` (Hugging Face folders and models), ``timm_format`` (timm files, hub folders and
models), ``npz_format`` (JAX ``.npz``), ``checkpoint`` (reading files, strict building).

:func:`load_backbone` accepts

1. a local Hugging Face model folder: ``config.json`` + ``model.safetensors`` or
   ``pytorch_model.bin`` (an optional ``preprocessor_config.json`` gives mean/std);
2. a timm-format checkpoint file (``.safetensors``, ``.pth``, ``.bin``) with its ``model_name``
   (a timm architecture name, see the table below): the head count is not in the weights, so
   without a name the file is refused. A safetensors file written by :func:`save_backbone`
   carries its exact config and needs none. One with an
   ``fc_norm`` and no final ``norm`` (MAE fine-tuned, timm's ``global_pool='avg'``) is a global-pool
   model (``ViTConfig.global_pool``; its ``fc_norm`` is loaded as ``norm``);
3. a local timm hub folder (``config.json`` with ``architecture`` and ``pretrained_cfg``);
4. a hub name (``facebook/dinov2-small``, ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``, or
   a bare timm name such as ``vit_base_patch16_224.augreg_in21k``, which means ``timm/<name>``
   as in timm), resolved with ``huggingface_hub`` so that its local cache serves it offline
   (``HF_HUB_OFFLINE=1``);
5. an ``.npz`` checkpoint of the original JAX ViTs, as VPT, VQT, NOAH, SSF and V-PETL load
   it (``ViT-B_16.npz``, ``imagenet21k/ViT-B_16.npz``; any depth and width, the head count
   read from the attention kernels), or big_vision's (``params/``: a ViT, SigLIP's image tower);
6. an in-memory ``transformers`` model of a type below (or ``*ForImageClassification``
   around one) or timm ``VisionTransformer``, converted through its state dict;
7. a querytune :class:`VisionTransformer`, returned as is.

Hugging Face ``model_type``: ``vit``, ``deit``, ``dinov2``, ``dinov2_with_registers`` (also with
``use_swiglu_ffn``), ``vit_mae``, ``vit_msn``, ``clip_vision_model``, ``siglip_vision_model``,
``siglip2_vision_model``, and the vision tower of ``clip``, ``siglip``, ``siglip2`` folders.

Normalisation (mean/std) is never guessed: it comes from the checkpoint's own config (a
preprocessor config, a timm ``pretrained_cfg``, querytune's saved config), from a known name
(a timm architecture; DINOv2, MAE, MSN, CLIP, SigLIP), or it is left unknown (``None``) and a run
must be given ``--mean``/``--std`` (:meth:`querytune.data.Preprocess.for_backbone` says so).
DeiT in transformers
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
    vit_{size}_patch{P}_clip_{res}       no          (norm_pre)            OpenAI CLIP (GELU, eps 1e-5)
    vit_{size}_patch{P}_clip_quickgelu_{res}                               OpenAI CLIP (QuickGELU, eps 1e-5)
    vit_{size}_patch{P}_siglip_{res}     no          no class token, MAP   0.5/0.5

    size    width  depth  heads
    tiny     192     12      3
    small    384     12      6
    medium   512     12      8
    base     768     12     12
    large   1024     24     16
    huge    1280     32     16
    so400m  1152     27     16
    giant   1536     40     24

The MLP (its width, SwiGLU or not), the class token, patch bias, ``norm_pre`` and attention pool are
read from the weights; the name gives the head count, activation and eps. The position-embedding grid and
how many prefix tokens have a position embedding (timm's ``no_embed_class``) are read
from the checkpoint's ``pos_embed``, so ``{res}`` is not checked. A timm hub config's
``pretrained_cfg`` mean/std take precedence over the table.

Position embeddings are resampled (at run time, or once here for ``image_size``) the
way the source library does: with antialiasing for timm weights and DINOv2 with
registers, without for Hugging Face ViT, DeiT and DINOv2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, QuerytuneError
from ..files import umask_modes
from ..options import ImageSize
from .checkpoint import CONFIG_METADATA_KEY, WEIGHT_FILES, read_checkpoint, read_json
from .hf_format import from_hf_folder, from_hf_module
from .npz_format import from_npz_file
from .timm_format import from_timm_file, from_timm_module, from_timm_state, is_timm_name
from .vit import VisionTransformer

__all__ = ["CONFIG_METADATA_KEY", "check_input_size", "load_backbone", "save_backbone"]

_HUB_NAME = re.compile(r"(?:hf-hub:)?[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def load_backbone(
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
    image_size: int | str | ImageSize | None = None,
) -> VisionTransformer:
    """A frozen (eval mode, no grad) ViT in ``dtype`` from any source in the module docstring.

    ``model_name`` names the timm architecture of a timm-format checkpoint (it does
    not apply to Hugging Face formats). ``image_size`` (N or (height, width)) resamples the position
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
        return from_npz_file(path, model_name)
    if path.exists():
        return from_timm_file(path, model_name)
    if isinstance(source, str) and is_timm_name(text):  # a bare timm name is its timm/ hub repo, as in timm
        text = f"timm/{text}"
    if isinstance(source, str) and _HUB_NAME.fullmatch(text) and not text.endswith(_CHECKPOINT_SUFFIXES):
        repo_id = text.removeprefix("hf-hub:")
        return _from_folder(_hub_snapshot(repo_id), model_name, name=repo_id, where=repo_id)
    raise CheckpointError(f"{source}: no such file or directory")


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
    if "model_type" in read_json(config):  # Hugging Face format: mean/std live in the preprocessor config
        try:
            fetch("preprocessor_config.json")
        except (OSError, ValueError):
            pass  # optional: without it a DINOv2 takes its own (ImageNet's) mean/std, a ViT or DeiT none
    return config.parent


def _from_folder(folder: Path, model_name: str | None, name: str, where: str) -> VisionTransformer:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{where}: no config.json; expected a Hugging Face or timm model folder")
    config = read_json(config_path)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{where}: no {' or '.join(WEIGHT_FILES)}")
    where = f"{where}/{weights.name}"
    state, _ = read_checkpoint(weights)
    if "architecture" in config:  # timm hub layout
        return from_timm_state(
            state, where, name, model_name or config["architecture"], pretrained_cfg=config.get("pretrained_cfg")
        )
    if "model_type" in config:
        if model_name is not None:
            raise ConfigError(f"model_name applies to timm checkpoints; {where} is a Hugging Face model")
        return from_hf_folder(folder, config, state, name, where)
    raise CheckpointError(f"{config_path}: neither a Hugging Face (model_type) nor a timm (architecture) config")


def _from_module(module: Any, model_name: str | None) -> VisionTransformer:
    """``module``: an ``nn.Module`` from transformers or timm, read by duck typing."""
    config: Any = getattr(module, "config", None)
    if hasattr(module, "base_model") and hasattr(config, "model_type"):  # transformers
        if model_name is not None:
            raise ConfigError("model_name applies to timm checkpoints, not to a transformers model")
        return from_hf_module(module)
    if hasattr(module, "patch_embed") and hasattr(module, "blocks") and hasattr(module, "pretrained_cfg"):  # timm
        return from_timm_module(module, model_name)
    raise QuerytuneError(
        f"cannot load a backbone from a {type(module).__name__}: expected a transformers ViT/DeiT/DINOv2 "
        "or a timm VisionTransformer"
    )


def check_input_size(model: VisionTransformer, size: ImageSize, name: str = "--image-size") -> None:
    """A one-line ConfigError naming the flag ``name`` where the patch embedding cannot take input of ``size``:
    both sides must be positive multiples of the patch size."""
    patch = model.config.patch_size
    if any(side < patch or side % patch for side in size):
        sides = "must be" if size.square else "height and width must each be"
        raise ConfigError(f"{name} {size.recorded}: {sides} a positive multiple of the backbone's patch size {patch}")


def _resample_positions(model: VisionTransformer, image_size: int | str | ImageSize) -> None:
    size = ImageSize.of(image_size, "image_size")
    check_input_size(model, size, "image_size")
    height, width = size.height // model.config.patch_size, size.width // model.config.patch_size
    with torch.no_grad():
        positions = model.position_embedding(height, width)
    if positions is not None:  # none on a RoPE-only backbone (DINOv3), whose rotations follow any grid
        model.pos_embed = nn.Parameter(torch.cat(positions, dim=1))
        model.pos_embed_grid = (height, width)
    model.set_input_size(*size)
    if size.square:  # a non-square size is not the model's: its config keeps the native square one
        model.config.image_size = size.height
