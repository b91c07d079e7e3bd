"""The loaders against real timm models (timm installed with ``--no-deps``; where torchvision is absent a
test-only stand-in takes its place, tests/torchvision_stub.py). Random weights, timm's own forward."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import import_timm
from querytune.backbones import load_backbone

timm = import_timm()

# timm name -> input size (small grids keep it fast; timm's models take their image size as an option)
MODELS = {
    "vit_tiny_patch16_224": 64,
    "deit_tiny_distilled_patch16_224": 64,
    "deit3_small_patch16_224": 64,
    "vit_small_patch14_dinov2": 56,
    "vit_small_patch14_reg4_dinov2": 56,
    "vit_base_patch16_clip_224": 64,
    "vit_base_patch16_clip_quickgelu_224": 64,
    "vit_base_patch16_siglip_224": 64,
}
SWIGLU_DINOV2 = {"mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu_packed", "act_layer": "silu"}  # as the giant's


def timm_model(name: str, image_size: int, **options) -> torch.nn.Module:
    """A random timm model with every parameter moved off its init (norms and LayerScales off 1, biases,
    tokens and the attention pool's latent off 0), so that mixing any of them up shows."""
    if options.get("mlp_layer") == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        options = {**options, "mlp_layer": SwiGLUPacked}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=image_size, **options).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))  # about the weights' own init scale
    return model


def check_against_timm(reference: torch.nn.Module, image_size: int, path, model_name: str) -> None:
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected = reference.forward_features(images)  # final-normed tokens, prefix tokens first
        # timm's distilled DeiT averages its class and distillation tokens before its heads; ours reads the class token
        distilled = getattr(reference, "dist_token", None) is not None
        expected_pooled = expected[:, 0] if distilled else reference.forward_head(expected, pre_logits=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    for ours in (load_backbone(reference), load_backbone(path, model_name=model_name)):
        with torch.no_grad():
            torch.testing.assert_close(ours.forward_features(images), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(ours(images), expected_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_object_and_checkpoint_match_timm(name, tmp_path):
    check_against_timm(timm_model(name, MODELS[name]), MODELS[name], tmp_path / "weights.safetensors", name)


def test_swiglu_dinov2_matches_timm(tmp_path):
    """DINOv2 giant's SwiGLU MLP (timm's SwiGLUPacked), on a small model."""
    reference = timm_model("vit_small_patch14_dinov2", 56, **SWIGLU_DINOV2)
    check_against_timm(reference, 56, tmp_path / "weights.safetensors", "vit_small_patch14_dinov2")
