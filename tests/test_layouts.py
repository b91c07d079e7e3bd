"""Data as users have it: class folders with train/ and test/, FGVC JSON annotations, Hugging Face
``datasets`` folders, and ``--augment``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from querytune import cli
from querytune.data import ImageDataset, Preprocess, default_train_split, list_splits, open_split
from querytune.errors import ConfigError, DataError
from querytune.run import train_run
from querytune.settings import RunSpec, Runtime
from querytune.trunk.sources import ImageBatches

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def class_folders(root: Path, splits: tuple[str, ...], per_class: int = 2) -> Path:
    for split in splits:
        for label, name in enumerate(("cat", "dog", "owl")):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", COLOURS[label])
    return root


def error_of(data: Path, split: str) -> str:
    with pytest.raises(DataError) as caught:
        open_split(data, split)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# Class folders: the default split


@pytest.mark.parametrize("splits", [("train", "test"), ("train", "val", "test")])
def test_class_folders_train_on_train_by_default(tmp_path: Path, splits: tuple[str, ...]):
    root = class_folders(tmp_path / "pets", splits)
    assert list_splits(root) == sorted(splits)
    assert default_train_split(root) == "train"
    assert open_split(root, "test").classes == ("cat", "dog", "owl")


def test_vtab_folders_train_on_train800val200_by_default(tiny_task: Path):
    assert default_train_split(tiny_task) == "train800val200"


def test_no_default_split_names_the_flag(tmp_path: Path):
    root = class_folders(tmp_path / "pets", ("fit", "test"))
    with pytest.raises(DataError, match=r"no train800val200 or train split to train on; name one with "
                                        r"--train-split \(available: fit, test\)"):
        default_train_split(root)


def test_train_needs_no_split_flags_on_train_and_test_folders(tiny_backbone_dir: Path, tmp_path: Path):
    root = class_folders(tmp_path / "pets", ("train", "test"))
    metrics = train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=root, image_size=32),
                        tmp_path / "run", train={"epochs": 1, "batch_size": 4},
                        runtime=Runtime(workers=0, progress=False))
    assert metrics["train_split"] == "train" and "test_accuracy" in metrics
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_split"] == "train"


# FGVC JSON annotations


def fgvc(root: Path, image_folder: str = "images", as_list: bool = False) -> Path:
    """VPT's FGVC layout: {split}.json mapping image paths under ``image_folder`` to labels; class
    ids 3, 7, 9 (not contiguous); the test split lacks class 9; CUB's own .txt files beside them."""
    annotations = {"train": {"001.a/1.jpg": 3, "002.b/1.jpg": 7, "003.c/1.jpg": 9, "001.a/2.jpg": 3},
                   "val": {"002.b/2.jpg": 7}, "test": {"002.b/3.jpg": 7, "001.a/3.jpg": 3}}
    for split, entries in annotations.items():
        for path, label in entries.items():
            write_image(root / image_folder / path, COLOURS[[3, 7, 9].index(label)])
        data = [{path: label} for path, label in entries.items()] if as_list else entries
        (root / f"{split}.json").write_text(json.dumps(data))
    (root / "images.txt").write_text("1 001.a/1.jpg\n")  # as in CUB_200_2011: not a split list
    (root / "classes.txt").write_text("1 001.a\n")
    return root


@pytest.mark.parametrize("image_folder", ["images", "Images", ""])
def test_fgvc_json_layout(tmp_path: Path, image_folder: str):
    root = fgvc(tmp_path / "CUB_200_2011", image_folder)
    assert list_splits(root) == ["test", "train", "val"]
    assert default_train_split(root) == "train"
    train = open_split(root, "train")
    base = root / image_folder
    assert train.items == ((base / "001.a/1.jpg", 0), (base / "002.b/1.jpg", 1), (base / "003.c/1.jpg", 2),
                           (base / "001.a/2.jpg", 0))
    assert train.classes == ("3", "7", "9")
    test = open_split(root, "test")
    assert test.num_classes == 3 and [label for _, label in test.items] == [1, 0]  # numbered over all splits
    assert test.source == root / "test.json"


def test_fgvc_json_list_of_one_key_objects(tmp_path: Path):
    root = fgvc(tmp_path / "task", as_list=True)
    assert [label for _, label in open_split(root, "train").items] == [0, 1, 2, 0]


def test_fgvc_json_class_names(tmp_path: Path):
    root = tmp_path / "task"
    write_image(root / "images" / "a.jpg", COLOURS[0])
    write_image(root / "images" / "b.jpg", COLOURS[1])
    (root / "train.json").write_text(json.dumps({"a.jpg": "robin", "b.jpg": "crow"}))
    images = open_split(root, "train")
    assert images.classes == ("crow", "robin") and [label for _, label in images.items] == [1, 0]


@pytest.mark.parametrize("text,expected", [
    ('{"a.jpg": 0,', r"train.json:1: not JSON"),
    ('[1, 2]', r'train.json: expected \{"<image path>": <label>, ...\}'),
    ('{"a.jpg": true}', r"train.json, entry 1: label True of 'a.jpg' is neither an integer nor a class name"),
    ('{"a.jpg": 0, "missing.jpg": 1}', r"train.json, entry 2: image not found: .*images/missing.jpg"),
    ('{"nowhere.jpg": 0}', r"train.json: its first image 'nowhere.jpg' is not in .*, .*/images or .*/Images"),
    ('{"a.jpg": 0, "../../x.jpg": 1}', r"train.json, entry 2: image path '../../x.jpg' leads outside"),
])
def test_bad_fgvc_json(tmp_path: Path, text: str, expected: str):
    root = tmp_path / "task"
    write_image(root / "images" / "a.jpg", COLOURS[0])
    (root / "train.json").write_text(text)
    message = error_of(root, "train")
    assert re.search(expected, message), message


def test_fgvc_json_mixing_numbers_and_names(tmp_path: Path):
    root = fgvc(tmp_path / "task")
    (root / "val.json").write_text(json.dumps({"002.b/2.jpg": "b"}))
    assert "mix integer labels and class names" in error_of(root, "train")


# Hugging Face datasets folders


def hf_images(count: int, label_offset: int = 0) -> dict[str, list]:
    return {"image": [Image.new("RGB", (20, 16), COLOURS[(i + label_offset) % 3]) for i in range(count)],
            "label": [(i + label_offset) % 3 for i in range(count)]}


def test_datasets_dict_folder(tmp_path: Path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "owl"])})
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(hf_images(5), features=features),
                                  "test": datasets.Dataset.from_dict(hf_images(2, 1), features=features)})
    root = tmp_path / "pets-hf"
    saved.save_to_disk(str(root))
    assert list_splits(root) == ["test", "train"] and default_train_split(root) == "train"
    train = open_split(root, "train")
    assert train.classes == ("cat", "dog", "owl") and [label for _, label in train.items] == [0, 1, 2, 0, 1]
    dataset = ImageDataset(train, Preprocess(8, (0.5,) * 3, (0.5,) * 3))
    pixels, label = dataset[2]
    assert label == 2 and pixels.shape == (3, 8, 8)
    expected = (torch.tensor(COLOURS[2], dtype=torch.float32) / 255 - 0.5) / 0.5
    torch.testing.assert_close(pixels[:, 4, 4], expected, atol=0.02, rtol=0)
    assert train.fingerprint() == open_split(root, "train").fingerprint() != open_split(root, "test").fingerprint()


def test_datasets_single_folder_with_integer_labels_is_split_all(tmp_path: Path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    root = tmp_path / "one"
    datasets.Dataset.from_dict(hf_images(4), features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")})).save_to_disk(str(root))
    images = open_split(root, "all")
    assert images.classes is None and images.num_classes == 3 and len(images) == 4


def test_datasets_folder_without_image_column(tmp_path: Path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    root = tmp_path / "text"
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(root))
    assert "expected one image column, found 0 (columns: text, label)" in error_of(root, "all")


def test_datasets_corrupt_image_is_named_with_its_row(tmp_path: Path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    root = tmp_path / "broken"
    rows = {"image": [{"bytes": b"not an image", "path": None}], "label": [0]}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})).save_to_disk(str(root))
    images = open_split(root, "all")
    with pytest.raises(DataError, match=r"broken: row 0: cannot read image"):
        images.load(0)


def test_datasets_folder_without_the_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "saved"
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (root / "train").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(ConfigError, match=r"needs the datasets extra: pip install 'querytune\[datasets\]'"):
        open_split(root, "train")


# Augmentation


def test_augment_crops_and_flips_from_its_seed():
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # left half white
    image = Image.fromarray(pixels)
    preprocess = Preprocess(8, (0.0,) * 3, (1.0,) * 3)
    plain = preprocess(image)
    views = [preprocess(image, np.random.default_rng(seed)) for seed in range(8)]
    assert all(view.shape == plain.shape for view in views)
    torch.testing.assert_close(preprocess(image, np.random.default_rng(3)), views[3])
    assert sum(not torch.equal(view, plain) for view in views) >= 6
    flipped = [view for view in views if view[:, :, 0].mean() < view[:, :, -1].mean()]  # white on the right
    assert 0 < len(flipped) < len(views)


def test_augmented_batches_repeat_for_the_same_order_and_differ_for_another(tmp_path: Path):
    root = class_folders(tmp_path / "pets", ("train",), per_class=1)
    for path, _ in open_split(root, "train").items:  # a gradient, so that crops differ
        Image.fromarray(np.tile(np.arange(0, 240, 12, dtype=np.uint8), (16, 1))).convert("RGB").save(path)
    images = open_split(root, "train")
    source = ImageBatches(images, Preprocess(8, (0.5,) * 3, (0.5,) * 3), augment=True)
    first, again, other = (torch.cat([x for x, _ in source.batches(np.array(order), 2)])
                           for order in ([0, 1, 2], [0, 1, 2], [2, 1, 0]))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other[[2, 1, 0]])
    plain = torch.cat([x for x, _ in ImageBatches(images, source.dataset.preprocess).batches(np.arange(3), 2)])
    assert not torch.equal(first, plain)


def test_augment_is_refused_for_cached_features(tiny_backbone_dir: Path, tiny_task: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "-m", "vqt", "-b", str(tiny_backbone_dir), "-d", str(tiny_task), "-o", str(out),
                  "--augment", "-q"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --augment: cached features hold one view of each image, computed once; augmenting needs the "
        "frozen trunk run live every epoch: add --no-cache")
    assert not out.exists()


@pytest.mark.parametrize("method,no_cache", [("bitfit", []), ("linear", ["--no-cache"])])
def test_augment_trains_methods_that_run_the_trunk_live(method: str, no_cache: list[str], tiny_backbone_dir: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture):
    root = class_folders(tmp_path / "pets", ("train", "test"))
    out = tmp_path / "run"
    cli.main(["train", "-m", method, "-b", str(tiny_backbone_dir), "-d", str(root), "-o", str(out), "--augment",
              "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0", "-q", *no_cache])
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["augment"] is True and config["train_split"] == "train"
    assert (out / "metrics.json").is_file()


def test_train_and_eval_on_a_datasets_folder_through_the_feature_cache(tiny_backbone_dir: Path, tmp_path: Path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    root = tmp_path / "hf-task"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(hf_images(6), features=features),
                          "test": datasets.Dataset.from_dict(hf_images(3), features=features)}).save_to_disk(str(root))
    cache = tmp_path / "cache"
    metrics = train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=root, image_size=32),
                        tmp_path / "run", train={"epochs": 1, "batch_size": 3},
                        runtime=Runtime(workers=0, cache=cache, progress=False))
    assert metrics["train_split"] == "train" and "test_accuracy" in metrics
    assert any(cache.rglob("*")), "the features were not cached"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["classes"] == ["a", "b", "c"] and config["num_classes"] == 3
