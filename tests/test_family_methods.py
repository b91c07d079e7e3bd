"""Every method on every family: a few optimiser steps on a tiny random model of each family
(conftest.FAMILIES: CLIP, SigLIP, DINOv3, EVA-02, MAE with mean pooling, MSN, DINOv2 with SwiGLU, ViT with
gelu_new) lower the loss, and a method that adapts the backbone moves every parameter it trains. Where a method
cannot apply (VPT's prompts on a RoPE backbone) it is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, ROPE_FAMILIES, tiny_family, train_a_few_steps
from querytune.errors import ConfigError
from querytune.methods import build_method
from querytune.trunk import TrunkInput
from querytune.trunk.features import extract_features

ADAPTING = ["lora", "adaptformer", "vpt", "ssf", "dtl", "bitfit", "full", "memory-plain"]
FROZEN_TRUNK = ["linear", "vqt", "memory", "synqt", "head2toe"]
# refused (test_vpt_is_refused_on_rope_families): its prompts would sit among the rotated tokens
REFUSED = {("vpt", family) for family in ROPE_FAMILIES}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return images, torch.tensor([0, 1, 2, 0])


def _eval_loss(method, inputs, labels) -> float:
    """The loss in eval mode (no dropout), so that before and after compare."""
    with torch.no_grad():
        return F.cross_entropy(method.eval()(inputs), labels).item()


def _trains(method, inputs, labels) -> dict[str, torch.Tensor]:
    """Five small SGD steps lower the loss, every loss finite; returns the trained parameters' starting values."""
    before = {name: p.detach().clone() for name, p in method.named_parameters() if p.requires_grad}
    start = _eval_loss(method, inputs, labels)
    losses = train_a_few_steps(method, inputs, labels, lr=0.01)
    end = _eval_loss(method, inputs, labels)
    assert all(math.isfinite(loss) for loss in [start, *losses, end]), losses
    assert end < start, (start, losses, end)
    return before


@pytest.mark.parametrize("name,family", [(name, family) for name in ADAPTING for family in FAMILIES
                                         if (name, family) not in REFUSED])
def test_adapting_methods_train_on_every_family(name, family):
    backbone = tiny_family(family)
    method = build_method(name, backbone, 3, {})
    assert method.reads is TrunkInput.IMAGES
    before = _trains(method, *_batch())
    unmoved = [n for n, p in method.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not unmoved


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
@pytest.mark.parametrize("name", ["vpt", "vqt+vpt"])
def test_vpt_is_refused_on_rope_families(name, family):
    with pytest.raises(ConfigError, match=r"^vpt on tiny: its prompts would sit among the tokens that rotary "
                                          r"position embeddings rotate; not supported on RoPE backbones[^\n]*$"):
        build_method(name, tiny_family(family), 3, {})


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", FROZEN_TRUNK)
def test_frozen_trunk_methods_train_on_every_family(name, family):
    backbone = tiny_family(family)
    method = build_method(name, backbone, 3, {})
    images, labels = _batch()
    features = extract_features(backbone, images, with_layers=method.reads is TrunkInput.LAYERS, dtype=torch.float32)
    _trains(method, features, labels)
    assert all(p.grad is None for p in backbone.parameters())
