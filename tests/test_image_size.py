"""Non-square input: ``--image-size N`` or ``HxW`` read in one place (:class:`ImageSize`), images resized to
(H, W), position embeddings and rotary positions on a grid of H/p x W/p patches (parity with transformers and
timm at a non-square size), the cache key and the run's records telling HxW from N, and square runs (an int
``image_size``) as they were."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROPE_FAMILIES, assert_matches_reference, import_timm, perturbed, tiny_rope, tiny_vit
from querytune import cli
from querytune.backbones import load_backbone, save_backbone
from querytune.data import ImageList, Preprocess
from querytune.errors import ConfigError
from querytune.methods import build_method
from querytune.methods.vqt import naive_vqt_logits
from querytune.options import ImageSize
from querytune.run import eval_run
from querytune.serve import MultiTaskServer, run_mismatch
from querytune.trunk.cache import CacheKey
from querytune.trunk.cache import entry as cache_entry
from querytune.trunk.features import extract_features

HEIGHT, WIDTH = 24, 40  # a 3 x 5 grid of the tiny backbones' 8-pixel patches


# --- reading the size ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "size", "recorded"), [
    (224, (224, 224), 224), ("224", (224, 224), 224), ("224x320", (224, 320), "224x320"),
    (" 32X48 ", (32, 48), "32x48"), ("32x32", (32, 32), 32), ([32, 48], (32, 48), "32x48"),
    ((48, 32), (48, 32), "48x32"),
])
def test_sizes_are_read_and_recorded_square_as_n(value, size, recorded):
    read = ImageSize.of(value)
    assert (tuple(read), read.recorded) == (size, recorded)


@pytest.mark.parametrize(("value", "message"), [
    ("abc", "--image-size must be an integer (got 'abc') or HxW such as 224x320"),
    ("2.5", "--image-size must be an integer (got '2.5')"), (2.5, "--image-size must be an integer (got 2.5)"),
    (True, "--image-size must be an integer (got True)"), ("32x", "got '32x'"), ("x32", "got 'x32'"),
    ("32x48x3", "got '32x48x3'"), ("-32", "got '-32'"), ("", "got ''"), ([32, 48, 3], "got [32, 48, 3]"),
    ("0", "--image-size must be at least 1 on each side (got '0')"), ("32x0", "at least 1 on each side (got '32x0')"),
])
def test_bad_sizes_are_one_line_naming_the_flag(value, message):
    with pytest.raises(ConfigError, match=None) as caught:
        ImageSize.of(value)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("command", "size", "line"), [
    ("train", "32x", "error: --image-size must be an integer (got '32x') or HxW such as 224x320"),
    ("train", "24x36", "error: --image-size 24x36: height and width must each be a positive multiple of the "
                       "backbone's patch size 8"),
    ("measure", "0x8", "error: --image-size must be at least 1 on each side (got '0x8')"),
    ("measure", "24x36", "error: --image-size 24x36: height and width must each be a positive multiple of the "
                         "backbone's patch size 8"),
    ("cache", "24x", "error: --image-size must be an integer (got '24x') or HxW such as 224x320"),
    ("cache", "20x24", "error: --image-size 20x24: height and width must each be a positive multiple of the "
                       "backbone's patch size 8"),
    ("info", "big", "error: --image-size must be an integer (got 'big') or HxW such as 224x320"),
])
def test_every_command_refuses_a_bad_size_in_one_line(command, size, line, tiny_backbone_dir, tiny_task, tmp_path,
                                                      capsys):
    args = {"train": ["train", "-m", "linear", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "-o",
                      str(tmp_path / "run"), "-q"],
            "measure": ["measure", "-m", "linear", "-b", str(tiny_backbone_dir)],
            "cache": ["cache", "build", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "--cache",
                      str(tmp_path / "cache"), "--workers", "0", "-q"],
            "info": ["info", "-b", str(tiny_backbone_dir)]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--image-size", size])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_info_and_measure_take_a_non_square_size(tiny_backbone_dir, capsys):
    cli.main(["info", "-b", str(tiny_backbone_dir), "--image-size", f"{HEIGHT}x{WIDTH}"])
    assert f"tokens at {HEIGHT}x{WIDTH} px" in capsys.readouterr().out
    cli.main(["measure", "-m", "vqt", "-b", str(tiny_backbone_dir), "--batch-size", "2", "--image-size",
              f"{HEIGHT}x{WIDTH}", "--json"])
    assert json.loads(capsys.readouterr().out)["image_size"] == f"{HEIGHT}x{WIDTH}"


# --- preprocessing and the cache key -------------------------------------------------------------------------

def test_images_are_resized_to_height_by_width_and_keyed_apart_from_square(tmp_path):
    from PIL import Image

    image = tmp_path / "cats" / "img.png"
    image.parent.mkdir()
    Image.new("RGB", (50, 30), (200, 10, 10)).save(image)
    images = ImageList(tmp_path / "cats", "train800", ((image, 0),), None)
    backbone = tiny_vit()
    setattr(backbone, cache_entry.FINGERPRINT_ATTRIBUTE, "0" * 64)
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    wide, tall, square, spelled = (Preprocess(size, *norm) for size in ("24x40", (40, 24), 32, "32x32"))
    assert wide(Image.open(image)).shape == (3, 24, 40) and tall(Image.open(image)).shape == (3, 40, 24)
    digests = {name: CacheKey(backbone, images, p).digest() for name, p in
               (("wide", wide), ("tall", tall), ("square", square), ("spelled", spelled))}
    assert digests["spelled"] == digests["square"]  # 32x32 is 32: the same entry, the folder it always had
    assert len({digests["wide"], digests["tall"], digests["square"]}) == 3
    assert (wide.image_size, square.image_size) == ("24x40", 32)


# --- the model -----------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
HF_SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
            "intermediate_size": 96, "image_size": 48}


HF_MODELS = {
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**HF_SMALL), add_pooling_layer=False),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**HF_SMALL)),
    "dinov3_vit": lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **HF_SMALL, num_register_tokens=2, key_bias=True, layerscale_value=0.5)),
}


@pytest.mark.parametrize("family", list(HF_MODELS))
def test_non_square_input_matches_transformers(family, tmp_path):
    """A 3 x 5 grid from a 6 x 6 one: position embeddings resized per axis (ViT, DINOv2), patch centres in
    [-1, 1] per axis (DINOv3's RoPE); all tokens and the pooled feature."""
    torch.manual_seed(0)
    reference = perturbed(HF_MODELS[family]())
    reference.save_pretrained(tmp_path)
    ours = load_backbone(tmp_path)
    images = torch.randn(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        kwargs = {"interpolate_pos_encoding": True} if family == "vit" else {}
        out = reference(pixel_values=images, **kwargs)
        pooled = out.last_hidden_state[:, 0] if family == "vit" else out.pooler_output
        torch.testing.assert_close(ours.norm(ours.run_blocks(ours.embed(images))), out.last_hidden_state, atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(ours(images), pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])
def test_non_square_input_matches_timm_rope_families(name):
    """EVA-02 (grid indices scaled to the pretraining grid per axis) and DINOv3 in timm at a 2 x 5 grid."""
    timm = import_timm()
    torch.manual_seed(0)
    options = {"img_size": 56} if name.startswith("eva02") else {"global_pool": "token"}
    reference = timm.create_model(name, pretrained=False, dynamic_img_size=True, **options).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
    ours = load_backbone(reference)
    patch = ours.config.patch_size
    images = torch.randn(2, 3, 2 * patch, 5 * patch)
    with torch.no_grad():
        expected = reference.forward_features(images)
        tokens = ours.run_blocks(ours.embed(images))
        torch.testing.assert_close(tokens if ours.config.global_pool else ours.norm(tokens), expected, atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(ours(images), reference.forward_head(expected, pre_logits=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_rows_over_cached_non_square_features_take_the_grid_the_model_is_set_to(family):
    """Cached tokens do not tell a 3 x 5 grid from a 5 x 3 one: the rows path rotates the keys by the input grid
    the model is set to (a run sets it from its input size), and equals the naive reference there."""
    backbone = tiny_rope(family)
    method = build_method("vqt", backbone, 3, {"num_queries": 2, "query_dropout": 0.0}).train()
    images = torch.randn(3, 3, HEIGHT, WIDTH)
    features = extract_features(backbone, images, dtype=torch.float32)
    backbone.set_input_size(HEIGHT * 2, WIDTH * 2)  # another run's size: 15 patches here match no grid of it
    with pytest.raises(ValueError, match="15 patch tokens make no square grid"):
        method(features)
    backbone.set_input_size(HEIGHT, WIDTH)
    assert_matches_reference(method, method(features), lambda: naive_vqt_logits(method, images))


def test_onnx_resample_keeps_a_non_square_grid(tmp_path):
    """Position embeddings resampled once to HxW (as the ONNX export does) give what the ViT gives at run time."""
    model = tiny_vit()
    save_backbone(model, tmp_path / "vit.safetensors")
    resized = load_backbone(tmp_path / "vit.safetensors", image_size=f"{HEIGHT}x{WIDTH}")
    assert resized.pos_embed_grid == (3, 5) and resized.config.image_size == 32  # the config keeps the native size
    images = torch.randn(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(resized(images), model(images))


# --- runs end to end -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone_kind", ["vit", "dinov3"])
def test_a_non_square_run_trains_evaluates_serves_and_records_its_size(backbone_kind, tiny_task, tmp_path, capsys):
    backbone = tmp_path / f"{backbone_kind}.safetensors"
    save_backbone(tiny_vit(layer_scale=True) if backbone_kind == "vit" else tiny_rope("dinov3"), backbone)
    run = tmp_path / "run"
    cli.main(["train", "-m", "vqt", "-b", str(backbone), "-d", str(tiny_task), "-o", str(run), "--epochs", "2",
              "--batch-size", "4", "--image-size", f"{HEIGHT}X{WIDTH}", "--workers", "0"])
    line = f"input {HEIGHT}x{WIDTH} px (--image-size, given; the backbone's native 32x32)"
    assert capsys.readouterr().err.splitlines()[0] == line
    config = json.loads((run / "config.json").read_text())
    assert (config["image_size"], config["input_size"]) == (f"{HEIGHT}x{WIDTH}", line.removeprefix("input "))
    assert 0 <= eval_run(run, tiny_task) <= 1
    for _ in range(2):  # the test split cached, then read back by a backbone that has seen no image
        cli.main(["eval", "--run", str(run), "--data", str(tiny_task), "--cache", str(tmp_path / "cache"),
                  "--workers", "0", "-q"])
    assert [entry.name.split("-")[:2] for entry in (tmp_path / "cache").iterdir()] == [["tiny", "test"]]
    server = MultiTaskServer.from_runs(None, [run])
    assert server.preprocess.size == (HEIGHT, WIDTH)
    assert server.predict(torch.randn(2, 3, HEIGHT, WIDTH))["run"].shape == (2, 3)
    cli.main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert f"(batch, 3, {HEIGHT}, {WIDTH})" in (tmp_path / "onnx" / "README.md").read_text()


def test_square_runs_keep_an_int_size_and_mix_with_its_spellings(tiny_backbone_dir, tiny_task, tmp_path):
    """An old run folder's int ``image_size`` (what square runs still write) is read as N x N: eval, serving,
    export; a hand-written '32x32' is the same size, '32x48' another."""
    run = tmp_path / "run"
    cli.main(["train", "-m", "linear", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "-o", str(run),
              "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0", "-q"])
    config = json.loads((run / "config.json").read_text())
    assert config["image_size"] == 32
    assert 0 <= eval_run(run, tiny_task) <= 1
    assert MultiTaskServer.from_runs(None, [run]).preprocess.size == (32, 32)
    assert run_mismatch("b", {**config, "image_size": "32x32"}, run, config) is None
    assert "was trained at 32x48 px and" in run_mismatch("b", {**config, "image_size": "32x48"}, run, config)
    cli.main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert "(batch, 3, 32, 32)" in (tmp_path / "onnx" / "README.md").read_text()


def test_a_non_square_runs_merged_export_gives_its_logits_in_timm(tiny_task, tmp_path):
    """Merged weights of a run at HxW keep the backbone's native grid (the config's square size); timm's ViT at that
    size with ``dynamic_img_size``, as the model card says, resamples them per input and gives the run's logits."""
    from safetensors.torch import load_file

    from querytune import load_run, train_run
    from querytune.export import export_runs
    from querytune.settings import RunSpec, Runtime

    timm = import_timm()
    backbone = tmp_path / "vit.safetensors"
    save_backbone(tiny_vit(pos_embed_antialias=True), backbone)  # resampled as timm resamples
    run = tmp_path / "run"
    train_run(RunSpec(method="lora", backbone=backbone, data=tiny_task, image_size=f"{HEIGHT}x{WIDTH}",
                      options={"lora_rank": 2}), run, train={"epochs": 1, "batch_size": 8, "lr": 0.05},
              runtime=Runtime(workers=0, progress=False))
    export_runs([run], "merged", tmp_path / "out")
    assert "`dynamic_img_size=True` for 24x40 input" in (tmp_path / "out" / "README.md").read_text()
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=3, num_heads=4, num_classes=3, dynamic_img_size=True).eval()
    model.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    trained, _ = load_run(run)
    assert trained.backbone.blocks[0].attn.qkv.lora_b.abs().max() > 0  # the update is not the zero init
    images = torch.randn(3, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained(images), rtol=0, atol=1e-5)


def test_a_run_without_image_size_says_it_took_the_flags_default_not_the_native_size(tiny_backbone_dir, tiny_task,
                                                                                    tmp_path, capsys):
    """Without --image-size a run takes the flag's default, 224, whatever the checkpoint's native size (32 here): its
    first line and config.json say so, and name the native size beside it."""
    run = tmp_path / "run"
    cli.main(["train", "-m", "linear", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "-o", str(run),
              "--epochs", "1", "--batch-size", "8", "--workers", "0", "--eval-split", ""])
    line = "input 224x224 px (--image-size, its default; the backbone's native 32x32)"
    assert capsys.readouterr().err.splitlines()[0] == line
    config = json.loads((run / "config.json").read_text())
    assert (config["image_size"], config["input_size"]) == (224, line.removeprefix("input "))
