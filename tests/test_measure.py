"""Measurement: the counts of one training step against independent counts of what each method must keep."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from querytune.errors import ConfigError
from querytune.measure import SavedTensorMeter, measure_method, measure_step
from querytune.methods import build_method
from querytune.trunk.precision import Precision

BATCH, CLASSES, SIZE = 4, 5, 64  # 65 tokens: the per-layer tokens dominate what the rows forward keeps


def step_saved_bytes(name: str, precision: Precision = Precision.FP32, **options) -> tuple[int, object]:
    method = build_method(name, tiny_vit(layer_scale=True, image_size=SIZE), CLASSES, options)
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE), torch.arange(BATCH) % CLASSES
    cost = measure_step(method, images, labels, repeats=1, precision=precision)
    return cost.saved_bytes, method.backbone.config


def loss_saved_bytes() -> int:
    """What the cross-entropy of (B, C) float32 logits keeps, counted on its own."""
    logits = torch.randn(BATCH, CLASSES, requires_grad=True)
    with SavedTensorMeter()() as meter:
        F.cross_entropy(logits, torch.arange(BATCH) % CLASSES)
    return meter.bytes


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_a_linear_probe_keeps_its_head_input_and_the_loss_only(precision):
    saved, config = step_saved_bytes("linear", precision)
    element = 2 if precision is Precision.BF16 else 4
    head_input = BATCH * config.embed_dim * element  # the (B, D) class tokens, for the weight gradient
    assert saved == head_input + loss_saved_bytes()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
@pytest.mark.parametrize("name", ["vqt", "synqt"])
def test_the_rows_forward_keeps_about_one_token_tensor_per_layer(name, precision):
    saved, config = step_saved_bytes(name, precision)
    tokens = config.depth * BATCH * config.num_tokens(SIZE) * config.embed_dim  # each layer's (B, N, D)
    element = 2 if precision is Precision.BF16 else 4
    assert tokens * element <= saved <= 3 * tokens * 4  # and the small query rows' own tensors


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_vqt_saves_a_fraction_of_full_fine_tuning_and_of_its_published_way(precision):
    vqt, _ = step_saved_bytes("vqt", precision)
    full, _ = step_saved_bytes("full", precision)
    assert vqt < 0.25 * full
    method = build_method("vqt", tiny_vit(layer_scale=True, image_size=SIZE), CLASSES, {})
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE), torch.arange(BATCH) % CLASSES
    naive = measure_step(method.published_way(), images, labels, repeats=1, precision=precision).saved_bytes
    assert vqt < 0.25 * naive


def test_measure_names_a_naive_variant_only_where_a_method_has_one(tiny_backbone_dir):
    result = measure_method("vqt-naive", tiny_backbone_dir, batch_size=2, image_size=32, num_classes=3)
    vqt = measure_method("vqt", tiny_backbone_dir, batch_size=2, image_size=32, num_classes=3)
    assert result["method"] == "vqt-naive" and result["trainable_params"] == vqt["trainable_params"]
    assert result["adapter_bytes"] == vqt["adapter_bytes"] and result["saved_bytes"] > vqt["saved_bytes"]
    for name in ("linear-naive", "vqt+lora-naive"):
        with pytest.raises(ConfigError, match=rf"--method {re.escape(name)}: .* has no other, published way"):
            measure_method(name, tiny_backbone_dir, batch_size=2, image_size=32, num_classes=3)


def test_the_backbone_gets_no_gradient_where_it_is_frozen():
    method = build_method("synqt", tiny_vit(layer_scale=True), 3, {"num_queries": 2})
    measure_step(method, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]), repeats=1)
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


def test_meter_counts_each_storage_once_and_skips_parameters():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    meter = SavedTensorMeter(layer)
    with meter():
        y = layer(x)
        (y * y).sum()  # saves y twice (as both operands): counted once
    assert meter.bytes == x.numel() * 4 + y.numel() * 4


# A bench's process measuring a method's cost in a fresh process, as Bench.cost does; argv: a folder to put first on
# the child's PYTHONPATH, the backbone.
MEASURING_PARENT = """
import os, sys
os.environ["PYTHONPATH"] = os.pathsep.join([sys.argv[1], os.environ.get("PYTHONPATH", "")])
from querytune.measure import measure_method_isolated
measure_method_isolated("linear", sys.argv[2], batch_size=4, image_size=32, device="cpu")
"""


def process_state(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid from /proc (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, parent = stat.rsplit(")", 1)[1].split()[:2]  # after "pid (command name)"
    return state, int(parent)


def running(pid: int) -> bool:
    return (state := process_state(pid)) is not None and state[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_measuring_child_dies_with_the_process_that_started_it(tiny_backbone_dir, tmp_path):
    slow = tmp_path / "slow"
    slow.mkdir()  # its sitecustomize makes the child's start take a minute: a long measurement, under way
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", MEASURING_PARENT, slow, tiny_backbone_dir])
    measuring: list[int] = []
    deadline = time.monotonic() + 60
    while not measuring and time.monotonic() < deadline:
        measuring = [int(p.name) for p in Path("/proc").iterdir()
                     if p.name.isdigit() and (state := process_state(int(p.name))) and state[1] == parent.pid]
        time.sleep(0.05)
    parent.kill()  # kill -9: no handler of the parent runs
    parent.wait()
    (child,) = measuring
    try:
        deadline = time.monotonic() + 10
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child), "the measuring child outlived the process that started it"
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)
