"""The CUDA path: every method computes on the GPU what it computes on the CPU (where the naive
references check it), cached features train alike wherever they live, and a bf16 run works end
to end. Skipped, saying so, where no GPU is present (``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vit
from querytune import train_run
from querytune.data import Preprocess, open_split
from querytune.measure import measure_method
from querytune.methods import METHODS, build_method, synqt
from querytune.settings import RunSpec, Runtime
from querytune.train import Member, TrainConfig, fit
from querytune.trunk.cache import Building, CacheKey, FeatureCache, build_cache
from querytune.trunk.features import extract_features
from querytune.trunk.sources import CachedFeatureBatches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
CUDA = torch.device("cuda")


def deterministic_train_mode(method: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """Train mode (every trainable parameter is reached: eval merges LoRA's weights) without random draws,
    which differ between the CPU's and the GPU's generators."""
    for module in method.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, synqt.SynQTHead):
            module.drop_path = 0.0
    return method.train()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_on_cuda_equals_cpu(name, monkeypatch):
    torch.manual_seed(0)
    method = deterministic_train_mode(build_method(name, tiny_vit(layer_scale=True), 5), monkeypatch)
    images = torch.randn(3, 3, 32, 32)
    results = []
    for device in (torch.device("cpu"), CUDA):
        module = copy.deepcopy(method).to(device)
        inputs = images.to(device)
        if method.reads.frozen:
            inputs = extract_features(module.backbone, inputs, method.reads.with_layers, torch.float32)
        logits = module(inputs)
        logits.square().sum().backward()
        grads = {n: p.grad.cpu() for n, p in module.named_parameters() if p.requires_grad}
        results.append((logits.detach().cpu(), grads))
    (cpu_logits, cpu_grads), (cuda_logits, cuda_grads) = results
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    assert cuda_grads.keys() == cpu_grads.keys()
    for param, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[param], grad, rtol=1e-3, atol=1e-4, msg=param)


def test_cached_features_train_alike_in_gpu_memory_streamed_and_on_cpu(tiny_task, tmp_path):
    backbone = tiny_vit()
    images = open_split(tiny_task, "train800val200")
    cache = FeatureCache.open(build_cache(tmp_path, CacheKey(backbone, images, Preprocess(32, (0.5,) * 3, (0.5,) * 3)),
                                          Building(show_progress=False)))
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0)
    adapters = {}
    for device, placement in (("cpu", "host"), (CUDA, "device"), (CUDA, "host")):
        torch.manual_seed(0)
        method = build_method("vqt", backbone, images.num_classes, {"query_dropout": 0.0})
        source = CachedFeatureBatches(cache, True, device=device, placement=placement)
        assert source.placement == placement
        fit([Member(cfg, method)], source, torch.device(device), show_progress=False)
        adapters[(str(device), placement)] = {k: v.cpu() for k, v in method.trainable_state_dict().items()}
    reference = adapters[("cpu", "host")]
    for key, adapter in adapters.items():
        for name, value in reference.items():
            torch.testing.assert_close(adapter[name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


def test_bf16_run_on_cuda_end_to_end(tiny_backbone_dir, tiny_task, tmp_path):
    metrics = train_run(RunSpec(method="vqt", backbone=tiny_backbone_dir, data=tiny_task, image_size=32),
                        tmp_path / "run", train={"epochs": 3, "batch_size": 8, "precision": "bf16"},
                        runtime=Runtime(workers=2, cache=tmp_path / "cache", progress=False))
    assert metrics["device"].startswith("cuda") and metrics["feature_placement"] == "device"
    assert set(load_file(str(tmp_path / "run" / "adapter.safetensors"))) >= {"head.weight", "query_path.queries"}


def test_measured_peaks_leave_out_memory_held_before(tiny_backbone_dir):
    """Measured in-process on a GPU: memory that others hold is not the measured step's."""
    first = measure_method("vqt", tiny_backbone_dir, batch_size=4, image_size=32, device="cuda")
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device=CUDA)
    second = measure_method("vqt", tiny_backbone_dir, batch_size=4, image_size=32, device="cuda")
    del held
    assert second["saved_bytes"] == first["saved_bytes"]
    for key in ("train_peak_bytes", "inference_peak_bytes"):
        assert abs(second[key] - first[key]) < 2**20, key  # not the 64 MiB held in between
