"""Training runs end to end on a tiny task: metrics, adapters, cache, resume, eval."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from querytune import eval_run, train_run
from querytune.data import Preprocess, open_split
from querytune.errors import CheckpointError, ConfigError, DataError, DivergedError
from querytune.settings import RunSpec, Runtime
from querytune.train import Schedule, TrainConfig
from querytune.trunk.cache import Building, CacheKey, FeatureCache, build_cache
from querytune.trunk.cache import entry as cache_entry
from querytune.trunk.features import Features
from querytune.trunk.precision import Precision

FAST = {"epochs": 3, "batch_size": 8, "lr": 0.05}


def _train(tiny_backbone_dir, tiny_task, out, method="linear", train=FAST, cache=None, compile="off", **spec):
    runtime = Runtime(workers=0, progress=False, cache=cache, compile=compile)
    return train_run(RunSpec(method=method, backbone=tiny_backbone_dir, data=tiny_task, image_size=32, **spec), out,
                     train, runtime)


def test_linear_run_writes_metrics_adapter_and_config(tiny_backbone_dir, tiny_task, tmp_path):
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "run")
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("method", "task", "backbone", "test_accuracy", "trainable_params", "train_seconds", "epochs"):
        assert key in saved
    assert saved == json.loads(json.dumps(metrics))
    assert saved["method"] == "linear" and saved["task"] == "tiny" and saved["epochs"] == 3
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert set(load_file(str(run / "adapter.safetensors"))) == {"head.weight", "head.bias"}
    assert saved["trainable_params"] == 48 * 3 + 3
    assert not (run / "checkpoint.pt").exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3
    assert eval_run(run, tiny_task, "test",
                    runtime=Runtime(workers=0, progress=False)) == pytest.approx(saved["test_accuracy"])


def test_linear_probe_learns_colours(tiny_backbone_dir, tiny_task, tmp_path):
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "run",
                     train={"epochs": 30, "batch_size": 6, "lr": 0.05})
    assert metrics["train_accuracy"] == 1.0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["vqt", "synqt"])
def test_cached_and_live_training_agree(tiny_backbone_dir, tiny_task, tmp_path, method, precision):
    options = {"num_queries": 2}
    settings = {**FAST, "precision": precision}
    live = _train(tiny_backbone_dir, tiny_task, tmp_path / "live", method=method, options=options,
                  train=settings)
    cached = _train(tiny_backbone_dir, tiny_task, tmp_path / "cached", method=method, options=options,
                    cache=tmp_path / "cache", train=settings)
    a = load_file(str(tmp_path / "live" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cached" / "adapter.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert live["test_accuracy"] == cached["test_accuracy"]


def test_features_reach_the_method_layer_major_in_the_compute_dtype():
    layers = torch.randn(3, 4, 5, 6).half()
    for dtype in (torch.float32, torch.bfloat16):
        features = Features(torch.randn(3, 6).half(), layers).to("cpu", dtype)
        assert features.pooled.dtype == torch.float32 and features.layers.dtype == dtype
        assert torch.equal(features.layers, layers.float().to(dtype))
        assert all(features.layers[:, layer].is_contiguous() for layer in range(4))


def test_interrupted_run_resumes_to_the_same_result(tiny_backbone_dir, tiny_task, tmp_path, monkeypatch):
    options = {"num_queries": 1}
    _train(tiny_backbone_dir, tiny_task, tmp_path / "whole", method="vqt", options=options)

    import querytune.train as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epochs_done"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "cut", method="vqt", options=options)
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "cut", method="vqt", options=options)
    assert metrics["resumed"]
    whole = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name


def test_finished_or_foreign_run_folder_is_never_overwritten(tiny_backbone_dir, tiny_task, tmp_path):
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "run")
    files = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()}
    # the very same run again (a retried job, a notebook cell run twice): a no-op that returns its metrics
    assert _train(tiny_backbone_dir, tiny_task, tmp_path / "run") == json.loads(json.dumps(metrics))
    with pytest.raises(CheckpointError, match=r"holds a finished run with other settings \(train.seed: 0 -> 1\)"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "run", train={**FAST, "seed": 1})
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()} == files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a querytune run folder"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "other")


def test_unfinished_run_with_other_settings_is_refused(tiny_backbone_dir, tiny_task, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _train(tiny_backbone_dir, tiny_task, tmp_path / "first")
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    config["train"]["lr"] = 123.0
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="other settings"):
        _train(tiny_backbone_dir, tiny_task, run)


def test_eval_rejects_more_classes_than_the_adapter(tiny_backbone_dir, tiny_task, tmp_path):
    from conftest import write_task

    _train(tiny_backbone_dir, tiny_task, tmp_path / "run")
    wider = write_task(tmp_path / "wider", classes=5)
    with pytest.raises(CheckpointError, match="3 classes"):
        eval_run(tmp_path / "run", wider, "test", runtime=Runtime(workers=0, progress=False))


def test_unknown_method_option_and_setting(tiny_backbone_dir, tiny_task, tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "a", method="nope")
    with pytest.raises(ConfigError, match="--num-queries does not apply to method 'linear'"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "b", options={"num_queries": 2})
    with pytest.raises(ConfigError, match="optimizer"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "c", train={"optimizer": "lbfgs"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_cache_is_keyed_and_half_written_entries_are_rebuilt(tiny_task, tmp_path):
    from conftest import tiny_vit

    backbone = tiny_vit()
    images = open_split(tiny_task, "test")
    preprocess = Preprocess(32, backbone.config.mean, backbone.config.std)
    key = CacheKey(backbone, images, preprocess)
    path = build_cache(tmp_path / "c", key, Building(shard_size=4, show_progress=False))
    cache = FeatureCache.open(path)
    assert len(cache) == 9 and len(cache.layers) == 3
    assert cache.features([8, 0]).layers.shape == (2, 3, 1 + 16, 48)
    np.testing.assert_array_equal(cache.labels, [label for _, label in images.items])

    # another backbone or preprocessing -> another entry
    assert CacheKey(tiny_vit(seed=1), images, preprocess).folder(tmp_path / "c") != path
    assert CacheKey(backbone, images, Preprocess(40, preprocess.mean, preprocess.std)).folder(tmp_path / "c") != path

    # a torn build: meta missing, one shard gone, a temporary file of a killed builder left behind
    good = cache.features(np.arange(9))
    (path / "meta.json").unlink()
    (path / "shard-00001.cls.npy").unlink()
    killed = subprocess.Popen(["true"])
    killed.wait()
    (path / f"shard-00001.layers.npy.{socket.gethostname()}.{killed.pid}.tmp").write_bytes(b"partial")
    with pytest.raises(DataError, match="not a complete feature cache"):
        FeatureCache.open(path)
    rebuilt = FeatureCache.open(build_cache(tmp_path / "c", key, Building(shard_size=4, show_progress=False)))
    assert not list(path.glob("*.tmp"))
    assert torch.equal(rebuilt.features(np.arange(9)).layers, good.layers)


def test_a_non_finite_loss_stops_the_run_naming_the_epoch_and_the_cache_entry(tiny_backbone_dir, tiny_task, tmp_path,
                                                                              monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setattr(cache_entry, "sampled_checksum", lambda file: "")  # a change that no cheap check sees:
    _train(tiny_backbone_dir, tiny_task, tmp_path / "a", cache=root)
    (entry,) = root.iterdir()
    for shard in entry.glob("shard-*.cls.npy"):  # NaN features, the modification time put back
        modified, header = shard.stat().st_mtime_ns, np.load(shard, mmap_mode="r").offset
        data = shard.read_bytes()
        shard.write_bytes(data[:header] + b"\xff" * (len(data) - header))
        os.utime(shard, ns=(modified, modified))

    with pytest.raises(DivergedError, match=rf"^{tmp_path / 'b'}: epoch 1: the training loss is nan; if the cached "
                                            rf"features are corrupt, remove their entry and train again: querytune "
                                            rf"cache rm {entry.name} --cache {root}; else lower --lr$"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "b", cache=root)
    assert not (tmp_path / "b").exists()


def test_a_diverging_run_stops_before_its_checkpoint_or_log_takes_the_epoch(tiny_backbone_dir, tiny_task, tmp_path,
                                                                            monkeypatch):
    import querytune.train as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    run, diverging = tmp_path / "run", {**FAST, "lr": 1e20}  # finite over epoch 1, NaN in epoch 2
    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_backbone_dir, tiny_task, run, train=diverging)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    with pytest.raises(DivergedError, match=rf"^{run}: epoch 2: the training loss is nan; lower --lr or set "
                                            r"--grad-clip$"):
        _train(tiny_backbone_dir, tiny_task, run, train=diverging)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epochs_done"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]
    assert not (run / "adapter.safetensors").exists() and not (run / "metrics.json").exists()


def test_warm_up_is_the_protocols_unless_the_run_is_cut_short():
    from querytune.methods.synqt import SynQT

    assert TrainConfig.for_method(SynQT, {}).warmup_epochs == 10  # 10 of its 50 epochs, as published
    assert TrainConfig.for_method(SynQT, {"epochs": 60}).warmup_epochs == 10
    assert TrainConfig.for_method(SynQT, {"epochs": 20}).warmup_epochs == 2  # a tenth of a shortened run
    assert TrainConfig.for_method(SynQT, {"epochs": 20, "warmup_epochs": 5}).warmup_epochs == 5


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(epochs=10, lr=1.0, min_lr=0.0, warmup_epochs=1)
    schedule = Schedule(steps_per_epoch=10, total_steps=100, warmup_steps=10)
    lrs = [schedule.lr(step, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_vqt_head_compression_keeps_a_fraction_and_reloads(tiny_backbone_dir, tiny_task, tmp_path):
    from querytune import load_run
    from querytune.methods.vqt import naive_vqt_logits
    from querytune.trunk.features import extract_features

    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "run", method="vqt", options={"compress": 0.5})
    total = 48 + 3 * 48  # class token + one query per layer (D = 48, 3 layers)
    assert metrics["total_features"] == total and metrics["kept_features"] == total // 2
    assert metrics["head_params_before"] == total * 3 + 3 and metrics["head_params_after"] == total // 2 * 3 + 3
    state = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert state["head.weight"].shape == (3, total // 2) and state["kept_features"].shape == (total // 2,)
    method, _ = load_run(tmp_path / "run")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(method(extract_features(method.backbone, images, dtype=torch.float32)),
                               naive_vqt_logits(method, images), rtol=1e-5, atol=1e-5)
    assert eval_run(tmp_path / "run", tiny_task, "test", runtime=Runtime(workers=0, progress=False)) == pytest.approx(
        metrics["test_accuracy"])


def test_vqt_head_is_initialised_as_the_official_code_does():
    from conftest import tiny_vit
    from querytune.methods import build_method

    torch.manual_seed(0)
    head = build_method("vqt", tiny_vit(), 8).head  # 192 inputs, 8 classes
    assert torch.equal(head.bias, torch.full((8,), -math.log(99.0)))  # -4.595: a 1 % prior per class
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 8), rel=0.1)  # kaiming normal over the fan-out


class FeatureSource:
    """Fixed features of a few images, as a BatchSource."""

    def __init__(self, features: Features, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order, batch_size):
        for start in range(0, len(order), batch_size):
            index = torch.as_tensor(order[start : start + batch_size])
            features = Features(self.features.pooled[index], self.features.layers[index])
            yield features, torch.as_tensor(self.labels[index])


@pytest.mark.parametrize("run_settings", [{}, {"grad_clip": 1e-3, "label_smoothing": 0.2}])
def test_compression_stages_match_an_independent_reference_of_the_official_procedure(run_settings):
    """Stage 1: a fresh (official-init) head trained with group lasso; the top int(D * keep) columns by
    L2 norm kept; stage 2: another fresh head on them. Adam at half the lr, weight decay on the weight
    only, warm-up + cosine per step; the queries frozen (their head inputs recomputed every step). The
    run's clipping and label smoothing do not reach the heads."""
    from conftest import tiny_vit
    from querytune.methods import build_method
    from querytune.methods.vqt import compress_head
    from querytune.trunk.features import extract_features

    torch.manual_seed(0)
    method = build_method("vqt", tiny_vit(), 3, {"query_dropout": 0.0, "compress": 0.3})
    images, labels = torch.randn(10, 3, 32, 32), torch.tensor([0, 1, 2] * 3 + [0])
    features = extract_features(method.backbone, images, dtype=torch.float32)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.2, weight_decay=1e-3, warmup_epochs=1, seed=5, **run_settings)
    queries_before = method.query_path.queries.detach().clone()
    compress_head(method, FeatureSource(features, labels), cfg, torch.device("cpu"))

    with torch.no_grad():
        x_all = method.head_input(features)  # dropout 0: the same head inputs in every step
    generator = torch.Generator().manual_seed(5)

    def reference_stage(columns, lasso):
        weight = torch.empty(3, len(columns)).normal_(0, math.sqrt(2 / 3), generator=generator).requires_grad_()
        bias = torch.full((3,), -math.log(99.0)).requires_grad_()
        optimizer = torch.optim.Adam([{"params": [weight], "weight_decay": 1e-3},
                                      {"params": [bias], "weight_decay": 0.0}], lr=0.1)
        steps, warmup = 3 * 3, 3  # 10 images in batches of 4: 3 steps an epoch; one warm-up epoch
        for epoch in range(3):
            order = np.random.default_rng([5, epoch]).permutation(10)
            for b, start in enumerate(range(0, 10, 4)):
                step = epoch * 3 + b
                if step < warmup:
                    lr = 0.1 * (step + 1) / warmup
                else:
                    lr = 1e-6 + 0.5 * (0.1 - 1e-6) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
                optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
                index = torch.as_tensor(order[start : start + 4])
                logits = x_all[index][:, columns] @ weight.T + bias
                loss = torch.nn.functional.cross_entropy(logits, labels[index]) + lasso * weight.norm(dim=0).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return weight.detach(), bias.detach()

    all_columns = torch.arange(x_all.shape[1])
    stage1, _ = reference_stage(all_columns, 1e-4)
    kept = stage1.norm(dim=0).topk(int(0.3 * x_all.shape[1])).indices.sort().values
    weight, bias = reference_stage(kept, 0.0)
    assert torch.equal(method.kept_features, kept)
    torch.testing.assert_close(method.head.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.head.bias, bias, rtol=1e-5, atol=1e-6)
    assert torch.equal(method.query_path.queries, queries_before)  # the query tokens stay as trained


def test_cache_placement_device_gathers_what_the_memory_map_gives(tiny_task, tmp_path):
    """``device`` placement (GPU memory on a GPU, RAM on a CPU) yields the batches the memory map does."""
    from conftest import tiny_vit
    from querytune.trunk.sources import CachedFeatureBatches

    images = open_split(tiny_task, "train800val200")
    key = CacheKey(tiny_vit(), images, Preprocess(32, (0.5,) * 3, (0.5,) * 3))
    cache = FeatureCache.open(build_cache(tmp_path, key, Building(shard_size=5, show_progress=False)))
    order = np.random.default_rng(0).permutation(len(cache))
    for precision in (Precision.FP32, Precision.BF16):
        mapped = CachedFeatureBatches(cache, True, precision)
        resident = CachedFeatureBatches(cache, True, precision, placement="device")
        assert (mapped.placement, resident.placement) == ("host", "device")
        for (a, labels_a), (b, labels_b) in zip(mapped.batches(order, 4), resident.batches(order, 4), strict=True):
            assert torch.equal(a.pooled, b.pooled) and torch.equal(a.layers, b.layers)
            assert torch.equal(labels_a, labels_b)
            assert b.layers.dtype == (torch.bfloat16 if precision is Precision.BF16 else torch.float32)
            assert b.layers[:, 1].is_contiguous()  # layer-major, as the rows' batched matmuls read it
    with pytest.raises(ConfigError, match=r"--cache-placement must be one of auto, device, host \(got 'gpu'\)"):
        Runtime(cache_placement="gpu")


@pytest.mark.parametrize("method", ["full", "vpt", "vqt+lora"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    from conftest import tiny_vit
    from querytune.methods import build_method

    images = torch.randn(3, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_method(method, tiny_vit(layer_scale=True), 4).eval()
        model.backbone.set_grad_checkpointing(checkpointing)
        model(images).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_is_refused_for_frozen_trunk_methods(tiny_backbone_dir, tiny_task, tmp_path):
    with pytest.raises(ConfigError, match="--checkpointing: method 'vqt' does not backpropagate"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "run", method="vqt",
               train={**FAST, "checkpointing": True})
    assert not (tmp_path / "run").exists()
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "full", method="full",
                     train={**FAST, "checkpointing": True})
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["checkpointing"] is True
    assert metrics["feature_placement"] is None  # images, not cached features


def test_fp16_training_scales_its_loss_and_resumes_exactly(tiny_backbone_dir, tiny_task, tmp_path, monkeypatch):
    """float16 autocast with a gradient scaler (GPUs without bfloat16; CPU autocast runs it too): the
    run ends with a finite loss, its checkpoint keeps the loss scale, and a resumed run ends at the
    same adapter."""
    import math

    import querytune.train as train_module

    settings = {**FAST, "epochs": 4, "precision": "fp16"}
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "whole", method="vqt", train=settings)
    assert math.isfinite(metrics["train_loss"])  # no overflow reached the weights
    real_save = train_module.save_checkpoint
    saved = {}

    def save_then_die(path, state):
        real_save(path, state)
        saved.update(state)
        if state["epochs_done"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "cut", method="vqt", train=settings)
    assert saved["scaler"]["scale"] > 1  # the loss was scaled up, and the scale is kept for resuming
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert _train(tiny_backbone_dir, tiny_task, tmp_path / "cut", method="vqt", train=settings)["resumed"]
    whole = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name


def test_compiled_training_computes_what_eager_training_does(tiny_backbone_dir, tiny_task, tmp_path):
    """``--compile``: the same adapter as an eager run (no dropout, so both draw nothing at random),
    over epochs whose last batch is short (a second shape for the compiled step)."""
    from torch._dynamo.utils import counters

    counters.clear()
    options = {"num_queries": 2, "query_dropout": 0.0}
    runs = {mode: _train(tiny_backbone_dir, tiny_task, tmp_path / mode, method="vqt", options=options,
                         cache=tmp_path / "cache", train={**FAST, "epochs": 2}, compile=mode)
            for mode in ("off", "default")}
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run did go through dynamo
    assert runs["default"]["compile"] == "default" and runs["off"]["compile"] == "off"
    eager, compiled = (load_file(str(tmp_path / mode / "adapter.safetensors")) for mode in ("off", "default"))
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)
    assert runs["default"]["test_accuracy"] == runs["off"]["test_accuracy"]


def test_an_unknown_compile_mode_is_refused_before_anything_is_written(tiny_backbone_dir, tiny_task, tmp_path):
    with pytest.raises(ConfigError, match=r"--compile must be one of off, default, .* \(got 'fast'\)"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "run", compile="fast")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16"),
                                                 ({"amx_bf16", "amx_tile"}, "bf16")])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(flags, expected, tiny_backbone_dir, tiny_task,
                                                                   tmp_path, monkeypatch, capsys):
    import querytune.trunk.precision as precision_module

    monkeypatch.delenv("QUERYTUNE_PRECISION")
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: flags)
    runtime = Runtime(workers=0, progress=True, device="cpu")
    train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32), tmp_path / "run",
              {"epochs": 1}, runtime)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == expected
    assert f"precision {expected} (auto: " in capsys.readouterr().err  # the choice is said and recorded


def test_a_given_precision_is_kept_and_a_wrong_one_named(monkeypatch):
    from querytune.trunk.precision import resolve_precision

    assert resolve_precision("fp16", torch.device("cpu"))[0] == Precision.FP16
    assert resolve_precision("auto", torch.device("cpu"))[0] == Precision.FP32  # $QUERYTUNE_PRECISION, set by conftest
    monkeypatch.setenv("QUERYTUNE_PRECISION", "half")
    with pytest.raises(ConfigError, match=r"\$QUERYTUNE_PRECISION must be one of fp32, bf16, fp16 \(got 'half'\)"):
        resolve_precision("auto", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--precision must be one of auto, fp32, bf16, fp16"):
        TrainConfig(precision="fp64")
