"""SSF: the official formulation (op(x) * scale + shift at each place) against the method, what trains,
the merged export and the optimiser's weight-decay groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from conftest import tiny_vit
from querytune.backbones import load_backbone
from querytune.backbones.vit import VisionTransformer
from querytune.errors import ConfigError
from querytune.export import write_merged
from querytune.methods import build_method
from querytune.methods.ssf import SSF
from querytune.methods.vqt import NEG_INF, naive_block, naive_block_parts
from querytune.train import TrainConfig, make_optimizer

IMAGES = 32
BLOCK_PLACES = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


def _images(batch: int = 3, seed: int = 0, size: int = IMAGES) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _places(depth: int) -> list[str]:
    return ["patch_embed.proj", "norm"] + [f"blocks.{i}.{place}" for i in range(depth) for place in BLOCK_PLACES]


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _randomise(method) -> None:
    """Scales and shifts well away from their initialisation near (1, 0), so that they matter."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in method.named_parameters():
            if name.endswith(".scale"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".shift"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def official_ssf_logits(plain: VisionTransformer, ssf: dict[str, tuple[Tensor, Tensor]], head, images: Tensor
                        ) -> Tensor:
    """The official formulation on a plain ViT's weights: each place's output y becomes y * scale + shift
    over its channel axis (``ssf[place]``); written out from the weights, apart from the package's modules."""

    def ada(y: Tensor, place: str) -> Tensor:
        scale, shift = ssf[place]
        return y * scale + shift

    config = plain.config
    dim, heads = config.embed_dim, config.num_heads
    proj = plain.patch_embed.proj
    patches = F.conv2d(images, proj.weight, proj.bias, stride=config.patch_size).flatten(2).transpose(1, 2)
    patches = ada(patches, "patch_embed.proj")  # per output channel of the conv, on the patch tokens
    assert config.pos_embed_prefix == 1
    batch = images.shape[0]
    prefix = [plain.cls_token.expand(batch, -1, -1) + plain.pos_embed[:, :1]]
    if plain.reg_token is not None:
        prefix.append(plain.reg_token.expand(batch, -1, -1))
    x = torch.cat([*prefix, patches + plain.pos_embed[:, 1:]], dim=1)
    for index, block in enumerate(plain.blocks):
        def at(place: str, y: Tensor, index: int = index) -> Tensor:
            return ada(y, f"blocks.{index}.{place}")

        def gamma(ls) -> Tensor | float:
            return ls.gamma if config.layer_scale else 1.0

        u = at("norm1", F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps))
        qkv = at("attn.qkv", F.linear(u, block.attn.qkv.weight, block.attn.qkv.bias))
        q, k, v = (t.unflatten(-1, (heads, dim // heads)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attended = ((q @ k.transpose(-1, -2) * (dim // heads) ** -0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)
        a = x + at("attn.proj", F.linear(attended, block.attn.proj.weight, block.attn.proj.bias)) * gamma(block.ls1)
        h = at("norm2", F.layer_norm(a, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps))
        h = F.gelu(at("mlp.fc1", F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)))
        x = a + at("mlp.fc2", F.linear(h, block.mlp.fc2.weight, block.mlp.fc2.bias)) * gamma(block.ls2)
    final = ada(F.layer_norm(x, (dim,), plain.norm.weight, plain.norm.bias, plain.norm.eps), "norm")  # all tokens
    return head(final[:, 0])


VARIANTS = [{}, {"layer_scale": True, "num_reg_tokens": 1}, {"qkv_bias": False}]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_the_method_is_the_official_formulation(variant, train_mode):
    plain = tiny_vit(**variant)
    method = build_method("ssf", tiny_vit(**variant), 5, {}).train(train_mode)
    _randomise(method)
    ssf = {place: (_module(method.backbone, place).scale, _module(method.backbone, place).shift)
           for place in _places(plain.config.depth)}
    images = _images()
    with torch.no_grad():
        expected = official_ssf_logits(plain, ssf, method.head, images)
        torch.testing.assert_close(method(images), expected, rtol=1e-4, atol=1e-5)


def test_the_initialisation_is_near_identity():
    method = build_method("ssf", tiny_vit(embed_dim=96, depth=4), 5, {})
    scales = torch.cat([p.flatten() for n, p in method.named_parameters() if n.endswith(".scale")])
    shifts = torch.cat([p.flatten() for n, p in method.named_parameters() if n.endswith(".shift")])
    assert scales.numel() == shifts.numel() > 3000
    # N(1, 0.02) and N(0, 0.02): the means within ~10 standard errors, the spreads within 10 %
    assert abs(scales.mean().item() - 1) < 0.004 and abs(shifts.mean().item()) < 0.004
    assert 0.018 < scales.std().item() < 0.022 and 0.018 < shifts.std().item() < 0.022


def test_only_the_scales_shifts_and_head_train():
    backbone = tiny_vit(layer_scale=True)
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    method = build_method("ssf", backbone, 5, {}).train()
    config = backbone.config
    expected = {f"backbone.{place}.{kind}" for place in _places(config.depth) for kind in ("scale", "shift")}
    assert set(method.trainable_state_dict()) == expected | {"head.weight", "head.bias"}
    dim, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    per_block = sum(p.numel() for n, p in backbone.blocks[1].named_parameters() if p.requires_grad)
    assert per_block == 2 * (dim + 3 * dim + dim + dim + hidden + dim)  # norm1, qkv, proj, norm2, fc1, fc2
    assert method.num_trainable_params() == config.depth * per_block + 2 * 2 * dim + dim * 5 + 5

    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(method(_images()), torch.tensor([0, 1, 2])).backward()
    for name, param in method.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    # the backbone's own weights are untouched; they are kept under .base of each adapted module
    state = {name.replace(".base.", "."): t for name, t in backbone.state_dict().items()
             if not name.endswith((".scale", ".shift"))}
    assert state.keys() == before.keys()
    assert all(torch.equal(state[name], before[name]) for name in before)


def test_code_reading_the_weights_sees_the_adapted_operations():
    backbone = tiny_vit(layer_scale=True)
    method = build_method("ssf", backbone, 5, {}).eval()
    _randomise(method)
    block = backbone.blocks[1]
    x, rows = torch.randn(2, 9, 48), torch.randn(2, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(naive_block(block, x), block(x), rtol=1e-4, atol=1e-5)  # reads .weight/.bias/.eps
        # forward_rows folds the qkv weight's parts; the rows against [tokens; rows], the tokens not reading them
        mask = torch.zeros(12, 12)
        mask[:9, 9:] = NEG_INF
        expected = naive_block_parts(block, torch.cat([x, rows], dim=1), mask)[0][:, 9:]
        out = block.forward_rows(rows, block.norm1(x), extra=rows).out
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS + [{"global_pool": True}])
def test_the_merged_export_is_a_plain_vit_with_the_same_logits(variant, tmp_path):
    method = build_method("ssf", tiny_vit(**variant), 5, {}).eval()
    _randomise(method)
    write_merged(method, 40, tmp_path / "model.safetensors")  # resampled position embeddings, as a run at 40 px
    plain = load_backbone(tmp_path / "model.safetensors")  # strict keys: a plain ViT
    state = load_file(tmp_path / "model.safetensors")
    assert plain.config.qkv_bias and "blocks.0.attn.qkv.bias" in state  # the qkv shift is its bias
    images = _images(size=40)
    with torch.no_grad():
        logits = plain(images) @ state["head.weight"].T + state["head.bias"]
        torch.testing.assert_close(logits, method(images), rtol=1e-4, atol=1e-5)


def test_a_backbone_takes_ssf_once_and_no_other_adapters():
    backbone = tiny_vit()
    build_method("ssf", backbone, 5, {})
    with pytest.raises(ConfigError, match="already carries SSF"):
        build_method("ssf", backbone, 5, {})
    lora = tiny_vit()
    build_method("lora", lora, 5, {})
    with pytest.raises(ConfigError, match="freshly loaded"):
        build_method("ssf", lora, 5, {})


def test_one_dimensional_parameters_get_no_weight_decay():
    method = build_method("ssf", tiny_vit(), 5, {})
    params = [p for p in method.parameters() if p.requires_grad]
    cfg = TrainConfig.for_method(SSF, {})
    assert (cfg.lr, cfg.weight_decay, cfg.min_lr, cfg.optimizer) == (5e-3, 5e-5, 1e-8, "adamw")
    decayed, exempt = make_optimizer(params, cfg, SSF.decay_vectors).param_groups
    assert [p.shape for p in decayed["params"]] == [method.head.weight.shape] and decayed["weight_decay"] == 5e-5
    assert len(exempt["params"]) == len(params) - 1 and exempt["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in exempt["params"])
    (group,) = make_optimizer(params, cfg, decay_vectors=True).param_groups
    assert len(group["params"]) == len(params) and group["weight_decay"] == 5e-5


def test_lora_on_an_ssf_backbone_is_refused():
    backbone = tiny_vit()
    build_method("ssf", backbone, 5, {})
    with pytest.raises(ConfigError, match="already carries"):
        build_method("lora", backbone, 5, {})
