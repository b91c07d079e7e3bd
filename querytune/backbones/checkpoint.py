"""What every checkpoint reader shares: reading files, and building the ViT under strict key matching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import CheckpointError, one_line
from .vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, ViTConfig

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_METADATA_KEY = "querytune.vit_config"  # safetensors metadata written by save_backbone


def vit_config(where: str, **fields: Any) -> ViTConfig:
    try:
        return ViTConfig(**fields)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: {error}") from error


def build(config: ViTConfig, state: dict[str, Tensor], where: str) -> VisionTransformer:
    """Our ViT with ``state`` loaded under strict key and shape matching."""
    with torch.device("meta"):  # no memory and no random init: every tensor is overwritten below
        model = VisionTransformer(config)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = [f"{label} {first_few(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{where}: tensor names do not match {describe(config)}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(state[key].shape)} but {describe(config)} "
                f"expects {tuple(tensor.shape)}"
            )
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    return model


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str | None]:
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


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error


def describe(config: ViTConfig) -> str:
    return f"a ViT of width {config.embed_dim}, depth {config.depth}, patch {config.patch_size}"


def first_few(keys: list[str], count: int = 4) -> str:
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more
