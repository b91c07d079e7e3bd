"""SynQT: shapes, parameter count, frozen backbone, memory, and the naive reference."""

from __future__ import annotations

import pytest
import torch

from conftest import ROPE_FAMILIES, assert_matches_reference, tiny_rope, tiny_siglip, tiny_vit, train_a_few_steps
from querytune.backbones.vit import VisionTransformer, ViTConfig
from querytune.errors import ConfigError
from querytune.measure import SavedTensorMeter
from querytune.methods import build_method
from querytune.trunk.features import extract_features
from reference import naive_synqt_logits


def _synqt(backbone, num_classes: int = 5, **options):
    torch.manual_seed(1)
    return build_method("synqt", backbone, num_classes, options)


def test_shapes_and_head_tokens():
    backbone = tiny_vit(layer_scale=True)
    method = _synqt(backbone, num_queries=4).eval()
    features = extract_features(backbone, torch.randn(3, 3, 32, 32), dtype=torch.float32)
    assert method(features).shape == (3, 5)
    assert method.synthesis.seeds.shape == (3, 4, 48)
    assert method.synthesis(1, 3, torch.randn(3, 48)).shape == (3, 4, 48)
    assert method.head.combine.out_features == 3 * 3  # one weight per token after token 0
    assert 0.5 < method.synthesis.seeds.abs().max() <= 1.0  # U(-1, 1)
    torch.testing.assert_close(method.head.norm.weight, backbone.norm.weight)
    torch.testing.assert_close(method.head.norm.bias, backbone.norm.bias)
    assert method.head.norm.weight.requires_grad
    assert method.head.norm.weight.data_ptr() != backbone.norm.weight.data_ptr()


def test_parameter_count_of_vit_b_matches_the_paper():
    """ViT-B/16 (D = 768, L = 12), T = 1: 2,604,397 trainable parameters besides the classifier
    (the paper: about 2.6 M). Counted: everything trainable except the final linear classifier,
    i.e. seeds, per-layer adapters and QSM blocks, feat_scale, and the whole head up to and
    including its LayerNorm. Not counted: the classifier (D x classes + classes) and the two
    unused parameter sets of the official code (12 LayerNorms, 18,432; a 37-vector)."""
    D, L, T, a, q = 768, 12, 1, 48, 8
    adapter = lambda h: D * h + h + h * D + D  # noqa: E731  fc1 and fc2 with biases
    norm = 2 * D
    # q/k/v/out, q/kv norms, norm1, FFN, norm2, scales
    qsm_block = 4 * adapter(q) + 2 * norm + norm + adapter(a) + norm + 2
    synthesis = L * T * D + L * (adapter(a) + qsm_block) + 1  # seeds, adapter + QSM per layer, feat_scale
    head = norm + adapter(a) + (D * 3 * L + 3 * L) + norm  # token norm, shared adapter, combine linear, head norm
    assert synthesis + head == 2_604_397

    backbone = VisionTransformer(ViTConfig(embed_dim=768, depth=12, num_heads=12, patch_size=16, image_size=224))
    method = build_method("synqt", backbone.requires_grad_(False), 100)
    classifier = sum(p.numel() for p in method.head.classifier.parameters())
    assert classifier == 768 * 100 + 100
    assert method.num_trainable_params() - classifier == 2_604_397


def test_backbone_gets_no_gradient_and_original_tokens_unchanged():
    backbone = tiny_vit(layer_scale=True)
    method = _synqt(backbone, num_queries=2).train()
    images = torch.randn(2, 3, 32, 32)
    before = backbone.forward_features(images)
    method(extract_features(backbone, images, dtype=torch.float32)).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(before, backbone.forward_features(images))
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_saved_activations_grow_with_tokens_only_through_keys_and_values(num_queries):
    """Backward keeps, per layer, the normalised block input (B x N x D: the keys and values)
    and the query rows' attention probabilities (B x T x H x N); everything else it keeps
    is independent of the number of tokens N."""
    backbone = tiny_vit(layer_scale=True)
    method = _synqt(backbone, num_queries=num_queries).train()
    cfg = backbone.config
    batch = 2

    def saved_bytes(size: int) -> tuple[int, int]:
        features = extract_features(backbone, torch.randn(batch, 3, size, size), dtype=torch.float32)
        meter = SavedTensorMeter(method)
        with meter():
            method(features)
        tokens = cfg.num_tokens(size)
        contexts = cfg.depth * batch * tokens * cfg.embed_dim * 4
        probabilities = cfg.depth * batch * num_queries * cfg.num_heads * tokens * 4
        return meter.bytes, meter.bytes - contexts - probabilities

    small_total, small_rest = saved_bytes(32)
    large_total, large_rest = saved_bytes(64)
    assert large_total > small_total
    assert small_rest == large_rest


@pytest.mark.parametrize("layer_scale,registers", [(False, 0), (True, 0), (True, 2)])
@pytest.mark.parametrize("options", [{}, {"num_queries": 3, "attn_scale": 1.0, "feat_scale": 1.0}])
def test_fast_path_matches_naive_reference(layer_scale, registers, options):
    backbone = tiny_vit(layer_scale=layer_scale, num_reg_tokens=registers)
    method = _synqt(backbone, **options).eval()  # eval: dropout and DropPath off; gradients still flow
    images = torch.randn(4, 3, 32, 32)

    fast = method(extract_features(backbone, images, dtype=torch.float32))
    # The key adapter's output bias shifts every QSM key equally, which the softmax ignores: its
    # true gradient is 0 and autograd returns rounding noise, hence the floor.
    fast_grads = assert_matches_reference(method, fast, lambda: naive_synqt_logits(method, images), grad_floor=1e-3)
    assert fast_grads["synthesis.seeds"].abs().sum() > 0


def test_dropout_and_drop_path_only_in_training():
    backbone = tiny_vit()
    method = _synqt(backbone)
    features = extract_features(backbone, torch.randn(1, 3, 32, 32).expand(8, -1, -1, -1), dtype=torch.float32)
    logits = method.train()(features)
    assert not torch.allclose(logits[0], logits[1])
    logits = method.eval()(features)
    torch.testing.assert_close(logits[0], logits[1])


@pytest.mark.parametrize("bad", [{"num_queries": 0}, {"adapter_dim": 0}, {"qsm_dim": -1},
                                 {"attn_scale": float("nan")}, {"feat_scale": float("inf")}, {"combine": "mean"}])
def test_bad_options_are_named(bad):
    with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
        build_method("synqt", tiny_vit(), 5, bad)


def test_query_branches_take_the_backbones_drop_path_in_training(monkeypatch):
    """As the official forward_block: each block's drop-path (0 -> 0.1 over the blocks) drops the query
    rows' attention and MLP branches per sample, in training only."""
    from querytune.methods import synqt

    backbone = tiny_vit(layer_scale=True)
    block, rows = backbone.blocks[0], torch.randn(1, 2, 48).expand(64, -1, -1)
    context = torch.randn(1, 17, 48).expand(64, -1, -1)
    whole = block.forward_rows(rows, context)
    torch.manual_seed(0)
    dropped = synqt.rows_with_drop_path(block, rows, context, drop_path=0.5)
    kept = dropped.attn.flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 64  # some samples dropped, some kept
    torch.testing.assert_close(dropped.attn[kept], 2 * whole.attn[kept])  # the kept ones rescaled by 1 / (1 - p)
    assert dropped.attn[~kept].abs().max() == 0

    method = _synqt(backbone)
    method.head.drop_path = 0.0
    for module in method.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    features = extract_features(backbone, torch.randn(1, 3, 32, 32).expand(16, -1, -1, -1), dtype=torch.float32)
    torch.manual_seed(0)
    logits = method.train()(features)
    assert not all(torch.allclose(logits[0], row) for row in logits[1:])  # identical images, other draws
    monkeypatch.setattr(synqt, "QUERY_DROP_PATH", 0.0)
    torch.testing.assert_close(method.train()(features), method.eval()(features))  # nothing else random left


def test_on_a_backbone_without_class_token():
    """SigLIP-like: SynQT reads no class token (its head's tokens are its own rows' features); the rows
    path equals the naive sequence there and a few steps train."""
    backbone = tiny_siglip()
    method = _synqt(backbone, num_queries=2).eval()
    images = torch.randn(4, 3, 32, 32)
    features = extract_features(backbone, images, dtype=torch.float32)
    assert_matches_reference(method, method(features), lambda: naive_synqt_logits(method, images), grad_floor=1e-3)
    method.zero_grad()
    losses = train_a_few_steps(method, features, torch.tensor([0, 1, 2, 3]))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_fast_path_matches_naive_reference_with_rotary_positions(family):
    backbone = tiny_rope(family)
    method = _synqt(backbone, num_queries=2).eval()
    images = torch.randn(3, 3, 32, 32)
    fast = method(extract_features(backbone, images, dtype=torch.float32))
    # The projected keys sum in another order than the naive sequence's: the QSM scales' gradients (scalars
    # summed over every row) then differ by float32 rounding a little above 1e-3 of the largest gradient.
    assert_matches_reference(method, fast, lambda: naive_synqt_logits(method, images), grad_floor=1e-2)
