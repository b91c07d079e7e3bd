"""Memory tokens: plain and masked modes against the naive references, the masked mode's
untouched original tokens, task concatenation and extension runs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROPE_FAMILIES, assert_matches_reference, tiny_rope, tiny_siglip, tiny_vit, train_a_few_steps
from querytune import load_run, train_run
from querytune.errors import CheckpointError, ConfigError
from querytune.methods import build_method
from querytune.methods.memory import MemoryTaskSet
from querytune.settings import RunSpec, Runtime
from querytune.trunk.features import extract_features
from reference import naive_masked_memory, naive_plain_memory_logits

FAST = {"epochs": 2, "batch_size": 8}


def _memory(backbone, seed=1, num_classes=5, method_name="memory", **options):
    torch.manual_seed(seed)
    method = build_method(method_name, backbone, num_classes, options)
    with torch.no_grad():  # non-trivial parameters, so that every one of them matters to the logits
        for name, param in method.named_parameters():
            if not name.startswith("backbone.") and param.requires_grad:
                param.add_(0.5 * torch.randn_like(param))
    return method


def _features(backbone, images):
    return extract_features(backbone, images, dtype=torch.float32)


@pytest.mark.parametrize("layer_scale,registers", [(False, 0), (True, 2)])
@pytest.mark.parametrize("options", [{"memory_tokens": 3}, {"memory_tokens": 0},
                                     {"memory_tokens": 2, "train_class_token": False}])
def test_masked_mode_matches_naive_masked_sequence(layer_scale, registers, options):
    backbone = tiny_vit(layer_scale=layer_scale, num_reg_tokens=registers)
    method = _memory(backbone, **options).train()
    images = torch.randn(3, 3, 32, 32)
    fast = method(_features(backbone, images))
    grads = assert_matches_reference(method, fast, lambda: naive_masked_memory(method.stack, backbone, images)[1][-1])
    assert set(grads) == {"stack.tasks.0.head.weight", "stack.tasks.0.head.bias"} | (
        {"stack.tasks.0.memory"} if options["memory_tokens"] else set()) | (
        {"stack.tasks.0.class_token"} if options.get("train_class_token", True) else set())


@pytest.mark.parametrize("options", [{"memory_tokens": 2}, {"memory_tokens": 0},
                                     {"memory_tokens": 2, "train_class_token": False}])
def test_plain_mode_matches_naive_appended_memory(options):
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    method = _memory(backbone, method_name="memory-plain", **options).train()
    assert not method.reads.frozen
    images = torch.randn(3, 3, 32, 32)
    fast = method(images)
    assert_matches_reference(method, fast, lambda: naive_plain_memory_logits(method, images))
    assert all(p.grad is None for p in backbone.parameters())


def test_plain_mode_without_memory_or_class_token_is_the_linear_probe():
    backbone = tiny_vit(layer_scale=True)
    method = _memory(backbone, method_name="memory-plain", memory_tokens=0, train_class_token=False)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(method(images), method.head(backbone(images)), rtol=0, atol=0)


def test_masked_mode_leaves_every_original_token_bit_for_bit():
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    images = torch.randn(4, 3, 32, 32)
    tokens = backbone.forward_features(images)  # every original token after the final norm
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    features = _features(backbone, images)
    layers = features.layers.clone()
    method = _memory(backbone, memory_tokens=3)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        torch.nn.functional.cross_entropy(method(features), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    assert all(p.grad is None for p in backbone.parameters())
    assert method.stack.tasks[0].class_token.grad.abs().sum() > 0
    assert torch.equal(features.layers, layers)  # what the rows read is never written
    assert torch.equal(features.pooled, tokens[:, 0])  # the original class-token output
    assert torch.equal(backbone.forward_features(images), tokens)
    assert all(torch.equal(weights[k], v) for k, v in backbone.state_dict().items())
    # the naive masked sequence keeps them too, up to the rounding of its longer softmax
    original_cls, _ = naive_masked_memory(method.stack, backbone, images)
    torch.testing.assert_close(original_cls, tokens[:, 0], rtol=1e-5, atol=1e-5)


def test_new_class_token_starts_as_the_backbone_class_token():
    backbone = tiny_vit(num_reg_tokens=1)
    method = build_method("memory", backbone, 3, {})
    token = method.stack.tasks[0].class_token
    assert torch.equal(token, backbone.class_token_input()[0])
    assert token.data_ptr() != backbone.cls_token.data_ptr()
    memory = method.stack.tasks[0].memory
    assert memory.shape == (3, 5, 48) and 0.01 < memory.std().item() < 0.03


def test_concatenated_tasks_equal_their_own_models():
    backbone = tiny_vit(layer_scale=True)
    first = _memory(backbone, seed=1, num_classes=5, memory_tokens=3)
    second = _memory(backbone, seed=2, num_classes=4, memory_tokens=1)
    third = _memory(backbone, seed=3, num_classes=2, memory_tokens=0)
    features = _features(backbone, torch.randn(3, 3, 32, 32))
    merged, placement = MemoryTaskSet.merge([first.stack, second.stack, third.stack])
    assert placement == [[0], [1], [2]] and merged.reads == [(), (), ()]
    joint = merged(features, backbone)
    for logits, own in zip(joint, (first, second, third)):
        torch.testing.assert_close(logits, own(features), rtol=1e-5, atol=1e-5)


def test_extension_differs_from_concatenation_only_where_the_mask_allows():
    backbone = tiny_vit(layer_scale=True)
    first = _memory(backbone, seed=1, memory_tokens=2).stack.tasks[0]
    second = _memory(backbone, seed=2, memory_tokens=2).stack.tasks[0]
    images = torch.randn(3, 3, 32, 32)
    features = _features(backbone, images)
    extension, concatenation = MemoryTaskSet([first, second], [(), (0,)]), MemoryTaskSet([first, second], [(), ()])

    @torch.no_grad()
    def run(stack):
        return stack(features, backbone)

    for stack in (extension, concatenation):  # the full masked sequence agrees with the rows pass
        with torch.no_grad():
            naive = naive_masked_memory(stack, backbone, images)[1]
        for fast, slow in zip(run(stack), naive):
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    before_ext, before_cat = run(extension), run(concatenation)
    # task 1 reads no other task in either mode (the modes compute it by different paths: masked, grouped)
    torch.testing.assert_close(before_ext[0], before_cat[0], rtol=0, atol=1e-5)
    assert not torch.allclose(before_ext[1], before_cat[1])  # task 2 reads task 1 in extension only

    with torch.no_grad():
        first.memory.add_(torch.randn_like(first.memory))
    after_ext, after_cat = run(extension), run(concatenation)
    assert not torch.allclose(after_ext[1], before_ext[1], atol=1e-4)  # task 1's memory reaches task 2 ...
    assert torch.equal(after_cat[1], before_cat[1])  # ... only in extension mode

    with torch.no_grad():
        second.memory.add_(torch.randn_like(second.memory))
        second.class_token.add_(torch.randn_like(second.class_token))
    for stack, before in ((extension, after_ext), (concatenation, after_cat)):
        assert torch.equal(run(stack)[0], before[0])  # task 1 never depends on task 2


def test_extension_matches_naive_reference_in_logits_and_gradients():
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    base = _memory(backbone, seed=1, memory_tokens=2).stack.tasks[0].requires_grad_(False)
    new = _memory(backbone, seed=2, memory_tokens=3).stack.tasks[0]
    stack = MemoryTaskSet([base, new], [(), (0,)])
    images = torch.randn(3, 3, 32, 32)
    fast = stack(_features(backbone, images), backbone)[1]
    grads = assert_matches_reference(stack, fast, lambda: naive_masked_memory(stack, backbone, images)[1][1])
    assert set(grads) == {"tasks.1.class_token", "tasks.1.memory", "tasks.1.head.weight", "tasks.1.head.bias"}


@pytest.mark.parametrize("method,bad", [("memory", {"memory_tokens": -1}),
                                        ("memory", {"memory_tokens": 0, "train_class_token": False}),
                                        ("memory-plain", {"extend": "/nowhere"}), ("memory", {"num_queries": 2})])
def test_bad_options_are_named(method, bad):
    with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
        build_method(method, tiny_vit(), 5, bad)


# ---------------------------------------------------------------- extension runs


def _train(backbone_dir, task, out, method="memory", **options):
    return train_run(RunSpec(method=method, backbone=backbone_dir, data=task, options=options, image_size=32), out,
                     train=FAST, runtime=Runtime(workers=0, progress=False))


def test_extension_run_trains_only_the_new_task_and_reloads(tiny_backbone_dir, tiny_task, tmp_path):
    _train(tiny_backbone_dir, tiny_task, tmp_path / "base", memory_tokens=2)
    metrics = _train(tiny_backbone_dir, tiny_task, tmp_path / "ext", memory_tokens=1, extend=tmp_path / "base")
    saved = load_file(str(tmp_path / "ext" / "adapter.safetensors"))
    assert set(saved) == {"stack.tasks.1.class_token", "stack.tasks.1.memory", "stack.tasks.1.head.weight",
                          "stack.tasks.1.head.bias", "base_digest"}
    assert metrics["trainable_params"] == 48 + 3 * 48 + 48 * 3 + 3

    base, _ = load_run(tmp_path / "base")
    extension, config = load_run(tmp_path / "ext")
    assert config["options"]["extend"] == str((tmp_path / "base").resolve())
    assert extension.stack.reads == [(), (0,)]
    for mine, theirs in zip(extension.stack.tasks[0].parameters(), base.stack.tasks[0].parameters()):
        assert torch.equal(mine, theirs)  # the base task stayed frozen

    from querytune.serve import MultiTaskServer

    server = MultiTaskServer.from_runs(None, [tmp_path / "base", tmp_path / "ext"], device="cpu")
    merged = server.rows.of_kind(MemoryTaskSet)
    assert len(merged.tasks) == 2 and merged.reads == [(), (0,)]  # the shared base task runs once
    images = torch.randn(2, 3, 32, 32)
    served = server.predict(images)
    features = extract_features(base.backbone, images).to("cpu")
    with torch.no_grad():
        torch.testing.assert_close(served["base"], base(features), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(served["ext"], extension(features), rtol=1e-5, atol=1e-5)

    adapter = tmp_path / "base" / "adapter.safetensors"  # the base run is retrained after the extension was trained
    save_file({k: v + 1 for k, v in load_file(str(adapter)).items()}, str(adapter))
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()
    (tmp_path / "base" / "adapter.sha256").write_text(f"{digest}  adapter.safetensors\n")  # as a new run writes it
    with pytest.raises(CheckpointError, match="whose adapter has changed"):
        load_run(tmp_path / "ext")


def test_only_masked_memory_runs_can_be_extended(tiny_backbone_dir, tiny_task, tmp_path):
    _train(tiny_backbone_dir, tiny_task, tmp_path / "linear", method="linear")
    with pytest.raises(ConfigError, match="only a masked-memory run can be extended"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "ext", extend=tmp_path / "linear")
    with pytest.raises(CheckpointError, match="not found"):
        _train(tiny_backbone_dir, tiny_task, tmp_path / "ext2", extend=tmp_path / "missing")


@pytest.mark.parametrize("options", [{"memory_tokens": 2}, {"memory_tokens": 0}])
def test_on_a_backbone_without_class_token_memory_adds_its_class_token_as_a_row(options):
    """SigLIP-like: the masked mode's new class token (N(0, 0.02), there being none to copy) equals the naive
    masked sequence, the plain mode's equals the naive sequence with the token appended (read by no
    token); both train."""
    backbone = tiny_siglip()
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 1, 2])
    masked = _memory(backbone, **options).train()
    features = _features(backbone, images)
    assert_matches_reference(masked, masked(features),
                             lambda: naive_masked_memory(masked.stack, backbone, images)[1][-1])
    original, _ = naive_masked_memory(masked.stack, backbone, images)
    torch.testing.assert_close(original, features.pooled, rtol=1e-5, atol=1e-5)  # the MAP feature, untouched
    losses = train_a_few_steps(masked, features, labels)
    assert losses[-1] < losses[0]
    plain = _memory(backbone, method_name="memory-plain", **options).train()
    assert_matches_reference(plain, plain(images), lambda: naive_plain_memory_logits(plain, images))
    losses = train_a_few_steps(plain, images, labels)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in backbone.parameters())


def test_new_class_token_without_a_backbone_class_token_is_drawn_as_the_memory():
    token = build_method("memory", tiny_siglip(), 3, {}).stack.tasks[0].class_token
    assert token.shape == (48,) and 0.01 < token.std().item() < 0.03


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_masked_and_plain_memory_match_naive_references_with_rotary_positions(family):
    """EVA-02 / DINOv3-shaped: the class tokens and memory carry no position; grouped (one task) and masked
    (an extension) rows alike equal the naive sequences."""
    backbone = tiny_rope(family)
    images = torch.randn(3, 3, 32, 32)
    features = _features(backbone, images)
    first = _memory(backbone, memory_tokens=2)
    stack = MemoryTaskSet([*first.stack.tasks, *_memory(backbone, seed=2, memory_tokens=1).stack.tasks], [(), (0,)])
    for logits, reference in zip(stack(features, backbone), naive_masked_memory(stack, backbone, images)[1]):
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert_matches_reference(first, first(features), lambda: naive_masked_memory(first.stack, backbone, images)[1][-1])
    plain = _memory(backbone, method_name="memory-plain", memory_tokens=2).train()
    assert_matches_reference(plain, plain(images), lambda: naive_plain_memory_logits(plain, images))
