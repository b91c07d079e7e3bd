"""The loaders against real timm models (timm installed with ``--no-deps``; where torchvision is absent a
test-only stand-in takes its place, tests/torchvision_stub.py). Random weights, timm's own forward."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import import_timm
from querytune.backbones import load_backbone

timm = import_timm()

# timm name -> input size (small grids keep it fast; timm's models take their image size as an option)
MODELS = {
    "vit_tiny_patch16_224": 64,
    "deit_tiny_distilled_patch16_224": 64,
    "deit3_small_patch16_224": 64,
    "vit_small_patch14_dinov2": 56,
    "vit_small_patch14_reg4_dinov2": 56,
    "vit_base_patch16_clip_224": 64,
    "vit_base_patch16_clip_quickgelu_224": 64,
    "vit_base_patch16_siglip_224": 64,
}
SWIGLU_DINOV2 = {"mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu_packed", "act_layer": "silu"}  # as the giant's


def timm_model(name: str, image_size: int, **options) -> torch.nn.Module:
    """A random timm model with every parameter moved off its init (norms and LayerScales off 1, biases,
    tokens and the attention pool's latent off 0), so that mixing any of them up shows."""
    if options.get("mlp_layer") == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        options = {**options, "mlp_layer": SwiGLUPacked}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=image_size, **options).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))  # about the weights' own init scale
    return model


def check_against_timm(reference: torch.nn.Module, image_size: int, path, model_name: str,
                       other_size: int | None = None) -> None:
    """Our model from the timm object and from its saved state dict (with its name) against timm's forward: all
    tokens (final-normed, prefix tokens first; where timm pools by ``fc_norm`` its tokens are not normed) and
    the pooled feature, at ``image_size`` and, for a model built with ``dynamic_img_size``, ``other_size``."""
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    models = (load_backbone(reference), load_backbone(path, model_name=model_name))
    for size in (image_size, other_size) if other_size else (image_size,):
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected = reference.forward_features(images)
            # timm's distilled DeiT averages its class and distillation tokens before its heads; ours reads the
            # class token
            distilled = getattr(reference, "dist_token", None) is not None
            expected_pooled = expected[:, 0] if distilled else reference.forward_head(expected, pre_logits=True)
            for ours in models:
                tokens = ours.run_blocks(ours.embed(images))
                if not ours.config.global_pool:
                    tokens = ours.norm(tokens)
                torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5, msg=f"tokens at {size}")
                torch.testing.assert_close(ours(images), expected_pooled, rtol=0, atol=1e-5, msg=f"pooled at {size}")


@pytest.mark.parametrize("name", list(MODELS))
def test_object_and_checkpoint_match_timm(name, tmp_path):
    check_against_timm(timm_model(name, MODELS[name]), MODELS[name], tmp_path / "weights.safetensors", name)


# RoPE families (timm's Eva class): name -> creation options; each is also run at a second input size
ROPE_MODELS = {
    "eva02_tiny_patch14_224": {"img_size": 56},  # fused qkv with q and v biases, packed SwiGLU, RoPE + pos_embed
    "eva02_tiny_patch14_224:separate": {"img_size": 56, "qkv_fused": False, "scale_mlp": True},  # EVA-02 B/L's
    "vit_small_patch16_dinov3": {"global_pool": "token"},  # RoPE only, 4 registers, LayerScale
    "vit_small_patch16_dinov3_qkvb": {"global_pool": "token"},
}


@pytest.mark.parametrize("case", list(ROPE_MODELS))
def test_rope_families_match_timm(case, tmp_path):
    """EVA-02 and DINOv3 (timm's Eva), small grids, every parameter perturbed; at a second input size too
    (position embeddings resampled, rotations for the new grid). timm pools DINOv3 by average unless
    ``global_pool='token'``; querytune reads the class token, as upstream does."""
    name = case.partition(":")[0]
    options = {**ROPE_MODELS[case]}
    size = options.pop("img_size", 64)
    reference = timm_model(name, size, dynamic_img_size=True, **options)
    check_against_timm(reference, size, tmp_path / "weights.safetensors", name, other_size=size - 2 * (size // 8))
    ours = load_backbone(reference)
    assert ours.config.rope == ("eva" if name.startswith("eva02") else "dinov3")


def test_swiglu_dinov2_matches_timm(tmp_path):
    """DINOv2 giant's SwiGLU MLP (timm's SwiGLUPacked), on a small model."""
    reference = timm_model("vit_small_patch14_dinov2", 56, **SWIGLU_DINOV2)
    check_against_timm(reference, 56, tmp_path / "weights.safetensors", "vit_small_patch14_dinov2")


# Bare timm files of the families, loaded through the command line with --model-name: timm's model -> (the name
# given, creation options, input size). CLIP's and SigLIP's timm models are built at the tiny width (192, 3 heads,
# 12 blocks), which the name's size gives; EVA-02 and DINOv3 have tiny models of their own.
BARE_FILES = {
    "eva02_tiny_patch14_224": ("eva02_tiny_patch14_224", {"img_size": 28}, 28),
    "vit_tiny_patch16_dinov3_qkvb": ("vit_tiny_patch16_dinov3_qkvb", {"global_pool": "token"}, 32),
    "vit_base_patch16_clip_224": ("vit_tiny_patch16_clip_224.test", {"img_size": 32, "embed_dim": 192,
                                                                     "num_heads": 3}, 32),
    "vit_base_patch16_siglip_224": ("vit_tiny_patch16_siglip_224.test", {"img_size": 32, "embed_dim": 192,
                                                                         "num_heads": 3}, 32),
}


@pytest.mark.parametrize("architecture", list(BARE_FILES))
def test_a_bare_timm_file_of_each_family_runs_info_train_and_eval_with_model_name(architecture, tmp_path, tiny_task,
                                                                                  capsys):
    """A state dict as timm saves it, with no config: refused without --model-name (its head count is not in its
    weights); with it, equal to timm's model, and ``info``, ``train`` (VQT, one epoch) and ``eval`` (the run
    records the name and reloads the file with it) run."""
    import json

    from querytune.cli import main

    model_name, options, size = BARE_FILES[architecture]
    options = {**options}
    reference = timm_model(architecture, options.pop("img_size", 224), **options)
    bare = tmp_path / "bare.safetensors"
    check_against_timm(reference, size, bare, model_name)  # writes the bare file
    with pytest.raises(SystemExit):
        main(["info", "--backbone", str(bare)])
    assert "cannot be told from its weights" in capsys.readouterr().err
    main(["info", "--backbone", str(bare), "--model-name", model_name])
    assert "depth (L)" in capsys.readouterr().out
    run = tmp_path / "run"
    main(["train", "--method", "vqt", "--backbone", str(bare), "--model-name", model_name, "--data", str(tiny_task),
          "--out", str(run), "--epochs", "1", "--batch-size", "8", "--image-size", str(size), "--workers", "0",
          "--layers", "10,11"])
    assert capsys.readouterr().err.splitlines()[0].startswith(f"input {size}x{size} px (--image-size, given;")
    assert json.loads((run / "config.json").read_text())["backbone"]["model_name"] == model_name
    main(["eval", "--run", str(run), "--data", str(tiny_task), "--workers", "0", "-q"])
    assert "accuracy" in capsys.readouterr().out


def test_timm_hub_names_of_the_families_resolve_through_the_offline_cache(offline_hub):
    """A bare timm hub name means timm/<name>, read from huggingface_hub's cache (the real hub code, offline, on a
    cache folder laid out as the hub client lays it out): its config.json names the architecture, whose
    pretrained_cfg gives the normalisation and, where the weights show no grid (DINOv3), the native size."""
    import json

    from safetensors.torch import save_file

    from querytune.backbones.timm_format import is_timm_name
    from querytune.errors import CheckpointError

    for name, size, side in (("vit_small_patch16_dinov3.lvd1689m", 256, 32), ("eva02_tiny_patch14_224.mim_in22k", 224,
                                                                                28)):
        architecture = name.partition(".")[0]
        reference = timm_model(architecture, 224, dynamic_img_size=True,
                               **({"global_pool": "token"} if "dinov3" in name else {}))
        repo = offline_hub(f"timm/{name}")
        save_file({key: value.contiguous() for key, value in reference.state_dict().items()},
                  str(repo / "model.safetensors"))
        config = {"architecture": architecture, "num_classes": 0, "pretrained_cfg": reference.pretrained_cfg}
        (repo / "config.json").write_text(json.dumps(config, default=list))
        ours = load_backbone(name)
        assert (ours.config.name, ours.config.image_size) == (f"timm/{name}", size)
        assert list(ours.config.mean) == list(reference.pretrained_cfg["mean"])
        images = torch.randn(1, 3, side, side)
        with torch.no_grad():
            expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
            torch.testing.assert_close(ours(images), expected, rtol=0, atol=1e-5)
    for name in ("vit_base_patch16_clip_224.openai", "vit_base_patch16_siglip_224.webli"):  # not in the cache
        assert is_timm_name(name)
        with pytest.raises(CheckpointError, match=f"timm/{name}: no such local path; as a hub name it was not found "
                                                  "locally"):
            load_backbone(name)


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_siglip_npz_reads_as_timms_own_loader_reads_it(scanned, tmp_path):
    """The big_vision layout the tests write (test_loading.big_vision_arrays) is the one timm's ``.npz`` loader reads
    into its SigLIP ViT; querytune's reading of the file gives timm's tokens and pooled (MAP) feature."""
    import numpy as np
    from test_loading import big_vision_arrays
    from timm.models.vision_transformer import _load_weights

    from conftest import tiny_siglip

    path = tmp_path / "siglip.npz"
    np.savez(path, **{"params/img/" + key: value
                      for key, value in big_vision_arrays(tiny_siglip(act="gelu_tanh"), scanned).items()})
    reference = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
                                  embed_dim=48, depth=3, num_heads=4, act_layer="gelu_tanh").eval()
    _load_weights(reference, str(path))
    ours = load_backbone(path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_features(images)
        torch.testing.assert_close(ours.norm(ours.run_blocks(ours.embed(images))), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(images), reference.forward_head(expected, pre_logits=True), rtol=0, atol=1e-5)
