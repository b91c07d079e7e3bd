"""The ViT families beyond plain ViT/DeiT/DINOv2, each loaded from a folder written by transformers'
``save_pretrained`` and compared with transformers' own model: tiny random models with every weight
perturbed (so that a wrong mapping shows), all tokens and the pooled feature, at the native input size
and another one, max |diff| <= 1e-5 in float32."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from conftest import perturbed
from querytune.backbones import load_backbone
from querytune.backbones.hf_format import HF_DEFAULTS
from querytune.backbones.vit import VisionTransformer, ViTConfig
from querytune.errors import CheckpointError

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
         "intermediate_size": 96}
NATIVE, OTHER = 48, 32  # a 6x6 grid, and a 4x4 one (position embeddings resampled)
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}


class Case:
    """A family: how to build its transformers model, and what that model answers for images
    (all tokens, and where they are taken before the final norm; the pooled feature)."""

    def __init__(self, build: Callable[[], nn.Module], run: Callable[[nn.Module, Tensor, bool], tuple[Tensor, Tensor]],
                 tokens_normed: bool = True) -> None:
        self.build, self.run, self.tokens_normed = build, run, tokens_normed


def vision_config(name: str, **extra) -> object:
    fields = {**SMALL, **extra}
    if name != "Siglip2VisionConfig":
        fields.setdefault("image_size", NATIVE)
    return getattr(transformers, name)(**fields)


def class_token_run(model, images, resize):
    tokens = model(pixel_values=images, interpolate_pos_encoding=resize).last_hidden_state
    return tokens, tokens[:, 0]


def pooled_run(model, images, resize):
    out = model(pixel_values=images, interpolate_pos_encoding=resize)
    return out.last_hidden_state, out.pooler_output


def dinov2_run(model, images, resize):
    out = model(pixel_values=images)
    return out.last_hidden_state, out.pooler_output


def mae_run(model, images, resize):
    """MAE with its random patch shuffling off: noise 0, 1, 2, ... keeps the patches in order."""
    patches = (images.shape[-1] // SMALL["patch_size"]) ** 2
    noise = torch.arange(patches, dtype=torch.float32).expand(images.shape[0], -1)
    tokens = model(pixel_values=images, noise=noise, interpolate_pos_encoding=resize).last_hidden_state
    return tokens, tokens[:, 0]


def siglip2_run(model, images, resize):
    """SigLIP 2 reads patches flattened as (row, column, channel), with their grid shape."""
    batch, channels, height, width = images.shape
    side = SMALL["patch_size"]
    patches = images.reshape(batch, channels, height // side, side, width // side, side)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, -1, side * side * channels)
    shapes = torch.tensor([[height // side, width // side]] * batch)
    out = model(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
                spatial_shapes=shapes)
    return out.last_hidden_state, out.pooler_output


def full_model(model_class: str, config_class: str, vision: dict) -> nn.Module:
    config = getattr(transformers, config_class)(vision_config={**SMALL, "image_size": NATIVE, **vision},
                                                 text_config=TEXT)
    return getattr(transformers, model_class)(config)


CASES = {
    "clip_vision_model": Case(lambda: transformers.CLIPVisionModel(vision_config("CLIPVisionConfig")),
                              pooled_run, tokens_normed=False),
    "clip": Case(lambda: full_model("CLIPModel", "CLIPConfig", {}), lambda m, x, r: pooled_run(m.vision_model, x, r),
                 tokens_normed=False),
    "siglip_vision_model": Case(lambda: transformers.SiglipVisionModel(vision_config("SiglipVisionConfig")),
                                pooled_run),
    "siglip": Case(lambda: full_model("SiglipModel", "SiglipConfig", {}),
                   lambda m, x, r: pooled_run(m.vision_model, x, r)),
    "siglip2_vision_model": Case(
        lambda: transformers.Siglip2VisionModel(vision_config("Siglip2VisionConfig", num_patches=36)), siglip2_run),
    "vit_mae": Case(lambda: transformers.ViTMAEModel(vision_config("ViTMAEConfig", mask_ratio=0.0)), mae_run),
    "vit_msn": Case(lambda: transformers.ViTMSNModel(vision_config("ViTMSNConfig")), class_token_run),
    "vit_gelu_new": Case(lambda: transformers.ViTModel(vision_config("ViTConfig", hidden_act="gelu_new"),
                                                       add_pooling_layer=False), class_token_run),
    "dinov3_vit": Case(lambda: transformers.DINOv3ViTModel(vision_config(
        "DINOv3ViTConfig", num_register_tokens=2, key_bias=True, layerscale_value=0.5)), dinov2_run),
    "dinov3_vit_gated": Case(lambda: transformers.DINOv3ViTModel(vision_config(
        "DINOv3ViTConfig", use_gated_mlp=True, hidden_act="silu", rope_theta=1000.0)), dinov2_run),
    "dinov2_swiglu": Case(lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        **{k: v for k, v in SMALL.items() if k != "intermediate_size"}, image_size=NATIVE, mlp_ratio=2,
        use_swiglu_ffn=True)), dinov2_run),
}


def saved(case: Case, folder: Path) -> nn.Module:
    torch.manual_seed(0)
    model = perturbed(case.build())
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", list(CASES))
def test_folder_matches_transformers(family, tmp_path):
    case = CASES[family]
    reference = saved(case, tmp_path / family)
    ours = load_backbone(tmp_path / family)
    for size in (NATIVE, OTHER):
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected_tokens, expected_pooled = case.run(reference, images, size != NATIVE)
            tokens = ours.run_blocks(ours.embed(images))
            if case.tokens_normed:
                tokens = ours.norm(tokens)
            torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=0, msg=f"{family} tokens at {size}")
            torch.testing.assert_close(ours(images), expected_pooled, atol=1e-5, rtol=0,
                                       msg=f"{family} pooled at {size}")


def test_family_options_are_read(tmp_path):
    """What each family's folder turns into (the parity above shows the options are right; this names them)."""
    expected = {
        "clip": {"class_token": True, "norm_pre": True, "patch_bias": False, "act": "quick_gelu", "norm_eps": 1e-5,
                 "mean": (0.48145466, 0.4578275, 0.40821073)},
        "siglip_vision_model": {"class_token": False, "map_pool": True, "act": "gelu_tanh", "pos_embed_prefix": 0,
                                "mean": (0.5, 0.5, 0.5)},
        "siglip2_vision_model": {"pos_embed_resize": "bilinear", "image_size": NATIVE},
        "dinov2_swiglu": {"swiglu": True, "layer_scale": True},
        "dinov3_vit": {"rope": "dinov3", "rope_temperature": 100.0, "absolute_pos_embed": False, "num_reg_tokens": 2,
                       "layer_scale": True, "norm_eps": 1e-5, "mean": (0.485, 0.456, 0.406)},
    }
    for family, fields in expected.items():
        saved(CASES[family], tmp_path / family)
        config = load_backbone(tmp_path / family).config
        assert {key: getattr(config, key) for key in fields} == fields, family


def test_in_memory_models_load_too():
    torch.manual_seed(0)
    for family in ("clip", "siglip_vision_model"):
        case = CASES[family]
        reference = perturbed(case.build())
        ours = load_backbone(reference)
        images = torch.randn(2, 3, NATIVE, NATIVE)
        with torch.no_grad():
            torch.testing.assert_close(ours(images), case.run(reference, images, False)[1], atol=1e-5, rtol=0)


def test_hf_defaults_match_transformers():
    classes = {"vit_mae": "ViTMAEConfig", "vit_msn": "ViTMSNConfig", "clip_vision_model": "CLIPVisionConfig",
               "siglip_vision_model": "SiglipVisionConfig", "siglip2_vision_model": "Siglip2VisionConfig",
               "dinov3_vit": "DINOv3ViTConfig"}
    for kind, config_class in classes.items():
        defaults = getattr(transformers, config_class)().to_dict()
        assert {key: defaults[key] for key in HF_DEFAULTS[kind]} == HF_DEFAULTS[kind], kind


def test_siglip_without_its_pooling_head_is_refused(tmp_path):
    saved(CASES["siglip_vision_model"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_use_head": False}))
    with pytest.raises(CheckpointError, match="config.json: a SigLIP vision model without its attention-pooling"):
        load_backbone(tmp_path)


def test_methods_read_the_pooled_feature_of_a_map_model(tmp_path):
    """The frozen trunk's final feature (what the linear probe and VQT's head read) is the MAP head's output."""
    from querytune.trunk.features import extract_features

    case = CASES["siglip_vision_model"]
    reference = saved(case, tmp_path)
    ours: VisionTransformer = load_backbone(tmp_path)
    images = torch.randn(2, 3, NATIVE, NATIVE)
    with torch.no_grad():
        features = extract_features(ours, images, dtype=torch.float32)
        torch.testing.assert_close(features.pooled, case.run(reference, images, False)[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["clip", "siglip2_vision_model", "dinov2_swiglu"])
def test_saved_backbone_keeps_the_family_options(family, tmp_path):
    from querytune.backbones import save_backbone

    saved(CASES[family], tmp_path / family)
    ours = load_backbone(tmp_path / family)
    save_backbone(ours, tmp_path / "saved.safetensors")
    again = load_backbone(tmp_path / "saved.safetensors")
    assert again.config.to_dict() == {**ours.config.to_dict(), "name": "saved.safetensors"}
    images = torch.randn(2, 3, OTHER, OTHER)
    with torch.no_grad():
        torch.testing.assert_close(again(images), ours(images), atol=0, rtol=0)


def querytune_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "querytune", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_info_on_clip_and_siglip_folders(tmp_path):
    for family in ("clip", "siglip_vision_model"):
        saved(CASES[family], tmp_path / family)
        result = querytune_cli("info", "--backbone", tmp_path / family)
        assert result.returncode == 0, result.stderr
        assert "depth (L)" in result.stdout


@pytest.mark.parametrize("family,method", [("siglip_vision_model", "linear"), ("clip", "vqt"), ("clip", "lora")])
def test_cli_trains_on_the_family(family, method, tmp_path, tiny_task):
    """``train`` runs end to end; on SigLIP the linear probe reads the MAP head's pooled feature."""
    saved(CASES[family], tmp_path / family)
    result = querytune_cli("train", "--method", method, "--backbone", tmp_path / family, "--data", tiny_task,
                           "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--image-size", "32",
                           "--workers", "0", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_cli_faults_are_one_line_with_exit_code_2(tmp_path):
    saved(CASES["siglip_vision_model"], tmp_path / "unknown")
    config = json.loads((tmp_path / "unknown" / "config.json").read_text())
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({**config, "model_type": "beit"}))
    saved(CASES["siglip_vision_model"], tmp_path / "positions")
    (tmp_path / "positions" / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    bare = tmp_path / "bare.safetensors"
    torch.manual_seed(0)
    save_file(VisionTransformer(ViTConfig(embed_dim=192, depth=2, num_heads=6, image_size=32)).state_dict(), str(bare))
    for source, message in ((tmp_path / "unknown", "model_type 'beit' is not supported: its blocks add a relative "
                                                    "position bias"),
                            (tmp_path / "positions", "pos_embed has shape"),
                            (bare, "the number of attention heads of a width-192 ViT cannot be told")):
        result = querytune_cli("info", "--backbone", source)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_relative_position_bias_families_are_refused_saying_why(tmp_path):
    """BEiT and data2vec-vision add a relative position bias inside every block's attention, which the rows
    path (Block.forward_rows) does not carry: refused by model type and by timm name."""
    from querytune.errors import ConfigError

    saved(CASES["vit_msn"], tmp_path / "beit")
    config = json.loads((tmp_path / "beit" / "config.json").read_text())
    for model_type in ("beit", "data2vec-vision"):
        (tmp_path / "beit" / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(CheckpointError, match=f"'{model_type}' is not supported: its blocks add a relative"):
            load_backbone(tmp_path / "beit")
    save_file(VisionTransformer(ViTConfig(embed_dim=48, depth=1, num_heads=4, image_size=32)).state_dict(),
              str(tmp_path / "beit.safetensors"))
    with pytest.raises(ConfigError, match="BEiT's blocks add a relative position bias"):
        load_backbone(tmp_path / "beit.safetensors", model_name="beit_base_patch16_224")


@pytest.mark.parametrize("family", [*CASES, "eva02"])
def test_info_and_train_on_every_family(family, tmp_path, tiny_task, capsys):
    """``querytune info`` and ``train`` (in this process: VQT for one epoch) on each family's saved tiny model: a
    transformers folder, or for EVA-02, which transformers lacks, a querytune-saved (timm-named) file."""
    from conftest import tiny_family
    from querytune.backbones import save_backbone
    from querytune.cli import main

    source = tmp_path / family
    if family == "eva02":
        source = tmp_path / "eva02.safetensors"
        save_backbone(tiny_family("eva02"), source)
    else:
        saved(CASES[family], source)
    main(["info", "--backbone", str(source)])
    assert "depth (L)" in capsys.readouterr().out
    normalisation = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"] if family == "vit_gelu_new" else []  # a ViT's
    main(["train", "--method", "vqt", "--backbone", str(source), "--data", str(tiny_task), "--out",
          str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--workers", "0", "-q",
          *normalisation])
    assert 0 <= json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"] <= 1


def test_an_unknown_model_type_is_one_line_with_exit_code_2(tmp_path, capsys):
    from querytune.cli import main

    saved(CASES["vit_msn"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "swin"}))
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit:
        main(["info", "--backbone", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and error.count("\n") == 1
    assert "model_type 'swin' is not supported (supported: " in error
