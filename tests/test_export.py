"""``querytune export``: PEFT adapters, merged ViT weights and ONNX graphs that other tools load with the
run's own logits, model cards, idempotent re-exports and one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import querytune
from test_loading import hf_model

from conftest import tiny_vit, write_task
from querytune import load_backbone, load_run, train_run
from querytune.backbones import save_backbone
from querytune.backbones.vit import VisionTransformer
from querytune.errors import CheckpointError, ConfigError
from querytune.export import export_runs
from querytune.serve import MultiTaskServer
from querytune.settings import RunSpec, Runtime
from querytune.trunk.precision import Precision

FAST = {"epochs": 2, "batch_size": 8}
SIZE = 40  # not the tiny ViT's native 32 px: the exports must carry the resampled position embeddings


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished runs of several methods on one tiny timm-format backbone."""
    root = tmp_path_factory.mktemp("runs")
    task = write_task(root / "task")
    save_backbone(tiny_vit(layer_scale=True), root / "tiny.safetensors")
    found = {}
    for method, options in [("linear", {}), ("vqt", {"num_queries": 2}), ("memory", {"memory_tokens": 2}),
                            ("head2toe", {"target_size": 96}), ("lora", {"lora_rank": 2, "lora_alpha": 4.0}),
                            ("bitfit", {}), ("ssf", {}),
                            ("full", {})]:
        found[method] = root / method
        train_run(RunSpec(method=method, backbone=root / "tiny.safetensors", data=task, options=options,
                          image_size=SIZE),
                  found[method], train=FAST, runtime=Runtime(workers=0, progress=False))
    return found


def images(count: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["lora", "bitfit", "ssf", "full", "linear"])
def test_merged_weights_load_into_a_plain_vit_with_equal_logits(method, runs, tmp_path):
    export_runs([runs[method]], "merged", tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    plain = load_backbone(path)  # strict key and shape matching
    with torch.device("meta"):
        expected = set(VisionTransformer(plain.config).state_dict()) | {"head.weight", "head.bias"}
    state = load_file(path)
    assert set(state) == expected and plain.config.image_size == SIZE
    trained, _ = load_run(runs[method])
    with torch.no_grad():
        logits = plain(images()) @ state["head.weight"].T + state["head.bias"]
        # the probe reads the trunk's final class token; the other methods take images
        expected_logits = trained.head(trained.backbone(images())) if method == "linear" else trained(images())
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    original = tiny_vit(layer_scale=True).state_dict()
    changed = {"lora": "blocks.0.attn.qkv.weight", "bitfit": "blocks.0.mlp.fc1.bias", "ssf": "blocks.0.mlp.fc1.weight",
               "full": "blocks.0.mlp.fc1.weight"}
    if method in changed:  # the training is in the merged weights, not only in the head
        assert not torch.equal(state[changed[method]], original[changed[method]])


def test_merged_global_pool_model_names_its_final_norm_as_timm_does(tmp_path):
    save_backbone(tiny_vit(global_pool=True), tmp_path / "gap.safetensors")
    train_run(RunSpec(method="bitfit", backbone=tmp_path / "gap.safetensors", data=write_task(tmp_path / "task"),
                      image_size=32),
              tmp_path / "run", train=FAST, runtime=Runtime(workers=0, progress=False))
    export_runs([tmp_path / "run"], "merged", tmp_path / "out")
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert "fc_norm.weight" in state and "norm.weight" not in state  # timm's global_pool='avg' layout
    plain = load_backbone(tmp_path / "out" / "model.safetensors")
    assert plain.config.global_pool
    trained, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(plain(images(size=32)) @ state["head.weight"].T + state["head.bias"],
                                   trained(images(size=32)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_peft_round_trip_gives_the_runs_logits(kind, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install 'querytune[peft]')")
    transformers = pytest.importorskip("transformers")
    hf_model(kind).save_pretrained(tmp_path / "hf")
    task = write_task(tmp_path / "task")
    normalisation = {} if kind == "dinov2" else {"mean": [0.5] * 3, "std": [0.5] * 3}  # a ViT's is not known
    train_run(RunSpec(method="lora", backbone=tmp_path / "hf", data=task, image_size=32,
                      options={"lora_rank": 4, "lora_alpha": 2.0}, **normalisation),
              tmp_path / "run", FAST, Runtime(workers=0, progress=False))
    export_runs([tmp_path / "run"], "peft", tmp_path / "peft")

    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["modules_to_save"]) == (4, 2.0, ["classifier"])
    assert adapter["base_model_name_or_path"] == str(tmp_path / "hf")
    base = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf", num_labels=3)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    trained, _ = load_run(tmp_path / "run")
    assert trained.backbone.blocks[0].attn.qkv.lora_b.abs().max() > 0  # the update is not the zero init
    with torch.no_grad():
        theirs = model(pixel_values=images(size=32), interpolate_pos_encoding=True).logits
        torch.testing.assert_close(theirs, trained(images(size=32)), rtol=0, atol=1e-5)


def test_onnx_graphs_match_pytorch(runs, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install "
                                                            "'querytune[onnx]')")
    onnx = pytest.importorskip("onnx")
    frozen = [runs["linear"], runs["vqt"], runs["memory"], runs["head2toe"]]
    export_runs(frozen, "onnx", tmp_path / "served")
    export_runs([runs["lora"]], "onnx", tmp_path / "lora")

    graph = onnx.load(tmp_path / "served" / "model.onnx").graph
    operators = [node.op_type for node in graph.node]
    assert operators.count("Conv") == 1  # one patch embedding: one trunk pass
    assert "Resize" not in operators  # the position embeddings were resampled to the input size once
    batch = images(5)  # another batch size than the export's example
    session = onnxruntime.InferenceSession(tmp_path / "served" / "model.onnx")
    assert [output.name for output in session.get_outputs()] == ["linear", "vqt", "memory", "head2toe"]
    answers = session.run(None, {"images": batch.numpy()})
    expected = MultiTaskServer.from_runs(None, frozen, device="cpu", precision=Precision.FP32).predict(batch)
    differences = [(torch.from_numpy(answer) - expected[name]).abs().max().item()
                   for answer, name in zip(answers, ["linear", "vqt", "memory", "head2toe"])]
    lora, _ = load_run(runs["lora"])
    with torch.no_grad():
        expected_lora = lora(batch)
    session = onnxruntime.InferenceSession(tmp_path / "lora" / "model.onnx")
    differences.append((torch.from_numpy(session.run(None, {"images": batch.numpy()})[0]) - expected_lora)
                       .abs().max().item())
    print(f"ONNX Runtime vs PyTorch, max abs logit difference (linear, vqt, memory, head2toe, lora): {differences}")
    assert max(differences) < 1e-4


def test_model_card_and_manifest(runs, tmp_path):
    export_runs([runs["linear"], runs["vqt"]], "onnx", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    metrics = json.loads((runs["vqt"] / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: querytune\n")
    assert "base_model" not in card  # a local backbone is no hub link
    row = (f"| task | vqt | 3 | {100 * metrics['test_accuracy']:.2f}% (test) | {metrics['trainable_params']:,} | "
           f"{metrics['epochs']} |")
    assert row in card
    assert "- **vqt**: class0, class1, class2" in card and f"resized (bicubic, no crop) to {SIZE} x {SIZE} px" in card
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["format"] == "onnx" and [r["run"] for r in manifest["runs"]] == [
        str(runs["linear"].resolve()), str(runs["vqt"].resolve())]


def test_reexport_is_a_no_op_and_other_contents_are_refused(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder may receive an export
    assert not export_runs([runs["bitfit"]], "merged", out).unchanged
    written = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    again = export_runs([runs["bitfit"]], "merged", out)
    assert again.unchanged and {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == written
    with pytest.raises(CheckpointError, match=r"holds another export \(merged of \S+bitfit, not merged of \S+full\)"):
        export_runs([runs["full"]], "merged", out)
    with pytest.raises(CheckpointError, match=r"out: holds another export \(merged of \S+bitfit, not onnx of "):
        export_runs([runs["bitfit"]], "onnx", out)
    changed = tmp_path / "changed"
    shutil.copytree(runs["bitfit"], changed)
    export_runs([changed], "merged", tmp_path / "changed-out")
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="changed-out: holds another export .* before these runs' files last"):
        export_runs([changed], "merged", tmp_path / "changed-out")
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == written


def _unfinished(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    (where / "metrics.json").unlink()
    return where


@pytest.mark.parametrize("case,message", [
    ("unknown format", r"--format zip: unknown; choose one of peft, merged, onnx"),
    ("not a run", r"data: not a querytune run folder \(no config.json\)"),
    ("unfinished", r"unfinished: an unfinished run \(no metrics.json yet\)"),
    ("foreign out", r"out: exists, is not empty and is not a querytune export folder"),
    ("out is a file", r"out: is a file, not an export folder"),
    ("peft of vqt", r"vqt: method 'vqt' has no PEFT equivalent .*; use --format onnx"),
    ("peft of bitfit", r"bitfit: method 'bitfit' has no PEFT equivalent .*; use --format merged or onnx"),
    ("peft on timm", r"lora: its backbone \S+tiny.safetensors is not a Hugging Face transformers model.*merged"),
    ("merged memory", r"memory: method 'memory' cannot be merged .*memory tokens.*; use --format onnx"),
    ("merged of two", r"--format merged exports one run; only --format onnx takes several"),
    ("onnx lora with others", r"lora: method 'lora' changes the backbone's features, .* export it alone"),
])
def test_bad_exports_are_one_line_errors_and_write_nothing(case, message, runs, tmp_path):
    out = tmp_path / "out"
    args = {
        "unknown format": ([runs["linear"]], "zip"),
        "not a run": ([tmp_path / "data"], "merged"),
        "unfinished": ([_unfinished(runs["linear"], tmp_path / "unfinished")], "merged"),
        "foreign out": ([runs["linear"]], "merged"),
        "out is a file": ([runs["linear"]], "merged"),
        "peft of vqt": ([runs["vqt"]], "peft"),
        "peft of bitfit": ([runs["bitfit"]], "peft"),
        "peft on timm": ([runs["lora"]], "peft"),
        "merged memory": ([runs["memory"]], "merged"),
        "merged of two": ([runs["linear"], runs["full"]], "merged"),
        "onnx lora with others": ([runs["linear"], runs["lora"]], "onnx"),
    }[case]
    (tmp_path / "data").mkdir()
    if case == "foreign out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "out is a file":
        out.write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    if case == "peft on timm":
        pytest.importorskip("peft", reason="PEFT is not installed (pip install 'querytune[peft]')")
    with pytest.raises((ConfigError, CheckpointError), match=message):
        export_runs(*args, out)
    assert sorted(tmp_path.rglob("*")) == before


def test_command_line_export(runs, tmp_path):
    done = querytune("export", runs["bitfit"], "--format", "merged", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tmp_path / 'out'}: written (README.md, export.json, model.safetensors)"
    refused = querytune("export", runs["vqt"], "--format", "merged", "--out", tmp_path / "other")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "method 'vqt' cannot be merged" in refused.stderr and not (tmp_path / "other").exists()


def test_a_failed_write_is_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("querytune.export.save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"out: cannot write the export \(No space left on device\)"):
        export_runs([runs["bitfit"]], "merged", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary


def test_the_temporary_folder_of_a_killed_export_is_removed(runs, tmp_path):
    import socket

    stale = tmp_path / f"out.{socket.gethostname()}.4194304.tmp"  # pid 2**22: above any pid Linux hands out
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    export_runs([runs["bitfit"]], "merged", tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_an_empty_out_keeps_its_mode_and_the_files_get_the_umasks(runs, tmp_path):
    """export replaced an empty read-only --out (555 became 755) and wrote model.safetensors 0600 under umask
    022 beside 0644 files."""
    umask = os.umask(0o022)
    try:
        export_runs([runs["bitfit"]], "merged", tmp_path / "new")
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        if os.geteuid() == 0:  # root writes into it, but leaves its mode alone
            export_runs([runs["bitfit"]], "merged", read_only)
        else:
            with pytest.raises(CheckpointError, match=r"read-only: cannot write the export \(Permission denied\)"):
                export_runs([runs["bitfit"]], "merged", read_only)
    finally:
        os.umask(umask)
    assert oct(stat.S_IMODE(read_only.stat().st_mode)) == "0o555"
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in (tmp_path / "new").iterdir()}
    assert modes == dict.fromkeys(["README.md", "export.json", "model.safetensors"], "0o644")
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in read_only.iterdir()} <= {"0o644"}  # none if refused
    read_only.chmod(0o755)
