"""DTL and DTL+: the side network against an independent writing of the official forward, the
initial model, what trains, the options, and which blocks the backward reaches."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vit, write_task
from querytune import eval_run, load_run, train_run
from querytune.backbones import save_backbone
from querytune.errors import ConfigError
from querytune.export import export_runs
from querytune.measure import SavedTensorMeter, measure_step
from querytune.methods import build_method
from querytune.settings import RunSpec, Runtime
from reference import naive_dtl_logits

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _images(batch: int = 3, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _randomised(method):
    """B (zero at initialisation) and the fusion off their initial values, so that the side network matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        method.side.lora_b.normal_(std=0.3)
        if method.side.lora_fusion is not None:
            method.side.lora_fusion.weight.normal_(std=0.5)
    return method


@pytest.mark.parametrize("name,options", [("dtl", {}), ("dtl+", {}), ("dtl+", {"fusion_size": 4}),
                                          ("dtl", {"add_from_block": 0}), ("dtl+", {"add_from_block": 2})])
@pytest.mark.parametrize("registers", [0, 1])
def test_logits_equal_the_official_forward(name, options, registers):
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=registers)
    method = _randomised(build_method(name, backbone, 5, options)).eval()
    images = _images()
    with torch.no_grad():
        expected = naive_dtl_logits(method, images)
        plain = method.head(backbone.norm(backbone.run_blocks(backbone.embed(images))[:, 1 + registers :].mean(1)))
        torch.testing.assert_close(method(images), expected, **TOLERANCE)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the side network changes the logits


def test_dtl_plus_fuses_on_the_input_grid():
    """A 24 x 40 input: a 3 x 5 patch grid, not the pretrained 4 x 4."""
    backbone = tiny_vit(num_reg_tokens=1)
    method = _randomised(build_method("dtl+", backbone, 5)).eval()
    images = _images(2, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(method(images), naive_dtl_logits(method, images), **TOLERANCE)


@pytest.mark.parametrize("name", ["dtl", "dtl+"])
def test_a_new_model_reads_the_backbones_pooled_patch_tokens(name):
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    method = build_method(name, backbone, 5).eval()
    images = _images()
    with torch.no_grad():
        pooled = backbone.norm(backbone.run_blocks(backbone.embed(images))[:, 2:].mean(1))
        torch.testing.assert_close(method(images), method.head(pooled))


@pytest.mark.parametrize("name,fusion", [("dtl", 0), ("dtl+", 3)])
def test_what_trains(name, fusion):
    method = build_method(name, tiny_vit(), 5, {})
    assert method.options.fusion_size == fusion and method.options.dtl_rank == 2
    assert method.options.swish_beta == 100.0 and method.side.first == 1  # depth 3: add-backs after blocks 1, 2
    trainable = {n: tuple(p.shape) for n, p in method.named_parameters() if p.requires_grad}
    expected = {"side.lora_a": (3, 2, 48), "side.lora_b": (3, 48, 2), "head.weight": (5, 48), "head.bias": (5,)}
    if fusion:
        expected["side.lora_fusion.weight"] = (48, 1, 3, 3)
    assert trainable == expected
    assert method.num_trainable_params() == 2 * 3 * 2 * 48 + 5 * 49 + (48 * 9 if fusion else 0)
    assert not method.reads.frozen and method.decay_vectors is False and method.not_mergeable
    assert method.train_defaults["weight_decay"] == 0.05 and method.train_defaults["batch_size"] == 32
    assert set(method.trainable_state_dict()) == set(expected)


@pytest.mark.parametrize("options,flag", [({"add_from_block": 3}, "--add-from-block"),
                                          ({"dtl_rank": 49}, "--dtl-rank"), ({"fusion_size": 8}, "--fusion-size")])
def test_options_the_backbone_cannot_take_are_refused(options, flag):
    with pytest.raises(ConfigError, match=flag):
        build_method("dtl+", tiny_vit(), 5, options)


def test_the_frozen_backbone_gets_no_gradient():
    backbone = tiny_vit(layer_scale=True)
    method = _randomised(build_method("dtl+", backbone, 5)).train()
    method(_images()).square().sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters() if p.requires_grad)


def _saved_bytes(add_from: int) -> int:
    method = _randomised(build_method("dtl", tiny_vit(depth=4), 5, {"add_from_block": add_from})).train()
    meter = SavedTensorMeter(method)
    with meter():
        method(_images(4))
    return meter.bytes


def test_only_blocks_after_the_first_add_back_keep_activations():
    """Adding back after the last block alone keeps no block's activations, only the maps' inputs."""
    late, default = _saved_bytes(3), _saved_bytes(2)
    tokens, dim = 17, 48
    assert late < default
    assert default - late >= 4 * tokens * dim * 4  # block 3 keeps at least one float32 (B, N, D) activation


@pytest.mark.parametrize("name", ["dtl", "dtl+"])
def test_measure_step_works(name):
    method = build_method(name, tiny_vit(layer_scale=True), 5, {})
    cost = measure_step(method, _images(4), torch.tensor([0, 1, 2, 3]), repeats=1)
    assert cost.saved_bytes > 0 and cost.step_seconds > 0


@pytest.mark.parametrize("name", ["dtl", "dtl+"])
def test_train_then_eval_reproduces_the_accuracy(name, tiny_backbone_dir, tiny_task, tmp_path):
    run = tmp_path / "run"
    metrics = train_run(RunSpec(method=name, backbone=tiny_backbone_dir, data=tiny_task, image_size=32), run,
                        train={"epochs": 2, "batch_size": 8}, runtime=Runtime(workers=0, progress=False))
    adapter = load_file(str(run / "adapter.safetensors"))
    assert {"side.lora_a", "side.lora_b", "head.weight"} <= set(adapter)
    assert ("side.lora_fusion.weight" in adapter) == (name == "dtl+")
    assert json.loads((run / "config.json").read_text())["method"] == name
    assert eval_run(run, tiny_task, "test",
                    runtime=Runtime(workers=0, progress=False)) == pytest.approx(metrics["test_accuracy"])


def test_an_onnx_export_gives_the_runs_logits(tmp_path):
    """Not mergeable (a nonlinear branch), so ONNX: the fusion on a 5 x 5 grid with a register token."""
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    save_backbone(tiny_vit(layer_scale=True, num_reg_tokens=1), tmp_path / "tiny.safetensors")
    run = tmp_path / "run"
    train_run(RunSpec(method="dtl+", backbone=tmp_path / "tiny.safetensors", data=write_task(tmp_path / "task"),
                      image_size=40), run, train={"epochs": 2, "batch_size": 8},
              runtime=Runtime(workers=0, progress=False))
    with pytest.raises(ConfigError, match="nonlinear branch"):
        export_runs([run], "merged", tmp_path / "merged")
    export_runs([run], "onnx", tmp_path / "onnx")
    method, _ = load_run(run)
    batch = _images(4, 40, 40)
    with torch.no_grad():
        expected = method(batch)
    session = onnxruntime.InferenceSession(tmp_path / "onnx" / "model.onnx")
    answer = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    torch.testing.assert_close(answer, expected, rtol=1e-4, atol=1e-4)
