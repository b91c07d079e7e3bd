"""Member-stacked training (querytune.grid): the rows attention paths agree, every member of a stacked
run equals the same configuration trained alone, killed or not, and the search follows the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vit
from querytune.backbones.vit import rows_attention_path
from querytune.grid import train_members
from querytune.run import train_run


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


def _common(backbone, task, tmp_path):
    return {"train_split": "train800", "eval_split": "val200", "image_size": 32, "workers": 0,
            "cache_dir": tmp_path / "cache", "show_progress": False, "device": "cpu"}


SETTINGS = {"epochs": 3, "batch_size": 8}  # 12 images: a full and a short batch per epoch
MEMBERS = {"a": {"lr": 0.05, "weight_decay": 1e-3, "seed": 3},
           "b": {"lr": 0.01, "weight_decay": 0.0, "seed": 3},
           "c": {"lr": 0.05, "weight_decay": 1e-3, "seed": 4, "data_seed": 3}}


def assert_member_equals_lone_run(member: Path, lone: Path) -> None:
    stacked, alone = load_file(str(member / "adapter.safetensors")), load_file(str(lone / "adapter.safetensors"))
    assert stacked.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(stacked[name], alone[name], rtol=1e-4, atol=1e-5, msg=name)
    got, want = json.loads((member / "metrics.json").read_text()), json.loads((lone / "metrics.json").read_text())
    for key in ("train_loss", "train_accuracy", "val200_accuracy", "trainable_params"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert [json.loads(line)["loss"] for line in (member / "log.jsonl").read_text().splitlines()] == pytest.approx(
        [json.loads(line)["loss"] for line in (lone / "log.jsonl").read_text().splitlines()], rel=1e-4)
    assert json.loads((member / "config.json").read_text())["train"] == \
        json.loads((lone / "config.json").read_text())["train"]


@pytest.mark.parametrize("method,options", [("vqt", {"num_queries": 2}), ("synqt", {"num_queries": 2}), ("memory", {})])
def test_every_member_equals_its_settings_trained_alone(method, options, tiny_backbone_dir, tiny_task, tmp_path):
    common = _common(tiny_backbone_dir, tiny_task, tmp_path)
    members = {tmp_path / "grid" / name: own for name, own in MEMBERS.items()}
    train_members(method, tiny_backbone_dir, tiny_task, members, options=options, train_settings=SETTINGS, **common)
    for name, own in MEMBERS.items():
        train_run(method, tiny_backbone_dir, tiny_task, tmp_path / "alone" / name, options=options,
                  train_settings={**SETTINGS, **own}, **common)
        assert_member_equals_lone_run(tmp_path / "grid" / name, tmp_path / "alone" / name)
