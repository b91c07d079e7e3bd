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
}


def timm_model(name: str, image_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=image_size).eval()
    with torch.no_grad():  # move norms and LayerScales off their identity init, so that mixing them up shows
        for param_name, param in model.named_parameters():
            if param_name.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma")):
                param.copy_(1 + 0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_object_and_checkpoint_match_timm(name, tmp_path):
    image_size = MODELS[name]
    reference = timm_model(name, image_size)
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected = reference.forward_features(images)  # final-normed tokens, prefix tokens first
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    for ours in (load_backbone(reference), load_backbone(path, model_name=name)):
        with torch.no_grad():
            tokens = ours.forward_features(images)
        torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
