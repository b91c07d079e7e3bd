"""The feature-adapting baselines (VPT, LoRA, AdaptFormer, BitFit, SSF) and VQT added on top of them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_rope, tiny_vit
from querytune import eval_run, train_run
from querytune.errors import ConfigError
from querytune.measure import measure_step
from querytune.methods import build_method
from querytune.settings import RunSpec, Runtime
from querytune.trunk.features import extract_features

NEW_METHODS = ["vpt", "lora", "adaptformer", "bitfit", "ssf", "vqt+lora", "vqt+adaptformer", "vqt+vpt"]
IMAGES = 32  # tiny_vit's input size: 4x4 patches of 8 px


def _images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGES, IMAGES, generator=torch.Generator().manual_seed(seed))


def _randomise(method, pattern: str) -> None:
    """Move zero-initialised parameters off zero, so that they matter."""
    with torch.no_grad():
        for name, param in method.named_parameters():
            if pattern in name:
                param.normal_(std=0.1)


# --- LoRA and AdaptFormer -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "adaptformer"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_zero_initialised_adapters_equal_the_backbone(name, train_mode):
    reference = tiny_vit(layer_scale=True, num_reg_tokens=1)
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    build_method(name, backbone, 5, {}).train(train_mode)  # adapts the backbone's blocks in place
    images = _images()
    assert torch.equal(backbone.forward_features(images), reference.forward_features(images))


def test_lora_adapts_q_and_v_only_with_the_given_rank():
    backbone = tiny_vit()
    method = build_method("lora", backbone, 5, {"lora_rank": 3, "lora_alpha": 6}).train()
    _randomise(method, "lora_b")
    qkv = backbone.blocks[0].attn.qkv
    dim = backbone.config.embed_dim
    assert qkv.lora_a.shape == (2, 3, dim) and qkv.lora_b.shape == (2, dim, 3) and qkv.scaling == 2.0
    u = torch.randn(2, 5, dim)
    q, k, v = qkv(u).chunk(3, dim=-1)
    q0, k0, v0 = qkv.base(u).chunk(3, dim=-1)
    assert torch.equal(k, k0) and not torch.allclose(q, q0) and not torch.allclose(v, v0)
    # The effective weight that forward_rows reads is the adapted projection.
    torch.testing.assert_close(F.linear(u, qkv.weight, qkv.bias), qkv(u), rtol=1e-5, atol=1e-6)


def test_lora_merged_equals_unmerged_and_saves_a_and_b():
    backbone = tiny_vit(layer_scale=True)
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = build_method("lora", backbone, 5, {}).train()
    _randomise(method, "lora_b")
    images = _images()
    unmerged = method(images)
    method.eval()
    qkv = backbone.blocks[0].attn.qkv
    assert qkv.merged_weight is not None
    torch.testing.assert_close(method(images), unmerged, rtol=1e-5, atol=1e-5)
    # Merging never touches the frozen weights, and the adapter holds A and B, unmerged.
    assert torch.equal(qkv.base.weight, pretrained["blocks.0.attn.qkv.weight"])
    state = method.trainable_state_dict()
    assert {k for k in state if "blocks.0." in k} == {"backbone.blocks.0.attn.qkv.lora_a",
                                                       "backbone.blocks.0.attn.qkv.lora_b"}
    method.train()
    assert qkv.merged_weight is None


def test_lora_loaded_in_eval_mode_is_merged_from_the_loaded_values():
    trained = build_method("lora", tiny_vit(), 5, {})
    _randomise(trained, "lora_b")
    images = _images()
    expected = trained.eval()(images)
    method = build_method("lora", tiny_vit(), 5, {}).eval()
    method.load_trainable_state_dict(trained.trainable_state_dict())
    torch.testing.assert_close(method(images), expected, rtol=1e-5, atol=1e-5)


def test_adaptformer_adds_a_scaled_bottleneck_beside_each_mlp():
    backbone = tiny_vit(layer_scale=True)
    method = build_method("adaptformer", backbone, 5, {"adapter_dim": 7, "adapter_scale": 0.5,
                                                        "adapter_dropout": 0.0}).train()
    _randomise(method, "mlp_parallel.up")
    block = backbone.blocks[1]
    adapter = block.mlp_parallel
    assert adapter.down.out_features == 7
    a = torch.randn(2, 5, backbone.config.embed_dim)
    expected = block.ls2(block.mlp(block.norm2(a))) + 0.5 * adapter.up(torch.relu(adapter.down(a)))
    torch.testing.assert_close(block.mlp_branch(a), expected)


def test_adaptformer_keeps_the_backbones_names_and_its_adapters_names():
    """The adapted blocks hold the backbone's tensors under their timm names, and the adapters keep the names
    of the adapters saved before (``blocks.N.mlp_parallel``), so saved adapters and exports still load."""
    backbone = tiny_vit(layer_scale=True)
    plain = backbone.state_dict()
    method = build_method("adaptformer", backbone, 5, {})
    state = backbone.state_dict()
    assert [name for name in state if ".mlp_parallel." not in name] == list(plain)
    assert all(torch.equal(state[name], plain[name]) for name in plain)
    assert set(method.trainable_state_dict()) == {"head.weight", "head.bias"} | {
        f"backbone.blocks.{index}.mlp_parallel.{layer}.{kind}"
        for index in range(backbone.config.depth) for layer in ("down", "up") for kind in ("weight", "bias")}


# --- BitFit -------------------------------------------------------------------------------


def test_bitfit_trains_every_bias_and_nothing_else():
    backbone = tiny_vit(layer_scale=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = build_method("bitfit", backbone, 5, {}).train()
    biases = {f"backbone.{name}" for name, _ in backbone.named_parameters() if name.endswith(".bias")}
    assert {"backbone.norm.bias", "backbone.blocks.0.norm1.bias", "backbone.blocks.2.mlp.fc2.bias",
            "backbone.patch_embed.proj.bias"} <= biases
    assert set(method.trainable_state_dict()) == biases | {"head.weight", "head.bias"}

    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(method(_images()), torch.tensor([0, 1, 2])).backward()
    for name, param in backbone.named_parameters():
        if name.endswith(".bias"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, before[name]) != name.endswith(".bias"), name


# --- VPT ----------------------------------------------------------------------------------


def _tokens_entering_blocks(backbone, monkeypatch) -> list[torch.Tensor]:
    """Record the tokens entering every block."""
    seen: list[torch.Tensor] = []
    for block in backbone.blocks:
        original = block.forward_normed

        def recording(x, u, original=original):
            seen.append(x.detach().clone())
            return original(x, u)

        monkeypatch.setattr(block, "forward_normed", recording)
    return seen


def _disturb_prompt_outputs(backbone, monkeypatch, start: int, count: int, blocks: list[int]) -> None:
    """Add a large value to the prompt rows of the given blocks' outputs."""
    for index in blocks:
        block = backbone.blocks[index]
        original = block.forward_normed

        def disturbed(x, u, original=original):
            out = original(x, u).clone()
            out[:, start : start + count] += 100.0
            return out

        monkeypatch.setattr(block, "forward_normed", disturbed)


@pytest.mark.parametrize("registers", [0, 2])
def test_vpt_deep_gives_every_block_fresh_prompts_after_the_prefix(registers, monkeypatch):
    backbone = tiny_vit(layer_scale=True, num_reg_tokens=registers)
    method = build_method("vpt", backbone, 5, {"prompts": 3}).eval()
    start = 1 + registers
    images = _images()
    embedded = backbone.embed(images)
    seen = _tokens_entering_blocks(backbone, monkeypatch)
    method(images)
    assert len(seen) == backbone.config.depth
    tokens = method.prompts.tokens
    for index, x in enumerate(seen):
        assert x.shape[1] == embedded.shape[1] + 3
        assert torch.equal(x[:, start : start + 3], tokens[index].expand(3, -1, -1)), index
    assert torch.equal(seen[0][:, :start], embedded[:, :start])
    assert torch.equal(seen[0][:, start + 3 :], embedded[:, start:])


def test_vpt_deep_prompt_outputs_never_reach_the_next_block(monkeypatch):
    backbone = tiny_vit(layer_scale=True)
    method = build_method("vpt", backbone, 5, {"prompts": 2}).eval()
    images = _images()
    clean = method(images)
    _disturb_prompt_outputs(backbone, monkeypatch, 1, 2, blocks=list(range(backbone.config.depth)))
    assert torch.equal(method(images), clean)


def test_vpt_shallow_inserts_prompts_at_block_0_only(monkeypatch):
    backbone = tiny_vit(layer_scale=True)
    method = build_method("vpt", backbone, 5, {"prompts": 2, "vpt_mode": "shallow"}).eval()
    assert method.prompts.tokens.shape[0] == 1 and method.options.prompt_dropout == 0.0
    images = _images()
    clean = method(images)
    seen = _tokens_entering_blocks(backbone, monkeypatch)
    method(images)
    assert torch.equal(seen[0][:, 1:3], method.prompts.tokens[0].expand(3, -1, -1))
    assert not torch.allclose(seen[1][:, 1:3], seen[0][:, 1:3])  # block 0's prompt outputs travel on
    monkeypatch.undo()
    _disturb_prompt_outputs(backbone, monkeypatch, 1, 2, blocks=[0])
    assert not torch.allclose(method(images), clean)


def test_vpt_init_and_dropout_defaults():
    backbone = tiny_vit()
    method = build_method("vpt", backbone, 5, {})
    bound = (6 / (3 * 8 * 8 + backbone.config.embed_dim)) ** 0.5
    tokens = method.prompts.tokens
    assert tokens.shape == (backbone.config.depth, 10, backbone.config.embed_dim)
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.5 * bound
    assert method.options.prompt_dropout == 0.1 and method.prompts.dropout.p == 0.1


# --- VQT on top of the adapting methods -----------------------------------------------------


@pytest.mark.parametrize("name", ["vqt+lora", "vqt+adaptformer"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_vqt_addon_at_zero_init_equals_plain_vqt(name, train_mode):
    options = {"num_queries": 2, "query_dropout": 0.0}
    vqt_backbone = tiny_vit(layer_scale=True, num_reg_tokens=1)
    vqt = build_method("vqt", vqt_backbone, 5, options)
    composite = build_method(name, tiny_vit(layer_scale=True, num_reg_tokens=1), 5, options)
    with torch.no_grad():
        vqt.head.weight.normal_()
    composite.query_path.load_state_dict(vqt.query_path.state_dict())
    composite.head.load_state_dict(vqt.head.state_dict())
    vqt.train(train_mode)
    composite.train(train_mode)
    images = _images()
    expected = vqt(extract_features(vqt_backbone, images, dtype=torch.float32))
    torch.testing.assert_close(composite(images), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,adapter", [("vqt+lora", "lora_b"), ("vqt+adaptformer", "mlp_parallel.up.weight"),
                                          ("vqt+vpt", "prompts.tokens")])
def test_vqt_addon_gradients_reach_queries_and_the_adapting_part(name, adapter):
    method = build_method(name, tiny_vit(layer_scale=True), 5, {}).train()
    F.cross_entropy(method(_images()), torch.tensor([0, 1, 2])).backward()
    assert method.query_path.queries.grad.abs().sum() > 0
    grads = [p.grad for n, p in method.named_parameters() if adapter in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["vqt+lora", "vqt+adaptformer"])
def test_vqt_addon_rows_equal_the_naive_reference_with_trained_adapters(name):
    """The naive block (queries appended under a mask) writes out AdaptFormer's adapter beside the MLP and
    LoRA's effective weights, so VQT's rows through the adapted blocks equal it once the adapters are off
    their zero init (the naive block used to leave the adapter out, which this would show)."""
    from querytune.methods.vqt import naive_vqt_logits

    method = build_method(name, tiny_vit(layer_scale=True, num_reg_tokens=1), 5,
                          {"num_queries": 2, "query_dropout": 0.0, "adapter_dropout": 0.0} if "adapt" in name
                          else {"num_queries": 2, "query_dropout": 0.0}).eval()
    _randomise(method, "mlp_parallel.up" if "adapt" in name else "lora_b")
    with torch.no_grad():
        method.head.weight.normal_()
        torch.testing.assert_close(method(_images()), naive_vqt_logits(method, _images()), rtol=1e-5, atol=1e-5)


def test_the_naive_block_refuses_a_block_it_does_not_write_out():
    from querytune.methods.vqt import naive_block

    backbone = tiny_vit()

    class OtherBlock(type(backbone.blocks[0])):  # a method's block that adds something of its own
        pass

    block = backbone.blocks[0]
    block.__class__ = OtherBlock
    with pytest.raises(TypeError, match="writes out a Block or an AdaptedBlock, not a OtherBlock"):
        naive_block(block, torch.randn(1, 17, 48))


def test_vqt_plus_vpt_queries_read_the_prompts():
    """The last block's prompts reach nothing but that block, so they change the last query
    summary only if the queries attend to them."""
    method = build_method("vqt+vpt", tiny_vit(layer_scale=True), 5, {"prompts": 2}).eval()
    images = _images()
    dim, depth = method.backbone.config.embed_dim, method.backbone.config.depth
    before = method.head_input(images)
    with torch.no_grad():
        method.prompts.tokens[-1].normal_()  # (a constant shift would vanish in the LayerNorm)
    after = method.head_input(images)
    last_query = slice(dim + (depth - 1) * dim, None)
    assert torch.equal(before[:, dim:last_query.start], after[:, dim:last_query.start])
    assert not torch.allclose(before[:, last_query], after[:, last_query])


def test_options_of_both_parts_apply():
    method = build_method("vqt+lora", tiny_vit(), 5, {"num_queries": 3, "lora_rank": 2})
    assert method.query_path.queries.shape[1] == 3
    assert method.backbone.blocks[0].attn.qkv.lora_a.shape[1] == 2
    method = build_method("vqt+vpt", tiny_vit(), 5, {"num_queries": 2, "prompts": 4, "vpt_mode": "shallow"})
    assert method.query_path.queries.shape[1] == 2 and method.prompts.tokens.shape[:2] == (1, 4)


@pytest.mark.parametrize("name,bad", [("lora", {"lora_rank": 0}), ("lora", {"lora_dropout": 1.0}),
                                      ("lora", {"num_queries": 2}), ("adaptformer", {"adapter_dim": 0}),
                                      ("vpt", {"prompts": 0}), ("vpt", {"vpt_mode": "middle"}),
                                      ("bitfit", {"prompts": 3}), ("vqt+vpt", {"num_queries": 0}),
                                      ("vqt+lora", {"prompts": 3})])
def test_bad_options_are_named(name, bad):
    with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
        build_method(name, tiny_vit(), 5, bad)


def test_a_backbone_takes_one_set_of_adapters():
    backbone = tiny_vit()
    build_method("lora", backbone, 5, {})
    with pytest.raises(ConfigError, match="freshly loaded"):
        build_method("vqt+lora", backbone, 5, {})


# --- measurement and runs -----------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_METHODS)
def test_measure_step_works(name):
    method = build_method(name, tiny_vit(layer_scale=True), 5, {})
    cost = measure_step(method, _images(4), torch.tensor([0, 1, 2, 3]), repeats=1)
    config = method.backbone.config
    # backpropagating through the trunk keeps at least one float32 (B, N, D) activation per block
    assert cost.saved_bytes >= config.depth * 4 * config.num_tokens(32) * config.embed_dim * 4
    weights = sum(p.numel() * p.element_size() for p in method.parameters())
    assert cost.inference_peak_bytes > weights and cost.train_peak_bytes > weights  # process RSS holds the model
    assert cost.step_seconds > 0


@pytest.mark.parametrize("name", ["lora", "bitfit", "ssf", "vqt+vpt"])
def test_train_then_eval_reproduces_the_accuracy(name, tiny_backbone_dir, tiny_task, tmp_path):
    run = tmp_path / "run"
    metrics = train_run(RunSpec(method=name, backbone=tiny_backbone_dir, data=tiny_task, image_size=IMAGES), run,
                        train={"epochs": 2, "batch_size": 8}, runtime=Runtime(workers=0, progress=False))
    adapter = load_file(str(run / "adapter.safetensors"))
    assert "head.weight" in adapter and not any("merged" in k or k.endswith("qkv.base.weight") for k in adapter)
    assert json.loads((run / "config.json").read_text())["method"] == name
    assert eval_run(run, tiny_task, "test",
                    runtime=Runtime(workers=0, progress=False)) == pytest.approx(metrics["test_accuracy"])


@pytest.mark.parametrize("name", ["vpt", "vqt+vpt"])
def test_prompts_stay_out_of_a_global_pool(name):
    """On a global-pool backbone (MAE) the final feature is the mean of the patch tokens, not of the prompts."""
    backbone = tiny_vit(global_pool=True)
    method = build_method(name, backbone, 4, {"prompts": 3}).eval()
    images = _images(2)
    with torch.no_grad():
        x = backbone.run_blocks(backbone.embed(images), method.prompts.before_block)
        pooled = backbone.norm(x[:, 1 + 3 :].mean(1))  # class token, 3 prompts, then the patches
        assert x.shape[1] == 1 + 3 + 16
        if name == "vpt":
            torch.testing.assert_close(method(images), method.head(pooled))
        else:
            torch.testing.assert_close(method.head_input(images)[:, :48], F.normalize(pooled, dim=-1))


def test_vpt_refuses_a_rope_backbone():
    with pytest.raises(ConfigError, match="vpt on tiny: its prompts would sit among the tokens"):
        build_method("vpt", tiny_rope("dinov3"), 3, {})
