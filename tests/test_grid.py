"""Member-stacked training (querytune.grid): the rows attention paths agree, every member of a stacked
run equals the same configuration trained alone, killed or not, and the search follows the protocol."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from querytune.backbones.vit import rows_attention_path


@pytest.mark.parametrize("with_extra_and_mask", [False, True])
def test_folded_and_projected_rows_attention_agree_with_gradients(with_extra_and_mask):
    block = tiny_vit(layer_scale=True).blocks[1]
    context = torch.randn(3, 17, 48)
    rows = torch.randn(3, 5, 48, requires_grad=True)
    extra = torch.randn(3, 2, 48) if with_extra_and_mask else None
    mask = None
    if with_extra_and_mask:  # row r may not see extra token r % 2
        mask = torch.zeros(5, 19)
        mask[torch.arange(5), 17 + torch.arange(5) % 2] = float("-inf")
    outputs, grads = {}, {}
    for path in ("folded", "projected"):
        out = block.forward_rows(rows, context, extra, mask, path=path)
        (out.out * torch.linspace(-1, 1, 48)).sum().backward()
        outputs[path], grads[path] = out, rows.grad.clone()
        rows.grad = None
    for a, b in zip(outputs["folded"], outputs["projected"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["folded"], grads["projected"], rtol=1e-5, atol=1e-5)


def test_rows_attention_path_follows_the_multiply_adds():
    # ViT-S: D 384, 6 heads, 257 tokens. Evaluation: projected once rows outnumber about D / H.
    assert rows_attention_path(60, 257, 384, 6, rows_grad=False, context_grad=False) == "folded"
    assert rows_attention_path(80, 257, 384, 6, rows_grad=False, context_grad=False) == "projected"
    # Training counts the rows' products three times: the switch comes at about D / 3H.
    assert rows_attention_path(20, 257, 384, 6, rows_grad=True, context_grad=False) == "folded"
    assert rows_attention_path(30, 257, 384, 6, rows_grad=True, context_grad=False) == "projected"
    # A differentiated context (an adapted trunk) makes its projection cost three times too.
    assert rows_attention_path(30, 257, 384, 6, rows_grad=True, context_grad=True) == "folded"
