"""Measurement: every method can be measured in float32 and bfloat16, and the counts mean what they say."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from querytune.measure import SavedTensorMeter, measure_step
from querytune.methods import build_method


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", ["linear", "vqt", "synqt", "full"])
def test_measure_step_in_both_precisions(name, bf16):
    method = build_method(name, tiny_vit(layer_scale=True), 5, {})
    cost = measure_step(method, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), repeats=1, bf16=bf16)
    config, element = method.backbone.config, 2 if bf16 else 4
    # a linear probe keeps its (B, D) input for the weight gradient; the others at least one (B, N, D)
    # tensor per block (the rows forward keeps each layer's normalised tokens, full FT much more)
    least = 4 * config.embed_dim * (1 if name == "linear" else config.depth * config.num_tokens(32))
    assert cost.saved_bytes >= least * element
    weights = sum(p.numel() * p.element_size() for p in method.parameters())
    assert cost.inference_peak_bytes > weights and cost.train_peak_bytes > weights  # process RSS holds the model
    assert cost.step_seconds > 0


def test_vqt_saves_a_fraction_of_the_naive_formulation():
    """The efficient path keeps about one (B, N, D) tensor per layer; the published way keeps the whole
    trunk's activations."""
    backbone = tiny_vit(image_size=64)  # 65 tokens
    vqt = build_method("vqt", backbone, 5, {})
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    fast = measure_step(vqt, images, labels, repeats=1).saved_bytes
    naive = measure_step(vqt.published_way(), images, labels, repeats=1).saved_bytes
    assert fast < 0.25 * naive


def test_meter_counts_each_storage_once_and_skips_parameters():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    meter = SavedTensorMeter(layer)
    with meter():
        y = layer(x)
        (y * y).sum()  # saves y twice (as both operands): counted once
    assert meter.bytes == x.numel() * 4 + y.numel() * 4
