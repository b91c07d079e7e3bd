"""load_backbone: Hugging Face and timm formats, hub names from an offline cache, in-memory models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import DINOV2_SMALL, require_shared, tiny_vit
from querytune.backbones import load_backbone, save_backbone
from querytune.backbones.hf_format import HF_DEFAULTS
from querytune.backbones.vit import VisionTransformer, ViTConfig
from querytune.errors import CheckpointError, ConfigError

# Small Hugging Face configs: native 48 px (6x6 grid); 32 px exercises downsampling the position embeddings.
HF_SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 48, "patch_size": 8}
HF_KINDS = {  # kind -> (config class, model class, extra config)
    "vit": ("ViTConfig", "ViTModel", {"intermediate_size": 96}),
    "deit": ("DeiTConfig", "DeiTModel", {"intermediate_size": 96}),
    "dinov2": ("Dinov2Config", "Dinov2Model", {"mlp_ratio": 2}),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {"mlp_ratio": 2}),
}


def hf_model(kind: str, model_class: str | None = None) -> nn.Module:
    """A small random transformers model whose norms and LayerScales are not at their init values."""
    transformers = pytest.importorskip("transformers")
    config_class, default_class, extra = HF_KINDS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**HF_SMALL, **extra)
    model = getattr(transformers, model_class or default_class)(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def assert_matches_hf(ours: VisionTransformer, hf: nn.Module, size: int, atol: float = 1e-5, **hf_kwargs) -> None:
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = hf(pixel_values=images, **hf_kwargs).last_hidden_state
        torch.testing.assert_close(ours.forward_features(images), expected, atol=atol, rtol=0)


def assert_same_model(ours: VisionTransformer, reference: VisionTransformer) -> None:
    images = torch.randn(2, 3, reference.config.image_size, reference.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), reference.forward_features(images), atol=0, rtol=0)


# ---------------------------------------------------------------- Hugging Face


@pytest.mark.integration
def test_shared_dinov2_matches_transformers():
    transformers = pytest.importorskip("transformers")
    path = require_shared(DINOV2_SMALL)
    ours = load_backbone(path)
    hf = transformers.Dinov2Model.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.config.name == "dinov2-small-imgfocus"
    assert (ours.config.image_size, ours.config.grid_size, ours.config.layer_scale) == (518, 37, True)
    for size in (224, 140):
        assert_matches_hf(ours, hf, size, atol=1e-4)


@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_hf_folder_matches_transformers(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / kind)
    ours = load_backbone(tmp_path / kind)
    assert ours.config.name == kind
    # no preprocessor config: DINOv2's own normalisation is known; a ViT's or DeiT's is not guessed
    assert ours.config.mean == ((0.485, 0.456, 0.406) if kind.startswith("dinov2") else None)
    assert_matches_hf(ours, hf, 48)
    # ViT and DeiT only resample position embeddings when asked; DINOv2 always does
    assert_matches_hf(ours, hf, 32, **({"interpolate_pos_encoding": True} if kind in ("vit", "deit") else {}))


def test_hf_classifier_folder_with_pytorch_bin(tmp_path):
    hf = hf_model("vit", "ViTForImageClassification")
    hf.save_pretrained(tmp_path)
    # transformers 5 saves safetensors only: write the legacy .bin ourselves
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    ours = load_backbone(tmp_path)
    assert (ours.config.mean, ours.config.std) == ((0.5,) * 3, (0.5,) * 3)
    assert_matches_hf(ours, hf.vit, 48)
    half = load_backbone(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in half.parameters())
    assert not half.training


@pytest.mark.parametrize("kind,model_class", [("vit", "ViTForImageClassification"),
                                              ("dinov2_with_registers", None)])
def test_transformers_model_object(kind, model_class):
    hf = hf_model(kind, model_class)
    ours = load_backbone(hf)
    assert_matches_hf(ours, getattr(hf, "vit", hf), 48)
    assert all(p.requires_grad for p in hf.parameters())  # the source model is left as it was


def test_hf_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    for kind, (config_class, _, _) in HF_KINDS.items():
        defaults = getattr(transformers, config_class)().to_dict()
        assert {key: defaults[key] for key in HF_DEFAULTS[kind]} == HF_DEFAULTS[kind], kind


@pytest.mark.parametrize("change,message", [({"hidden_act": "silu"}, "hidden_act"),
                                            ({"model_type": "beit"}, "model_type")])
def test_hf_unsupported_configs(change, message, tmp_path):
    hf_model("dinov2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        load_backbone(tmp_path)


def test_hf_folder_rejects_model_name(tmp_path):
    hf_model("vit").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model_name"):
        load_backbone(tmp_path, model_name="vit_base_patch16_224")


def test_image_size_resamples_once_as_at_run_time(tmp_path):
    hf_model("dinov2_with_registers").save_pretrained(tmp_path)
    native, resized = load_backbone(tmp_path), load_backbone(tmp_path, image_size=32)
    assert resized.config.image_size == 32 and resized.pos_embed.shape[1] == 1 + 4 * 4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(resized.forward_features(images), native.forward_features(images))
    with pytest.raises(ConfigError, match="patch size 8"):
        load_backbone(tmp_path, image_size=30)


# ---------------------------------------------------------------- timm format

TIMM_CASES = {  # timm name -> our ViTConfig for a checkpoint of that architecture (small grids: fast)
    "vit_tiny_patch16_224": {"embed_dim": 192, "depth": 12, "num_heads": 3, "image_size": 64},
    "deit_tiny_distilled_patch16_224": {"embed_dim": 192, "depth": 12, "num_heads": 3, "image_size": 64,
                                        "num_reg_tokens": 1, "pos_embed_prefix": 2},
    "vit_small_patch14_reg4_dinov2": {"embed_dim": 384, "depth": 12, "num_heads": 6, "image_size": 56,
                                      "patch_size": 14, "layer_scale": True, "num_reg_tokens": 4,
                                      "pos_embed_prefix": 0},
}


def timm_checkpoint(model_name: str) -> tuple[VisionTransformer, dict[str, torch.Tensor]]:
    """A random ViT and its state dict as timm writes it (classifier head, DeiT's dist_token)."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**TIMM_CASES[model_name]))
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    if "distilled" in model_name:
        state["dist_token"] = state.pop("reg_token")
    width = model.config.embed_dim
    state.update({"head.weight": torch.randn(10, width), "head.bias": torch.zeros(10)})
    return model, state


@pytest.mark.parametrize("model_name", list(TIMM_CASES))
def test_timm_checkpoint_with_model_name_and_refused_without(model_name, tmp_path):
    """The head count is not in a timm checkpoint's weights: without its architecture's name the file is
    refused, never loaded with a guessed head count."""
    reference, state = timm_checkpoint(model_name)
    safetensors_path, pth_path = tmp_path / "weights.safetensors", tmp_path / "weights.pth"
    save_file(state, str(safetensors_path))
    torch.save({"model": {f"module.{key}": tensor for key, tensor in state.items()}}, pth_path)
    for path in (safetensors_path, pth_path):
        named = load_backbone(path, model_name=f"{model_name}.some_tag")
        with pytest.raises(CheckpointError, match=r"weights\.(safetensors|pth): the number of attention heads of a "
                                                  r"width-\d+ ViT cannot be told from its weights"):
            load_backbone(path)
        for ours in (named,):
            assert ours.config.name == path.name
            assert ours.config.pos_embed_antialias
            for field in ("embed_dim", "depth", "num_heads", "layer_scale", "num_reg_tokens", "pos_embed_prefix",
                          "image_size"):
                assert getattr(ours.config, field) == getattr(reference.config, field), field
            assert_same_model(ours, reference)
    assert named.config.mean == ((0.5,) * 3 if model_name.startswith("vit_tiny") else (0.485, 0.456, 0.406))


def test_original_dinov2_layout(tmp_path):
    """facebookresearch/dinov2 checkpoints: register_tokens, mask_token, and a class-token position."""
    torch.manual_seed(0)
    reference = VisionTransformer(ViTConfig(embed_dim=192, depth=12, num_heads=3, image_size=56, patch_size=14,
                                            layer_scale=True, num_reg_tokens=4, pos_embed_prefix=1))
    state = dict(reference.state_dict(), mask_token=torch.zeros(1, 192))
    state["register_tokens"] = state.pop("reg_token")
    path = tmp_path / "dinov2_vitt14_reg4_pretrain.pth"
    torch.save(state, path)
    ours = load_backbone(path, model_name="vit_tiny_patch14_reg4_dinov2")
    assert (ours.config.num_reg_tokens, ours.config.pos_embed_prefix) == (4, 1)
    assert_same_model(ours, reference)


def test_timm_checkpoint_key_errors(tmp_path):
    _, state = timm_checkpoint("vit_tiny_patch16_224")
    state["blocks.1.attn.qkv_w"] = state.pop("blocks.1.attn.qkv.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"renamed\.safetensors.*missing blocks\.1\.attn\.qkv\.weight; "
                                              r"unexpected blocks\.1\.attn\.qkv_w"):
        load_backbone(path, model_name="vit_tiny_patch16_224")


def test_timm_checkpoint_file_errors(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty.pth: empty file"):
        load_backbone(empty)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.safetensors: unreadable"):
        load_backbone(garbage)

    _, small = timm_checkpoint("vit_small_patch14_reg4_dinov2")
    path = tmp_path / "small.safetensors"
    save_file(small, str(path))
    with pytest.raises(CheckpointError, match=r"small\.safetensors: .* has shape .*384.* expects .*768"):
        load_backbone(path, model_name="vit_base_patch14_reg4_dinov2")
    with pytest.raises(ConfigError, match="'beit_base_patch16_224' is not supported"):
        load_backbone(path, model_name="beit_base_patch16_224")



def test_unknown_width_needs_model_name_or_saved_config(tmp_path):
    reference = tiny_vit(layer_scale=True, num_reg_tokens=2)  # width 48 with 4 heads: not a standard size
    bare = tmp_path / "bare.safetensors"
    save_file(reference.state_dict(), str(bare))
    with pytest.raises(CheckpointError, match="bare.safetensors: the number of attention heads of a width-48 ViT "
                                              "cannot be told"):
        load_backbone(bare)

    saved = tmp_path / "saved.safetensors"
    save_backbone(reference, saved)
    ours = load_backbone(saved)  # the config travels in the metadata: nothing inferred, no warning
    assert ours.config.to_dict() == {**reference.config.to_dict(), "name": "saved.safetensors"}
    assert_same_model(ours, reference)


def test_hf_weights_file_given_alone(tmp_path):
    hf_model("vit").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="a Hugging Face checkpoint; load the folder"):
        load_backbone(tmp_path / "model.safetensors")


class TimmLike(nn.Module):
    """Quacks like a timm VisionTransformer (timm itself cannot be imported here)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.cls_token, self.reg_token, self.pos_embed = vit.cls_token, vit.reg_token, vit.pos_embed
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        self.head = nn.Linear(vit.num_features, 5)
        self.pretrained_cfg = {"architecture": "vit_custom", "tag": "test", "mean": [0.5] * 3, "std": [0.5] * 3}


def test_timm_model_object():
    reference = tiny_vit(layer_scale=True, num_reg_tokens=2)
    ours = load_backbone(TimmLike(reference))  # width 48: the head count comes from the object
    assert ours.config.name == "vit_custom.test"
    assert ours.config.mean == (0.5,) * 3
    assert_same_model(ours, reference)


def test_vision_transformer_is_returned_cast_and_frozen():
    model = tiny_vit().train().requires_grad_(True)
    assert load_backbone(model, dtype=torch.float16) is model
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in model.parameters())
    assert not model.training and model.config.name == "tiny"


# ---------------------------------------------------------------- hub names


def test_hub_names_resolve_from_offline_cache(offline_hub):
    reference, state = timm_checkpoint("vit_tiny_patch16_224")
    timm_repo = offline_hub("timm/vit_tiny_patch16_224.augreg_in21k")
    save_file(state, str(timm_repo / "model.safetensors"))
    (timm_repo / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 10,
        "pretrained_cfg": {"tag": "augreg_in21k", "input_size": [3, 224, 224], "mean": [0.4] * 3, "std": [0.3] * 3},
    }))
    ours = load_backbone("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")  # timm's spelling works too
    assert ours.config.name == "timm/vit_tiny_patch16_224.augreg_in21k"
    assert (ours.config.mean, ours.config.std) == ((0.4,) * 3, (0.3,) * 3)
    assert_same_model(ours, reference)
    bare = load_backbone("vit_tiny_patch16_224.augreg_in21k")  # a bare timm name means timm/<name>
    assert bare.config.name == "timm/vit_tiny_patch16_224.augreg_in21k"
    assert_same_model(bare, reference)

    hf = hf_model("dinov2")
    hf.save_pretrained(offline_hub("facebook/dinov2-test"))
    ours = load_backbone("facebook/dinov2-test")
    assert ours.config.name == "facebook/dinov2-test"
    assert_matches_hf(ours, hf, 48)


def test_missing_sources_fail_clearly(offline_hub):
    with pytest.raises(CheckpointError, match="org/missing: .*not found locally and could not be downloaded"):
        load_backbone("org/missing")
    for local in ("./nope/model.safetensors", "weights/model.safetensors", "../nope"):
        with pytest.raises(CheckpointError, match=f"{local}: no such file or directory"):
            load_backbone(local)


# ---------------------------------------------------------------- .npz (Google ViT, as VPT and VQT load it)


def jax_attention(prefix: str, qkv_weight: np.ndarray, qkv_bias: np.ndarray, out_weight: np.ndarray,
                  out_bias: np.ndarray, heads: int) -> dict[str, np.ndarray]:
    """An attention's arrays as the JAX checkpoints (ViT .npz, big_vision) hold them: kernels (in, heads,
    head_dim) for query, key and value, (heads, head_dim, out) for the output."""
    width = out_weight.shape[0]
    arrays = {}
    for j, part in enumerate(("query", "key", "value")):
        rows = slice(j * width, (j + 1) * width)
        arrays[f"{prefix}/{part}/kernel"] = qkv_weight[rows].T.reshape(width, heads, width // heads)
        arrays[f"{prefix}/{part}/bias"] = qkv_bias[rows].reshape(heads, width // heads)
    arrays[f"{prefix}/out/kernel"] = out_weight.T.reshape(heads, width // heads, width)
    arrays[f"{prefix}/out/bias"] = out_bias
    return arrays


def write_npz_checkpoint(model: VisionTransformer, path: Path, prefix: str = "", extra: bool = False) -> None:
    """``model`` written in the key layout of the JAX ViT checkpoints (ViT-B_16.npz), independently of the
    loader: kernels (in, out), attention kernels (in, heads, head_dim) and (heads, head_dim, out)."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    width, heads = model.config.embed_dim, model.config.num_heads
    arrays = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
    }
    for i in range(model.config.depth):
        block, attn = f"Transformer/encoderblock_{i}", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1"
        arrays.update(jax_attention(attn, *(state[f"blocks.{i}.attn.{name}"] for name in
                                            ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")), heads))
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            arrays[f"{block}/{theirs}/scale"] = state[f"blocks.{i}.{ours}.weight"]
            arrays[f"{block}/{theirs}/bias"] = state[f"blocks.{i}.{ours}.bias"]
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            arrays[f"{block}/MlpBlock_3/{theirs}/kernel"] = state[f"blocks.{i}.mlp.{ours}.weight"].T
            arrays[f"{block}/MlpBlock_3/{theirs}/bias"] = state[f"blocks.{i}.mlp.{ours}.bias"]
    if extra:  # what in21k checkpoints also hold: the representation layer and a classifier
        arrays.update({"pre_logits/kernel": np.eye(width, dtype=np.float32),
                       "pre_logits/bias": np.zeros(width, np.float32),
                       "head/kernel": np.zeros((width, 7), np.float32), "head/bias": np.zeros(7, np.float32)})
    np.savez(path, **{prefix + key: value for key, value in arrays.items()})


@pytest.mark.parametrize(("prefix", "extra"), [("", False), ("opt/target/", True)])
def test_npz_checkpoint_round_trip(prefix, extra, tmp_path):
    torch.manual_seed(0)
    reference = VisionTransformer(ViTConfig(embed_dim=96, depth=3, num_heads=6, patch_size=8, image_size=32))
    path = tmp_path / "ViT-T_8.npz"
    write_npz_checkpoint(reference, path, prefix, extra)
    ours = load_backbone(path)
    assert (ours.config.embed_dim, ours.config.depth, ours.config.num_heads, ours.config.patch_size) == (96, 3, 6, 8)
    assert (ours.config.mean, ours.config.std) == (None, None)  # VPT/VQT use ImageNet's with it, SSF 0.5/0.5
    assert_same_model(ours, reference)


def test_npz_checkpoint_errors(tmp_path):
    torch.manual_seed(0)
    reference = VisionTransformer(ViTConfig(embed_dim=48, depth=2, num_heads=4, patch_size=8, image_size=32))
    path = tmp_path / "vit.npz"
    write_npz_checkpoint(reference, path)
    arrays = dict(np.load(path))
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    np.savez(tmp_path / "torn.npz", **arrays)
    with pytest.raises(CheckpointError, match="torn.npz: Transformer/encoderblock_1/LayerNorm_2/scale missing"):
        load_backbone(tmp_path / "torn.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="other.npz: no embedding/kernel; not a ViT .npz checkpoint"):
        load_backbone(tmp_path / "other.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="garbage.npz: unreadable .npz checkpoint"):
        load_backbone(tmp_path / "garbage.npz")


def big_vision_arrays(model: VisionTransformer, scanned: bool) -> dict[str, np.ndarray]:
    """``model``'s arrays in big_vision's layout (google-research/big_vision, models/vit.py), written
    independently of the loader: ``pos_embedding`` at the top, blocks' LayerNorm_0/1, MultiHeadDotProductAttention_0
    and MlpBlock_0, a MAP head (MAPHead_0) where the model pools by one; a scanned encoder stacks the blocks."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    width, heads = model.config.embed_dim, model.config.num_heads

    def attention(prefix: str, weight: np.ndarray, bias: np.ndarray, out: str) -> dict[str, np.ndarray]:
        return jax_attention(prefix, weight, bias, state[f"{out}.weight"], state[f"{out}.bias"], heads)

    def dense(prefix: str, ours: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/kernel": state[f"{ours}.weight"].T, f"{prefix}/bias": state[f"{ours}.bias"]}

    arrays = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": np.zeros((width, 7), np.float32), "head/bias": np.zeros(7, np.float32),
    }
    if "cls_token" in state:
        arrays["cls"] = state["cls_token"]
    if "attn_pool.latent" in state:
        kv_weight, kv_bias = state["attn_pool.kv.weight"], state["attn_pool.kv.bias"]
        arrays.update({
            "MAPHead_0/probe": state["attn_pool.latent"],
            "MAPHead_0/LayerNorm_0/scale": state["attn_pool.norm.weight"],
            "MAPHead_0/LayerNorm_0/bias": state["attn_pool.norm.bias"],
            **attention("MAPHead_0/MultiHeadDotProductAttention_0", np.concatenate([state["attn_pool.q.weight"],
                                                                                    kv_weight]),
                        np.concatenate([state["attn_pool.q.bias"], kv_bias]), "attn_pool.proj"),
            **dense("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1"),
            **dense("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2"),
        })
    blocks = []
    for i in range(model.config.depth):
        blocks.append({
            "LayerNorm_0/scale": state[f"blocks.{i}.norm1.weight"], "LayerNorm_0/bias": state[f"blocks.{i}.norm1.bias"],
            "LayerNorm_1/scale": state[f"blocks.{i}.norm2.weight"], "LayerNorm_1/bias": state[f"blocks.{i}.norm2.bias"],
            **attention("MultiHeadDotProductAttention_0", state[f"blocks.{i}.attn.qkv.weight"],
                        state[f"blocks.{i}.attn.qkv.bias"], f"blocks.{i}.attn.proj"),
            **dense("MlpBlock_0/Dense_0", f"blocks.{i}.mlp.fc1"), **dense("MlpBlock_0/Dense_1", f"blocks.{i}.mlp.fc2"),
        })
    if scanned:
        arrays.update({f"Transformer/encoderblock/{key}": np.stack([block[key] for block in blocks])
                       for key in blocks[0]})
    else:
        arrays.update({f"Transformer/encoderblock_{i}/{key}": value
                       for i, block in enumerate(blocks) for key, value in block.items()})
    return arrays


@pytest.mark.parametrize(("prefix", "scanned", "kind"), [("params/img/", False, "siglip"),
                                                         ("params/img/", True, "siglip"), ("params/", True, "vit")])
def test_big_vision_npz_is_read(prefix, scanned, kind, tmp_path):
    """big_vision's layout: a ViT (``params/``) or SigLIP's image tower (``params/img/``, beside the text tower
    and the logit scale and bias, which are left out), its blocks one by one or scanned; its MLPs' GELU is tanh's."""
    from conftest import tiny_siglip

    reference = (tiny_siglip(act="gelu_tanh") if kind == "siglip" else tiny_vit(act="gelu_tanh"))
    arrays = {prefix + key: value for key, value in big_vision_arrays(reference, scanned).items()}
    if prefix == "params/img/":
        arrays.update({"params/t": np.ones(1, np.float32), "params/b": np.zeros(1, np.float32),
                       "params/txt/Embed_0/embedding": np.zeros((5, 48), np.float32)})
    path = tmp_path / "siglip.npz"
    np.savez(path, **arrays)
    ours = load_backbone(path)
    assert (ours.config.num_heads, ours.config.act, ours.config.class_token) == (4, "gelu_tanh", kind == "vit")
    assert_same_model(ours, reference)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), atol=0, rtol=0)  # the pooled (MAP) feature


def test_big_vision_npz_that_averages_its_tokens_is_refused(tmp_path):
    arrays = big_vision_arrays(tiny_vit(), scanned=True)
    del arrays["cls"]
    np.savez(tmp_path / "gap.npz", **{"params/" + key: value for key, value in arrays.items()})
    with pytest.raises(CheckpointError, match=r"gap\.npz: neither a class token \(cls\) nor a MAP head"):
        load_backbone(tmp_path / "gap.npz")


# ---------------------------------------------------------------- MAE: global pooling through fc_norm


def test_mae_checkpoint_pools_the_patch_tokens_through_fc_norm(tmp_path):
    """MAE's fine-tuned layout (``{"model": ...}`` with ``fc_norm`` and no final ``norm``): the final
    feature is fc_norm(mean of the patch tokens), what VQT's MAE runs read at the head."""
    from querytune.trunk.features import extract_features

    torch.manual_seed(0)
    reference = VisionTransformer(ViTConfig(embed_dim=192, depth=12, num_heads=3, patch_size=16, image_size=32))
    state = {("fc_" + k if k.startswith("norm.") else k): v for k, v in reference.state_dict().items()}
    state.update({"head.weight": torch.randn(5, 192), "head.bias": torch.zeros(5)})
    path = tmp_path / "mae_finetuned_vit_tiny.pth"
    torch.save({"model": state, "epoch": 99}, path)
    ours = load_backbone(path, model_name="vit_tiny_patch16_224.mae")
    assert ours.config.global_pool and ours.config.mean == (0.485, 0.456, 0.406)  # the mae tag's
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = reference.run_blocks(reference.embed(images))  # class token, then 4 patch tokens
        expected = F.layer_norm(tokens[:, 1:].mean(1), (192,), state["fc_norm.weight"], state["fc_norm.bias"], 1e-6)
        torch.testing.assert_close(ours(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(extract_features(ours, images, dtype=torch.float32).pooled, expected,
                                   rtol=1e-5, atol=1e-5)
    saved = tmp_path / "saved.safetensors"  # querytune's own format keeps the pooling
    save_backbone(ours, saved)
    assert load_backbone(saved).config.global_pool


def test_a_bare_timm_checkpoint_trains_with_model_name_and_says_its_input_size(tmp_path, tiny_task):
    """``--model-name`` gives a bare timm file its head count; the run's first line and config.json say the
    input size and where it came from; the run reloads (eval) with the recorded name."""
    import subprocess
    import sys

    from querytune import eval_run

    torch.manual_seed(0)
    bare = tmp_path / "bare.safetensors"
    model = VisionTransformer(ViTConfig(embed_dim=192, depth=12, num_heads=3, patch_size=16, image_size=32))
    save_file(model.state_dict(), str(bare))
    info = subprocess.run([sys.executable, "-m", "querytune", "info", "--backbone", str(bare), "--model-name",
                           "vit_tiny_patch16_224"], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    result = subprocess.run([sys.executable, "-m", "querytune", "train", "--method", "linear", "--backbone", str(bare),
                             "--model-name", "vit_tiny_patch16_224", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                             "--data", str(tiny_task), "--out", str(tmp_path / "run"), "--epochs", "1",
                             "--batch-size", "8", "--image-size", "32", "--workers", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = "input 32x32 px (--image-size, given; the backbone's native 32x32)"
    assert result.stderr.splitlines()[0] == line
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backbone"]["model_name"] == "vit_tiny_patch16_224"
    assert config["input_size"] == line.removeprefix("input ")
    assert 0 <= eval_run(tmp_path / "run", tiny_task) <= 1  # reloads the bare file with the recorded name


def test_the_cache_key_includes_the_architecture():
    """CacheKey's backbone part is the backbone fingerprint, which hashes ViTConfig.to_dict() with the weights:
    two backbones with equal weights and another architecture (here only RoPE) have other fingerprints. The
    fields added for the RoPE families are left out of a plain ViT's dict, so its fingerprint, and the cache
    entries named by it, stay as they were."""
    from querytune.trunk.cache import backbone_fingerprint

    plain = tiny_vit()
    rotary = VisionTransformer(ViTConfig(**{**plain.config.to_dict(), "rope": "eva"}))
    rotary.load_state_dict(plain.state_dict())
    assert backbone_fingerprint(plain) != backbone_fingerprint(rotary)
    assert not {"rope", "rope_temperature", "rope_grid", "absolute_pos_embed", "mlp_norm"} & set(plain.config.to_dict())
    assert ViTConfig.from_dict(rotary.config.to_dict()) == rotary.config


def test_families_with_equal_weight_shapes_have_other_cache_keys():
    """CLIP's quick_gelu, gelu_new's tanh GELU and the exact GELU (or CLIP's pre-norm eps) change no weight
    shape, only the features: the same weights under each are other backbones to the feature cache."""
    from querytune.trunk.cache import backbone_fingerprint

    plain = tiny_vit()
    fingerprints = {backbone_fingerprint(plain)}
    for change in ({"act": "quick_gelu"}, {"act": "gelu_tanh"}, {"norm_eps": 1e-5}):
        other = VisionTransformer(ViTConfig(**{**plain.config.to_dict(), **change}))
        other.load_state_dict(plain.state_dict())
        fingerprints.add(backbone_fingerprint(other))
    assert len(fingerprints) == 4
