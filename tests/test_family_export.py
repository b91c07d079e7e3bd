"""``querytune export`` on every family (conftest.FAMILIES): merged weights load into timm's model of the family
with the run's logits, and are refused on the RoPE families (timm's Eva models name their weights otherwise);
the ONNX graph gives the run's logits; PEFT takes the Hugging Face models whose image classifier reads the run's
feature (MSN, a gelu_new ViT, DINOv2 with SwiGLU) and refuses the others in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAMILIES, ROPE_FAMILIES, import_timm, tiny_family, write_task
from querytune import load_run, train_run
from querytune.backbones import save_backbone
from querytune.cli import main
from querytune.errors import ConfigError
from querytune.export import export_runs
from querytune.settings import RunSpec, Runtime

SIZE = 40  # not the tiny models' native 32 px: the exports carry resampled position embeddings
TRAIN = {"epochs": 1, "batch_size": 8, "lr": 0.05}  # a large step, so that LoRA's update shows in the exports
# family -> the timm architecture (and its options) whose VisionTransformer loads the family's merged weights
TIMM = {
    "clip": ("vit_base_patch16_clip_quickgelu_224", {}),
    "siglip": ("vit_base_patch16_siglip_224", {"act_layer": "gelu_tanh"}),
    "mae": ("vit_base_patch16_224", {"global_pool": "avg"}),
    "msn": ("vit_base_patch16_224", {}),
    "dinov2_swiglu": ("vit_small_patch14_dinov2", {"mlp_layer": "swiglu_packed", "act_layer": "silu",
                                                   "mlp_ratio": 8.0}),  # SwiGLUPacked's hidden is both halves
    "gelu_new": ("vit_base_patch16_224", {"act_layer": "gelu_tanh"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished LoRA run on each family's tiny model, saved as a querytune (timm-named) file."""
    root = tmp_path_factory.mktemp("family-runs")
    task = write_task(root / "task")
    found = {}
    for family in FAMILIES:
        save_backbone(tiny_family(family), root / f"{family}.safetensors")
        found[family] = root / family
        train_run(RunSpec(method="lora", backbone=root / f"{family}.safetensors", data=task, image_size=SIZE,
                          options={"lora_rank": 2}), found[family], train=TRAIN,
                  runtime=Runtime(workers=0, progress=False))
    return found


def images(size: int = SIZE) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def run_logits(run: Path, batch: torch.Tensor) -> torch.Tensor:
    trained, _ = load_run(run)
    assert trained.backbone.blocks[0].attn.qkv.lora_b.abs().max() > 0  # the update is not the zero init
    with torch.no_grad():
        return trained(batch)


@pytest.mark.parametrize("family", list(TIMM))
def test_merged_weights_load_into_timms_model_of_the_family(family, runs, tmp_path):
    timm = import_timm()
    export_runs([runs[family]], "merged", tmp_path / "out")
    name, options = TIMM[family]
    if options.get("mlp_layer") == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        options = {**options, "mlp_layer": SwiGLUPacked}
    model = timm.create_model(name, pretrained=False, img_size=SIZE, patch_size=8, embed_dim=48, depth=2,
                              num_heads=4, num_classes=3, **options).eval()
    model.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), run_logits(runs[family], images()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_merged_is_refused_on_rope_families_in_one_line(family, runs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="has rotary position embeddings .* under other names than a timm ViT's; "
                                          "use --format onnx"):
        export_runs([runs[family]], "merged", tmp_path / "out")
    with pytest.raises(SystemExit) as exit:
        main(["export", str(runs[family]), "--format", "merged", "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_graph_gives_the_runs_logits(family, runs, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install "
                                                            "'querytune[onnx]')")
    export_runs([runs[family]], "onnx", tmp_path / "out")
    session = onnxruntime.InferenceSession(tmp_path / "out" / "model.onnx")
    batch = images()
    answer = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    torch.testing.assert_close(answer, run_logits(runs[family], batch), rtol=0, atol=1e-4)


def hf_lora_run(family: str, root: Path) -> Path:
    """A finished LoRA run on a tiny random transformers model of ``family`` (tests/test_families.py's cases)."""
    from test_families import CASES, saved

    saved(CASES[family], root / family)
    normalisation = {"mean": [0.5] * 3, "std": [0.5] * 3} if family.startswith("vit_gelu") else {}
    train_run(RunSpec(method="lora", backbone=root / family, data=write_task(root / "task"), image_size=32,
                      options={"lora_rank": 2}, **normalisation),
              root / "run", train=TRAIN, runtime=Runtime(workers=0, progress=False))
    return root / "run"


@pytest.mark.parametrize("family", ["vit_msn", "vit_gelu_new", "dinov2_swiglu"])
def test_peft_round_trip_on_the_families_transformers_classifies(family, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install 'querytune[peft]')")
    transformers = pytest.importorskip("transformers")
    run = hf_lora_run(family, tmp_path)
    export_runs([run], "peft", tmp_path / "peft")
    base = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / family, num_labels=3)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = model(pixel_values=images(32), interpolate_pos_encoding=True).logits
    torch.testing.assert_close(theirs, run_logits(run, images(32)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,instead", [("clip", "merged or onnx"), ("siglip_vision_model", "merged or onnx"),
                                            ("vit_mae", "merged or onnx"), ("dinov3_vit", "onnx")])
def test_peft_is_refused_where_transformers_has_no_classifier_of_the_runs_feature(family, instead, tmp_path):
    pytest.importorskip("peft", reason="PEFT is not installed (pip install 'querytune[peft]')")
    pytest.importorskip("transformers")
    run = hf_lora_run(family, tmp_path)
    with pytest.raises(ConfigError, match=rf"run: its backbone is a Hugging Face '{family}' model, for which "
                                          rf"transformers has no image classifier .*; use --format {instead}$"):
        export_runs([run], "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
