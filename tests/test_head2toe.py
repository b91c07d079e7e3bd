"""Head2Toe against an independent reference of the official formulation (google-research/head2toe)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_siglip, tiny_vit, train_a_few_steps
from querytune import eval_run, train_run
from querytune.measure import measure_step
from querytune.methods import build_method
from querytune.settings import RunSpec, Runtime
from querytune.trunk.features import extract_features


def official_features(backbone, images: torch.Tensor, target_size: int) -> list[torch.Tensor]:
    """The official groups, each at unit norm: the final feature (the final class token; on a backbone without
    one, such as SigLIP, its pooled feature), then every block's normalised input
    pooled as ``flatten_and_concat`` does (Keras AveragePooling1D: windows of int(N / (T / D)) tokens,
    stride the window, the trailing tokens left out; the mean where D >= T)."""
    x = backbone.embed(images)
    blocks = []
    for block in backbone.blocks:
        blocks.append(block.norm1(x))
        x = block(x)
    groups = [backbone.norm(x[:, 0]) if backbone.cls_token is not None else backbone.pool(x)]
    for u in blocks:
        count, dim = u.shape[1:]
        if dim >= target_size:
            groups.append(u.mean(1))
            continue
        window = int(count / (target_size / dim))
        groups.append(F.avg_pool1d(u.transpose(1, 2), window, window).transpose(1, 2).flatten(1))
    return groups


def unit(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms == 0, torch.zeros_like(x), x / norms)


@pytest.mark.parametrize("target_size", [0, 48, 96, 144])
def test_head_input_matches_the_official_pooling(target_size):
    """With one register the tiny ViT has 18 tokens, so 2 or 3 windows cover them exactly: the official
    windows and querytune's are the same there."""
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    method = build_method("head2toe", backbone, 5, {"target_size": target_size})
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = torch.cat([unit(g) for g in official_features(backbone, images, target_size)], dim=1)
    features = extract_features(backbone, images, dtype=torch.float32)
    ours = method.head_input(method.groups(features))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert method.head.in_features == reference.shape[1]


def test_on_a_backbone_without_class_token_it_pools_the_patches():
    """SigLIP-like: the final group is the MAP head's pooled feature, the layers' windows pool the 16 patch
    tokens (no prefix token); a few steps train."""
    backbone = tiny_siglip()
    method = build_method("head2toe", backbone, 4, {"target_size": 96})
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = torch.cat([unit(g) for g in official_features(backbone, images, 96)], dim=1)
    features = extract_features(backbone, images, dtype=torch.float32)
    torch.testing.assert_close(method.head_input(method.groups(features)), reference, rtol=1e-4, atol=1e-5)
    losses = train_a_few_steps(method, features, torch.tensor([0, 1, 2, 3]))
    assert losses[-1] < losses[0]


def test_the_head_size_does_not_depend_on_the_input_size():
    method = build_method("head2toe", tiny_vit(), 5, {"target_size": 96})
    for size in (32, 48):
        features = extract_features(method.backbone, torch.randn(2, 3, size, size), dtype=torch.float32)
        assert method(features).shape == (2, 5)


def test_selection_keeps_the_top_squared_weights_and_renormalises_each_group():
    """connectivity_l2: score = sum over classes of the squared weights; the top int(F * keep) kept; each
    group's kept features scaled to unit norm anew (``_process_embeddings`` gathers, then normalises)."""
    backbone = tiny_vit(num_reg_tokens=1)  # 18 tokens: 2 windows of 9, as the official ones
    method = build_method("head2toe", backbone, 5, {"target_size": 96, "keep_fraction": 0.1})
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    groups = official_features(backbone, images, 96)
    weight = torch.randn(5, method.head.in_features, generator=torch.Generator().manual_seed(2))
    kept_count = int(weight.shape[1] * 0.1)
    kept = weight.pow(2).sum(0).topk(kept_count).indices.sort().values
    pieces, start = [], 0
    for group in groups:
        local = [int(i) - start for i in kept if start <= i < start + group.shape[1]]
        if local:
            pieces.append(unit(group[:, local]))
        start += group.shape[1]
    reference = torch.cat(pieces, dim=1)

    method.keep_features(kept)
    ours = method.head_input(method.groups(extract_features(backbone, images, dtype=torch.float32)))
    assert ours.shape == (4, kept_count)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_the_ranking_head_carries_the_group_lasso_and_the_final_head_none():
    """GroupLRP(r=2, p=1): coef * the sum over input features of the L2 norm of their weights over classes."""
    method = build_method("head2toe", tiny_vit(), 5, {"group_lasso": 1e-3})
    weight = method.head.weight
    expected = 1e-3 * torch.sqrt((weight**2).sum(0)).sum()
    torch.testing.assert_close(method.loss_penalty(), expected)
    assert build_method("head2toe", tiny_vit(), 5, {"group_lasso": 0.0}).loss_penalty() is None
    method.keep_features(torch.arange(10))
    assert method.loss_penalty() is None


def test_the_heads_start_as_keras_dense():
    method = build_method("head2toe", tiny_vit(), 5, {})
    fan_in, fan_out = method.head.in_features, 5
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert method.head.weight.abs().max() <= bound and method.head.weight.std() > bound / 3
    assert torch.equal(method.head.bias, torch.zeros(5))


def test_grid_members_share_the_pooled_features_and_equal_their_lone_forward():
    backbone = tiny_vit()
    members = [build_method("head2toe", backbone, 5, {"target_size": 96}) for _ in range(3)]
    features = extract_features(backbone, torch.randn(3, 3, 32, 32), dtype=torch.float32)
    stacked = type(members[0]).forward_members(members, features, lambda k: torch.no_grad())
    for member, logits in zip(members, stacked):
        torch.testing.assert_close(logits, member(features))


def test_a_training_step_keeps_only_the_head_input_for_backward():
    method = build_method("head2toe", tiny_vit(), 5, {})
    cost = measure_step(method, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), repeats=1)
    head_input = 4 * method.head.in_features * 4  # (B, F) float32
    assert head_input <= cost.saved_bytes < head_input + 1024  # and the loss's logits and labels: nothing of the trunk


def test_train_selects_the_features_and_eval_reproduces_the_accuracy(tiny_backbone_dir, tiny_task, tmp_path):
    run = tmp_path / "run"
    metrics = train_run(RunSpec(method="head2toe", backbone=tiny_backbone_dir, data=tiny_task, image_size=32,
                                options={"target_size": 96, "keep_fraction": 0.25}),
                        run, train={"epochs": 3, "batch_size": 4}, runtime=Runtime(workers=0, progress=False))
    total = 48 * (1 + 3 * 2)  # the class token and 3 blocks of 2 windows, 48 wide
    assert metrics["total_features"] == total and metrics["kept_features"] == int(total * 0.25)
    adapter = load_file(str(run / "adapter.safetensors"))
    assert adapter["head.weight"].shape == (3, int(total * 0.25)) and len(adapter["kept_features"]) == int(total * 0.25)
    assert json.loads((run / "config.json").read_text())["method"] == "head2toe"
    assert eval_run(run, tiny_task, "test", runtime=Runtime(workers=0, progress=False)) == \
        pytest.approx(metrics["test_accuracy"])


def test_the_training_loop_adds_the_group_lasso():
    """A strong penalty shrinks the ranking head's weight columns far below an unpenalised head's."""
    from querytune.train import Member, TrainConfig, fit
    from querytune.trunk.features import Features

    backbone = tiny_vit()
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    features = extract_features(backbone, images, dtype=torch.float32)

    class Source:
        def __init__(self) -> None:
            self.labels = labels.numpy()

        def __len__(self) -> int:
            return 12

        def batches(self, order, batch_size):
            for start in range(0, len(order), batch_size):
                index = torch.as_tensor(order[start : start + batch_size])
                yield Features(features.pooled[index], features.layers[index]), labels[index]

    norms = {}
    for lasso in (0.0, 1.0):
        torch.manual_seed(0)
        method = build_method("head2toe", backbone, 3, {"group_lasso": lasso})
        fit([Member(TrainConfig.for_method(type(method), {"epochs": 5, "batch_size": 4}), method)], Source(),
            torch.device("cpu"), show_progress=False)
        norms[lasso] = method.head.weight.norm(dim=0).sum()
    assert norms[1.0] < norms[0.0] / 3
