"""Member-stacked training (querytune.grid): the rows attention paths agree, every member of a stacked
run equals the same configuration trained alone, killed or not, and the search follows the protocol."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vit
from querytune.backbones import vit
from querytune.backbones.vit import rows_attention_path
from querytune.cli import main
from querytune.errors import ConfigError
from querytune.grid import member_name, search_grid, select_best
from querytune.run import train_runs
from querytune.settings import RunSpec, Runtime


def force_rows_path(monkeypatch, path: str) -> None:
    """Make every rows forward take ``path`` (``folded`` or ``projected``) wherever the row count decides."""
    monkeypatch.setattr(vit, "rows_attention_path", lambda *args: path)


@pytest.mark.parametrize("with_extra_and_mask", [False, True])
def test_folded_and_projected_rows_attention_agree_with_gradients(with_extra_and_mask, monkeypatch):
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
        force_rows_path(monkeypatch, path)
        out = block.forward_rows(rows, context, extra, mask)
        (out.out * torch.linspace(-1, 1, 48)).sum().backward()
        outputs[path], grads[path] = out, rows.grad.clone()
        rows.grad = None
    for a, b in zip(outputs["folded"], outputs["projected"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["folded"], grads["projected"], rtol=1e-5, atol=1e-5)


def test_grouped_extra_tokens_equal_a_mask_over_all_groups(monkeypatch):
    block = tiny_vit(layer_scale=True).blocks[1]
    context, extra = torch.randn(3, 17, 48), torch.randn(3, 2, 4, 48)  # 2 groups of 4 extra tokens
    rows = torch.randn(3, 6, 48)  # 3 rows a group
    mask = torch.full((6, 17 + 8), float("-inf"))
    mask[:, :17] = 0
    mask[:3, 17:21] = mask[3:, 21:] = 0
    force_rows_path(monkeypatch, "folded")
    masked = block.forward_rows(rows, context, extra.flatten(1, 2), mask)
    for path in ("folded", "projected"):  # grouped extra tokens are read folded, whatever the row count
        force_rows_path(monkeypatch, path)
        grouped = block.forward_rows(rows, context, extra)
        for a, b in zip(grouped, masked):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rows_attention_path_follows_the_multiply_adds():
    # ViT-S: D 384, 6 heads, 257 tokens. Evaluation: projected once rows outnumber about D / H.
    assert rows_attention_path(70, 257, 384, 6, rows_grad=False, context_grad=False) == "folded"
    assert rows_attention_path(80, 257, 384, 6, rows_grad=False, context_grad=False) == "projected"
    # Training the rows against frozen tokens doubles the rows' products only: the switch comes at about D / 2H.
    assert rows_attention_path(35, 257, 384, 6, rows_grad=True, context_grad=False) == "folded"
    assert rows_attention_path(40, 257, 384, 6, rows_grad=True, context_grad=False) == "projected"
    # A differentiated context (an adapted trunk) doubles its projection too.
    assert rows_attention_path(40, 257, 384, 6, rows_grad=True, context_grad=True) == "folded"


def _stack(method, backbone, task, tmp_path, runs, **options):
    """Train ``runs`` (folder -> own settings over SETTINGS) as one stack on train800 -> val200."""
    spec = RunSpec(method=method, backbone=backbone, data=task, train_split="train800", eval_split="val200",
                   image_size=32, options=options)
    runtime = Runtime(workers=0, cache=tmp_path / "cache", progress=False, device="cpu")
    return train_runs(spec, {run: {**SETTINGS, **own} for run, own in runs.items()}, runtime)


SETTINGS = {"epochs": 3, "batch_size": 8}  # 12 images: a full and a short batch per epoch
MEMBERS = {"a": {"lr": 0.05, "weight_decay": 1e-3, "seed": 3},
           "b": {"lr": 0.01, "weight_decay": 0.0, "seed": 3},
           "c": {"lr": 0.05, "weight_decay": 1e-3, "seed": 4, "data_seed": 3}}


# SynQT's QSM key bias adds q . b to every logit of a row, which the softmax cancels: its gradient is
# rounding noise, which Adam scales up to full steps. A stacked SynQT member's rows share a matmul with
# the other members' (whose kernel may sum in another order), so its key biases differ from the lone
# run's by that noise (up to 2e-3 here, changing no output) and its other parameters by up to 5e-5.
NO_GRADIENT = re.compile(r"synthesis\.qsm\.\d+\.attn\.k_proj\.fc2\.bias")


def assert_member_equals_lone_run(member: Path, lone: Path, atol: float = 1e-5) -> None:
    stacked, alone = load_file(str(member / "adapter.safetensors")), load_file(str(lone / "adapter.safetensors"))
    assert stacked.keys() == alone.keys()
    for name in alone:
        if not NO_GRADIENT.fullmatch(name):
            torch.testing.assert_close(stacked[name], alone[name], rtol=1e-4, atol=atol, msg=name)
    got, want = json.loads((member / "metrics.json").read_text()), json.loads((lone / "metrics.json").read_text())
    assert got.keys() == want.keys()
    for key in ("train_loss", "trainable_params", *(k for k in want if k.endswith("_accuracy"))):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert [json.loads(line)["loss"] for line in (member / "log.jsonl").read_text().splitlines()] == pytest.approx(
        [json.loads(line)["loss"] for line in (lone / "log.jsonl").read_text().splitlines()], rel=1e-4)
    assert json.loads((member / "config.json").read_text())["train"] == \
        json.loads((lone / "config.json").read_text())["train"]


@pytest.mark.parametrize("method,options,rows_per_member,fused",
                         [("vqt", {"num_queries": 2}, 2, True), ("synqt", {"num_queries": 2}, 2, True),
                          ("memory", {}, 1, True)])
def test_every_member_equals_its_settings_trained_alone(method, options, rows_per_member, fused, tiny_backbone_dir,
                                                        tiny_task, tmp_path, monkeypatch):
    from querytune.backbones.vit import Block

    members = {tmp_path / "grid" / name: own for name, own in MEMBERS.items()}
    row_counts = set()
    real_rows_attention = Block.rows_attention  # what every rows forward (SynQT's with drop-path too) calls
    monkeypatch.setattr(Block, "rows_attention", lambda self, rows, *a, **k:
                        row_counts.add(rows.shape[1]) or real_rows_attention(self, rows, *a, **k))
    _stack(method, tiny_backbone_dir, tiny_task, tmp_path, members, **options)
    # Fused: in training every member's rows pass each block in one call; otherwise one call per member.
    assert max(row_counts) == (len(MEMBERS) * rows_per_member if fused else rows_per_member)
    monkeypatch.setattr(Block, "rows_attention", real_rows_attention)
    for name, own in MEMBERS.items():
        _stack(method, tiny_backbone_dir, tiny_task, tmp_path, {tmp_path / "alone" / name: own}, **options)
        assert_member_equals_lone_run(tmp_path / "grid" / name, tmp_path / "alone" / name,
                                      atol=1e-4 if method == "synqt" else 1e-5)


def test_members_left_at_different_epochs_resume_to_the_lone_results(tiny_backbone_dir, tiny_task, tmp_path,
                                                                     monkeypatch):
    """A stack killed between two members' checkpoints: the member ahead waits while the other catches up."""
    import querytune.train as train_module

    members = {tmp_path / "grid" / name: own for name, own in MEMBERS.items()}
    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epochs_done"] == 2 and path.parent.name == "b":  # a and b saved epoch 2, c has epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, members)
    epochs_done = {run.name: torch.load(run / "checkpoint.pt")["epochs_done"] for run in members}
    assert epochs_done == {"a": 2, "b": 2, "c": 1}
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    metrics = _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, members)
    assert all(m["resumed"] for m in metrics)
    for name, own in MEMBERS.items():
        _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, {tmp_path / "alone" / name: own})
        assert_member_equals_lone_run(tmp_path / "grid" / name, tmp_path / "alone" / name)


def test_kill_during_a_grid_then_rerun_ends_like_lone_runs(tiny_backbone_dir, tiny_task, tmp_path):
    from test_faults import kill_when, start_slowed

    def args(out: Path, *extra: str) -> list[str]:
        return ["train", "--method", "vqt", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task),
                "--out", str(out), "--epochs", "3", "--batch-size", "8", "--image-size", "32", "--workers", "0",
                "--no-cache", "-q", "--seed", "5", *extra]

    cut = tmp_path / "cut"
    process = start_slowed(args(cut, "--grid", "--seeds", "2", "--folds", "1"), delay=0.02)
    kill_when(process, lambda: any(cut.glob("search/*/checkpoint.pt")))
    assert not any(cut.glob("search/*/metrics.json"))
    main(args(cut, "--grid", "--seeds", "2", "--folds", "1"))
    summary = json.loads((cut / "grid.json").read_text())
    assert len(summary["search"]) == 20 and [s["seed"] for s in summary["seeds"]] == [5, 6]
    assert all(json.loads((run / "metrics.json").read_text())["resumed"] for run in cut.glob("search/*"))
    chosen = summary["chosen"]
    lone = ["--lr", repr(chosen["lr"]), "--weight-decay", repr(chosen["weight_decay"])]
    main(args(tmp_path / "alone-search", *lone, "--train-split", "train800", "--eval-split", "val200"))
    assert_member_equals_lone_run(cut / "search" / member_name(chosen), tmp_path / "alone-search")
    main(args(tmp_path / "alone-seed6", *lone, "--seed", "6", "--data-seed", "5"))
    assert_member_equals_lone_run(cut / "seed6", tmp_path / "alone-seed6")


def test_search_picks_the_best_validation_accuracy_ties_to_the_smaller_lr():
    points = search_grid("vqt", 128)
    assert [p["lr"] for p in points[::4]] == [0.5, 0.25, 0.125, 0.05, 0.025]  # the official grid x 128/256
    assert [p["weight_decay"] for p in points[:4]] == [1e-2, 1e-3, 1e-4, 0.0]
    scores = [0.5] * 20
    assert select_best(list(zip(points, scores))) == {"lr": 0.025, "weight_decay": 1e-2}
    scores[5], scores[9], scores[10] = 0.9, 0.9, 0.9  # (0.25, 1e-3), (0.125, 1e-3), (0.125, 1e-4)
    assert select_best(list(zip(points, scores))) == {"lr": 0.125, "weight_decay": 1e-3}


def test_grid_refuses_members_it_cannot_stack(tiny_backbone_dir, tiny_task, tmp_path):
    with pytest.raises(ConfigError, match="adapts the trunk"):
        _stack("lora", tiny_backbone_dir, tiny_task, tmp_path, {tmp_path / "a": {}, tmp_path / "b": {}})
    with pytest.raises(ConfigError, match=r"differ only in .*\(not epochs"):
        _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, {tmp_path / "a": {"epochs": 1}, tmp_path / "b": {}})
    with pytest.raises(ConfigError, match="share one epoch order"):
        _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, {tmp_path / "a": {"seed": 1}, tmp_path / "b": {}})
    assert not (tmp_path / "a").exists()


def test_seeds_flag_is_checked(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "vqt", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "-o",
              str(tmp_path / "out"), "--seeds", "0"])
    assert exit_info.value.code == 2 and "--seeds must be at least 1" in capsys.readouterr().err


def test_a_grid_refuses_compile(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "vqt", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "-o",
              str(tmp_path / "out"), "--seeds", "2", "--compile", "default"])
    assert exit_info.value.code == 2 and "--compile applies to single runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_diverged_memory_member_leaves_the_others_as_they_are(tiny_backbone_dir):
    """Stacked memory members read only their own class token and memory: an inf in one cannot reach
    the others (through a -inf mask it would: inf - inf and 0 * inf are NaN)."""
    import contextlib

    from querytune.backbones import load_backbone
    from querytune.methods import build_method
    from querytune.methods.memory import MemoryTokens
    from querytune.trunk.features import Features, extract_features

    backbone = load_backbone(tiny_backbone_dir)
    torch.manual_seed(0)
    features: Features = extract_features(backbone, torch.randn(4, 3, 32, 32)).to("cpu")  # float32
    members = [build_method("memory", backbone, 3) for _ in range(3)]
    with torch.no_grad():
        members[0].stack.tasks[0].memory.fill_(float("inf"))
    stacked = MemoryTokens.forward_members(members, features, lambda k: contextlib.nullcontext())
    assert not torch.isfinite(stacked[0]).any()
    for member, logits in zip(members[1:], stacked[1:]):
        torch.testing.assert_close(logits, member(features), rtol=1e-5, atol=1e-6)


def test_a_diverging_grid_member_is_noted_and_the_others_train_on(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    """A grid's too-large learning rate makes one member's loss NaN: the stack goes on (its held-out
    accuracy ranks that member), the others end as they would alone, and the member is named once."""
    runs = {tmp_path / "sane": {"lr": 0.05}, tmp_path / "wild": {"lr": 1e20}}
    metrics = _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, runs)
    assert math.isfinite(metrics[0]["train_loss"]) and not math.isfinite(metrics[1]["train_loss"])
    _stack("vqt", tiny_backbone_dir, tiny_task, tmp_path, {tmp_path / "alone": {"lr": 0.05}})
    assert_member_equals_lone_run(tmp_path / "sane", tmp_path / "alone")
    err = " ".join(capsys.readouterr().err.split())  # the note's line, wrapped at the console's width
    assert err.count("the training loss is nan") == 1
    assert f"{tmp_path / 'wild'}: epoch " in err and f"{tmp_path / 'sane'}:" not in err
