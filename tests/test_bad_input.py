"""Bad input through the command line: every case is one line on stderr naming the file (and the
line, for list files), exit code 2, and nothing written into the run folder."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import write_task
from querytune import train_run
from querytune.cli import main
from querytune.settings import RunSpec, Runtime

TRAIN_LIST = "train800val200.txt"


def cli_error(capsys: pytest.CaptureFixture, *args: str | Path) -> str:
    """Run the command line in this process; return its one-line error after checking exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its bytes (None where the folder is absent)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(backbone: Path, task: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["train", "--method", "linear", "--backbone", backbone, "--data", task, "--out", out, "--epochs", "1",
            "--batch-size", "8", "--image-size", "32", "--workers", "0", "-q", *extra]


def set_line(task: Path, number: int, text: str, list_name: str = TRAIN_LIST) -> Path:
    file = task / list_name
    lines = file.read_text().splitlines()
    lines[number - 1] = text
    file.write_text("\n".join(lines) + "\n")
    return file


# List files: (line 2 of the training list, what the error says)
BAD_LINES = {
    "bad label": ("images/train800/00001.jpg cat", "label 'cat' is not an integer"),
    "fractional label": ("images/train800/00001.jpg 1.5", "label '1.5' is not an integer"),
    "negative label": ("images/train800/00001.jpg -1", "label -1 is negative"),
    "label out of range": ("images/train800/00001.jpg 3", "label 3 is out of range"),
    "missing column": ("images/train800/00001.jpg", "expected '<image path> <label>'"),
    "path escaping the task folder": ("../outside.jpg 0", "leads outside the task folder"),
    "absolute path": ("/etc/hostname 0", "is absolute"),
    "missing image": ("images/train800/nope.jpg 0", "image not found"),
    "NUL in path": ("images/train800/00001.jpg\0x 0", "contains control characters"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_list_line(case, capsys, tiny_backbone_dir, tiny_task, tmp_path):
    text, says = BAD_LINES[case]
    file = set_line(tiny_task, 2, text)
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, tmp_path / "run"))
    assert error.startswith(f"error: {file}:2: ") and says in error
    assert not (tmp_path / "run").exists()


def test_fuzzed_list_lines_fail_at_their_line(capsys, tiny_backbone_dir, tiny_task, tmp_path):
    """Every combination of a bad path field and a label field, with assorted separators."""
    paths = ["images/train800/nope.jpg", "../00001.jpg", "/abs.jpg", "images/train800", "ïmäge.jpg",
             "images/train800/00001.jpg\x00", "images\\train800\\00001.jpg"]
    labels = ["0", "-0", "+1", "99", "x", "1e3", "0x1", "٣"]
    separators = [" ", "\t", "  \t "]
    for number, (path, label) in enumerate(itertools.product(paths, labels)):
        text = f"{path}{separators[number % len(separators)]}{label}"
        file = set_line(tiny_task, 3, text)
        error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, tmp_path / "run"))
        assert error.startswith(f"error: {file}:3: "), (text, error)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "eval"])
def test_empty_split(split, capsys, tiny_backbone_dir, tiny_task, tmp_path):
    file = tiny_task / (TRAIN_LIST if split == "train" else "test.txt")
    file.write_text("\n \n")
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, tmp_path / "run"))
    assert error.startswith(f"error: {file}: ") and "lists no images" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["list not UTF-8", "class named twice"])
def test_bad_list_file(case, capsys, tiny_backbone_dir, tiny_task, tmp_path):
    if case == "list not UTF-8":
        file, line = tiny_task / TRAIN_LIST, 2
        file.write_bytes(b"images/train800/00000.jpg 0\nimages/\xff.jpg 0\n")
    else:
        file, line = tiny_task / "classes.txt", 3
        file.write_text("a\nb\na\n")
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, tmp_path / "run"))
    assert error.startswith(f"error: {file}:{line}: ")
    assert not (tmp_path / "run").exists()


# Images


def damage(image: Path, how: str) -> None:
    if how == "truncated":
        image.write_bytes(image.read_bytes()[:100])
    elif how == "not an image":
        image.write_text("just some text\n")
    else:
        image.write_bytes(b"")


@pytest.mark.parametrize(("how", "features"), [
    ("truncated", "cached"),  # found while caching, before the run folder exists
    ("not an image", "live"),  # found while training: the new run folder is removed
    ("empty", "live, 1 worker"),  # decoded in a DataLoader worker process
])
def test_bad_image(how, features, capsys, tiny_backbone_dir, tiny_task, tmp_path):
    image = tiny_task / "images" / "val200" / "00002.jpg"
    damage(image, how)
    extra = {"cached": [], "live": ["--no-cache"], "live, 1 worker": ["--no-cache", "--workers", "1"]}[features]
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, tmp_path / "run"), *extra)
    assert error.startswith(f"error: {image}: cannot read image")
    assert not (tmp_path / "run").exists()


def test_bad_image_in_an_existing_empty_out_folder_leaves_it_empty(capsys, tiny_backbone_dir, tiny_task, tmp_path):
    damage(tiny_task / "images" / "test" / "00000.jpg", "truncated")
    (tmp_path / "run").mkdir()
    cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, tmp_path / "run", "--no-cache"))
    assert snapshot(tmp_path / "run") == {}


# Backbone checkpoints


def write_conv_net(path: Path) -> None:
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(path))


@pytest.mark.parametrize(("kind", "says"), [
    ("zero bytes", "empty file"),
    ("garbage", "unreadable checkpoint (UnpicklingError)"),
    ("other architecture", "not a timm ViT checkpoint"),
    ("other ViT shape", "has shape"),
])
def test_bad_backbone_checkpoint(kind, says, capsys, tiny_backbone_dir, tiny_task, tmp_path):
    backbone = tmp_path / ("backbone.pt" if kind == "garbage" else "backbone.safetensors")
    if kind == "zero bytes":
        backbone.write_bytes(b"")
    elif kind == "garbage":
        backbone.write_bytes(b"\x80\x02not a pickle at all" * 10)
    elif kind == "other architecture":
        write_conv_net(backbone)
    else:
        with safe_open(str(tiny_backbone_dir), "pt") as handle:  # keeps the config metadata
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 48)
        save_file(state, str(backbone), metadata)
    error = cli_error(capsys, *train_args(backbone, tiny_task, tmp_path / "run"))
    assert error.startswith(f"error: {backbone}: ") and says in error
    assert not (tmp_path / "run").exists()


# Run folders and their checkpoints


@pytest.fixture
def unfinished_run(tiny_backbone_dir, tiny_task, tmp_path) -> Path:
    """A run folder as a kill after one epoch leaves it (config, log, checkpoint)."""
    out = tmp_path / "run"
    train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32), out,
              train={"epochs": 1, "batch_size": 8}, runtime=Runtime(workers=0, progress=False))
    (out / "metrics.json").unlink()
    (out / "adapter.safetensors").unlink()
    return out


@pytest.mark.parametrize(("kind", "says"), [
    ("zero bytes", "empty file"),
    ("garbage", "not a readable checkpoint"),
    ("another method", "does not fit method 'linear'"),
    ("another shape", "tensor head.weight has shape (5, 48), method 'linear' expects (3, 48)"),
])
def test_bad_run_checkpoint(kind, says, capsys, unfinished_run, tiny_backbone_dir, tiny_task):
    checkpoint = unfinished_run / "checkpoint.pt"
    if kind == "zero bytes":
        checkpoint.write_bytes(b"")
    elif kind == "garbage":
        checkpoint.write_bytes(b"PK\x03\x04" + bytes(200))
    elif kind == "another method":
        torch.save({"trainable": {"query_path.queries": torch.zeros(3, 1, 48)}}, checkpoint)
    else:
        torch.save({"trainable": {"head.weight": torch.zeros(5, 48), "head.bias": torch.zeros(5)}}, checkpoint)
    before = snapshot(unfinished_run)
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, unfinished_run))
    assert error.startswith(f"error: {checkpoint}: ") and says in error
    assert snapshot(unfinished_run) == before


@pytest.mark.parametrize("kind", ["garbage config", "config of another kind", "out is a file"])
def test_bad_run_folder(kind, capsys, tiny_backbone_dir, tiny_task, tmp_path):
    out = tmp_path / "run"
    culprit = out / "config.json"
    if kind == "out is a file":
        out.write_text("mine")
        culprit = out
    else:
        out.mkdir()
        culprit.write_text("{not json" if kind == "garbage config" else "[1, 2, 3]")
    before = snapshot(out) if out.is_dir() else out.read_bytes()
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, out))
    assert error.startswith(f"error: {culprit}: ")
    assert (snapshot(out) if out.is_dir() else out.read_bytes()) == before


# Evaluation of a finished run


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> dict[str, Path]:
    """A finished linear run and a finished VQT run of one tiny task and backbone (read-only)."""
    from conftest import tiny_vit
    from querytune.backbones import save_backbone

    root = tmp_path_factory.mktemp("finished")
    backbone = root / "tiny-vit.safetensors"
    save_backbone(tiny_vit(layer_scale=True), backbone)
    task = write_task(root / "tiny")
    runs = {"backbone": backbone, "task": task}
    for method in ("linear", "vqt"):
        runs[method] = root / method
        train_run(RunSpec(method=method, backbone=backbone, data=task, image_size=32, eval_split=None), runs[method],
                  train={"epochs": 1, "batch_size": 8}, runtime=Runtime(workers=0, progress=False))
    return runs


@pytest.mark.parametrize(("kind", "says"), [
    ("adapter of another method", "does not fit method 'linear'"),
    ("adapter of another shape", "tensor head.weight has shape (4, 48), method 'linear' expects (3, 48)"),
    ("zero-byte adapter", "not a readable adapter"),
    ("garbage adapter", "not a readable adapter"),
    ("missing adapter", "not found"),
    ("missing checksum", "not found, so adapter.safetensors cannot be checked against it; train the run again"),
    ("too many classes", "has 5 classes, but the adapter"),
])
def test_bad_eval(kind, says, capsys, finished_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_runs["linear"], run)
    adapter, data = run / "adapter.safetensors", finished_runs["task"]
    culprit = adapter
    if kind == "adapter of another method":
        shutil.copy(finished_runs["vqt"] / "adapter.safetensors", adapter)
    elif kind == "adapter of another shape":
        save_file({"head.weight": torch.zeros(4, 48), "head.bias": torch.zeros(4)}, str(adapter))
    elif kind == "zero-byte adapter":
        adapter.write_bytes(b"")
    elif kind == "garbage adapter":
        adapter.write_bytes(b"\xff" * 64)
    elif kind == "missing adapter":
        adapter.unlink()
    elif kind == "missing checksum":  # was "adapter.safetensors: not a readable adapter"
        culprit = run / "adapter.sha256"
        culprit.unlink()
    else:
        data = write_task(tmp_path / "wider", classes=5)
        culprit = data / "test.txt"
    if adapter.exists() and culprit.exists():  # the adapter's checksum as it is now: the adapter's own checks speak
        checksum = run / "adapter.sha256"
        checksum.write_text(f"{hashlib.sha256(adapter.read_bytes()).hexdigest()}  {adapter.name}\n")
    before = snapshot(run)
    error = cli_error(capsys, "eval", "--run", run, "--data", data, "--workers", "0", "-q")
    assert error.startswith(f"error: {culprit}: ") and says in error
    assert snapshot(run) == before


@pytest.mark.parametrize("flag", ["--out", "--cache"])
def test_an_out_or_cache_inside_a_class_folder_task_is_refused(flag, capsys, tiny_backbone_dir, tmp_path):
    """A run folder inside a class-folder task became a class of it (its curves.png an image) on the next run."""
    from PIL import Image

    task = tmp_path / "folders"
    for split, name in itertools.product(("train", "test"), ("cat", "dog")):
        (task / split / name).mkdir(parents=True)
        for i in range(4):
            colour = (200 if name == "cat" else 20, i * 40, 90)
            Image.new("RGB", (24, 24), colour).save(task / split / name / f"{i}.png")
    before = snapshot(task)
    inside = task / "train" / "run1"
    out, extra = (inside, []) if flag == "--out" else (tmp_path / "run", ["--cache", str(inside)])
    assert cli_error(capsys, *train_args(tiny_backbone_dir, task, out, *extra)) == (
        f"error: {flag} {inside}: inside the task folder {task}, which querytune never writes to; choose a "
        "folder outside it")
    assert snapshot(task) == before and not (tmp_path / "run").exists()


def test_an_out_inside_a_list_layout_task_is_refused(capsys, tiny_backbone_dir, tiny_task):
    """Not only class folders: no task folder is written to, whatever its layout."""
    before = snapshot(tiny_task)
    inside = tiny_task / "runs" / "run1"
    assert cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, inside)).startswith(
        f"error: --out {inside}: inside the task folder {tiny_task}, which querytune never writes to")
    assert snapshot(tiny_task) == before


@pytest.mark.parametrize("kind", ["a named pipe (FIFO)", "a symlink loop"])
def test_predict_says_what_a_path_that_is_no_image_is(kind, capsys, finished_runs, tmp_path):
    """A FIFO or a symlink loop given to predict was 'no such image or folder'."""
    path = tmp_path / "input"
    if kind == "a symlink loop":
        path.symlink_to(path)
    else:
        os.mkfifo(path)
    assert cli_error(capsys, "predict", path, "--run", finished_runs["linear"]) == (
        f"error: {path}: {kind}, not an image or folder")
