"""VQT: the efficient path equals the naive concatenate-and-mask formulation."""

from __future__ import annotations

import pytest
import torch

from conftest import ROPE_FAMILIES, assert_matches_reference, tiny_rope, tiny_siglip, tiny_vit, train_a_few_steps
from querytune.backbones import vit
from querytune.methods import build_method
from querytune.methods.vqt import naive_vqt_logits
from querytune.trunk.features import extract_features


def _vqt(backbone, **options):
    torch.manual_seed(1)
    method = build_method("vqt", backbone, num_classes=5, options=options)
    with torch.no_grad():  # a non-trivial head, so every query matters to the logits
        method.head.weight.normal_()
    return method


@pytest.mark.parametrize("layer_scale,registers", [(False, 0), (True, 0), (True, 2)])
@pytest.mark.parametrize("options", [{}, {"num_queries": 3}, {"num_queries": 2, "combine": "mean"},
                                     {"num_queries": 2, "combine": "weighted", "layers": "1-2"}])
def test_fast_path_matches_naive_reference(layer_scale, registers, options):
    backbone = tiny_vit(layer_scale=layer_scale, num_reg_tokens=registers)
    method = _vqt(backbone, query_dropout=0.0, **options).train()
    images = torch.randn(4, 3, 32, 32)

    fast = method(extract_features(backbone, images, dtype=torch.float32))
    fast_grads = assert_matches_reference(method, fast, lambda: naive_vqt_logits(method, images))
    assert fast_grads["query_path.queries"].abs().sum() > 0


def test_naive_vqt_reads_the_pooled_feature_of_a_global_pool_backbone():
    """``vqt-naive`` (what ``measure`` runs) and VQT agree on the head's first piece, ``Features.pooled``:
    on a global-pool backbone the mean of the patch tokens, not the class token."""
    backbone = tiny_vit(num_reg_tokens=1, global_pool=True)
    method = _vqt(backbone, query_dropout=0.0, num_queries=2).train()
    images = torch.randn(4, 3, 32, 32)
    features = extract_features(backbone, images, dtype=torch.float32)
    assert not torch.allclose(features.pooled, backbone.forward_features(images)[:, 0])  # not the class token
    assert_matches_reference(method, method(features), lambda: naive_vqt_logits(method, images))


def test_backbone_gets_no_gradient_and_original_tokens_unchanged():
    backbone = tiny_vit(layer_scale=True)
    method = _vqt(backbone, num_queries=2)
    images = torch.randn(2, 3, 32, 32)
    before = backbone.forward_features(images)
    method(extract_features(backbone, images, dtype=torch.float32)).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(before, backbone.forward_features(images))


def test_query_dropout_is_per_sample_and_off_in_eval():
    backbone = tiny_vit()
    method = _vqt(backbone, query_dropout=0.5)
    features = extract_features(backbone, torch.randn(1, 3, 32, 32).expand(8, -1, -1, -1), dtype=torch.float32)
    method.train()
    logits = method(features)
    assert not torch.allclose(logits[0], logits[1])
    method.eval()
    logits = method(features)
    torch.testing.assert_close(logits[0], logits[1])


def test_head_input_size_and_vpt_init():
    backbone = tiny_vit()
    dim, depth = backbone.config.embed_dim, backbone.config.depth
    assert build_method("vqt", backbone, 5, {"num_queries": 4}).query_path.out_dim == dim + depth * 4 * dim
    mean = build_method("vqt", backbone, 5, {"num_queries": 4, "combine": "mean"})
    assert mean.query_path.out_dim == dim + depth * dim
    queries = build_method("vqt", backbone, 5, {}).query_path.queries
    bound = (6 / (3 * 8 * 8 + dim)) ** 0.5
    assert queries.abs().max() <= bound and queries.abs().max() > 0.5 * bound


@pytest.mark.parametrize("bad", [{"num_queries": 0}, {"combine": "max"}, {"layers": "7"}, {"layers": "a"},
                                 {"compress": 1.5}, {"prompts": 3}])
def test_bad_options_are_named(bad):
    from querytune.errors import ConfigError

    with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
        build_method("vqt", tiny_vit(), 5, bad)


def test_on_a_backbone_without_class_token_the_head_reads_the_map_feature():
    """SigLIP-like: the head's first piece is the MAP head's pooled feature, in VQT and in ``vqt-naive``;
    the queries read the patch tokens; a few steps train."""
    backbone = tiny_siglip()
    method = _vqt(backbone, query_dropout=0.0, num_queries=2).train()
    images = torch.randn(4, 3, 32, 32)
    features = extract_features(backbone, images, dtype=torch.float32)
    torch.testing.assert_close(features.pooled, backbone(images))
    assert_matches_reference(method, method(features), lambda: naive_vqt_logits(method, images))
    losses = train_a_few_steps(method, features, torch.tensor([0, 1, 2, 3]))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_rows_path_matches_naive_reference_with_rotary_positions(family, monkeypatch):
    """EVA-02 / DINOv3-shaped: the rows read the keys rotated by position (projected, never folded), the query
    rows carry none, as in the naive sequence where they are appended unrotated."""
    backbone = tiny_rope(family)
    method = _vqt(backbone, query_dropout=0.0, num_queries=2).train()
    images = torch.randn(3, 3, 32, 32)
    features = extract_features(backbone, images, dtype=torch.float32)
    assert_matches_reference(method, method(features), lambda: naive_vqt_logits(method, images))
    # The rotated keys are projected whatever the row count: a row count that would fold them changes nothing.
    monkeypatch.setattr(vit, "rows_attention_path", lambda *args: "folded")
    method.zero_grad()
    assert_matches_reference(method, method(features), lambda: naive_vqt_logits(method, images))
