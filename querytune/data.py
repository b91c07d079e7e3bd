"""Image tasks on disk: list files and class folders, images, the VTAB-1k transform.

A task folder holds its splits in one of five layouts, detected in this order:

1. Hugging Face ``datasets`` folder, written by ``save_to_disk`` (``dataset_dict.json`` and a
   folder per split, or one dataset, the split ``all``): an image column and a label column
   (its ``ClassLabel`` names the classes). Reading it needs the ``datasets`` extra.
2. JSON annotations, the FGVC layout of VPT and NOAH: ``<split>.json`` holding
   ``{"<relative image path>": label, ...}`` (or a list of such one-key objects), images
   under the folder itself, ``images/`` or ``Images/``. Labels (integers or names) are
   numbered in sorted order over all the splits.
3. VTAB-1k task folder: ``<split>.txt`` lists, one ``<relative image path> <int label>``
   per line, and an optional ``classes.txt`` (line i names label i).
4. CSV lists: ``<split>.csv`` with a header naming a ``path`` (or ``image``/``filename``)
   column and a ``label`` column; labels are integers or class names.
5. Class folders: ``<split>/<class name>/<image>`` (e.g. ``train/`` and ``test/``, or
   ``train/`` ``val/`` ``test/``), or ``<class name>/<image>`` directly in the task folder,
   which is then the split ``all``.

Training defaults to the split ``train800val200`` (VTAB-1k), else ``train``
(:func:`default_train_split`).

Problems with the folder, a list or an image raise :class:`DataError` naming the file
(and the line, for lists).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, DataError, QuerytuneError, one_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

HF_DATASETS = "Hugging Face datasets folder"
JSON_LISTS = "JSON annotation folder"
VTAB = "VTAB-1k task folder"
CSV = "CSV list folder"
FOLDERS = "class-folder layout"

DEFAULT_TRAIN_SPLITS = ("train800val200", "train")
# Where the image paths of JSON annotations start: VPT's FGVC folders use each of these.
_JSON_IMAGE_FOLDERS = ("", "images", "Images")
# RandomResizedCrop's ranges, as torchvision's and timm's defaults (and the FGVC protocols) use them.
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)

_PATH_COLUMNS = ("path", "image", "filename")
# Files beside the split lists that are not lists themselves.
_NOT_LISTS = frozenset({"classes", "readme", "license"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

# One list entry: line number, image path text, label text.
Row = tuple[int, str, str]


@dataclass(frozen=True)
class ImageList:
    """The images of one split of a task, with their integer labels."""

    root: Path
    split: str
    items: tuple[tuple[Path, int], ...]
    classes: tuple[str, ...] | None
    # Largest label in any of the task's lists, set where the classes are unknown so
    # that every split of a task agrees on num_classes (a small split may lack the last class).
    max_label: int | None = None
    # The list file or class folder the split was read from (for messages).
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        if self.max_label is not None:
            return self.max_label + 1
        return max(label for _, label in self.items) + 1

    @property
    def task(self) -> str:
        return self.root.name

    def fingerprint(self) -> str:
        """sha256 of the split, the relative paths, labels, sizes and mtimes of its images."""
        digest = hashlib.sha256(json.dumps(self.split).encode())
        for path, label in self.items:
            try:
                stat = path.stat()
            except OSError as error:
                raise DataError(f"{path}: cannot read image ({error.strerror})") from error
            record = [path.relative_to(self.root).as_posix(), label, stat.st_size, stat.st_mtime_ns]
            digest.update(b"\n" + json.dumps(record).encode())
        return digest.hexdigest()

    def load(self, index: int) -> Image.Image:
        """Image ``index``, fully decoded, in RGB."""
        return load_image(self.items[index][0])


@dataclass(frozen=True)
class DatasetsImageList(ImageList):
    """A split of a Hugging Face ``datasets`` folder (``source``, the split's own folder): its images
    are rows of the split's Arrow files, so an item's path is only a name, ``<source>/row-<i>``."""

    image_column: str = "image"

    def fingerprint(self) -> str:
        """sha256 of the split, its image column, the names, sizes and mtimes of its files, and its labels."""
        assert self.source is not None
        digest = hashlib.sha256(json.dumps([self.split, self.image_column]).encode())
        for file in sorted(self.source.iterdir()):
            stat = file.stat()
            digest.update(b"\n" + json.dumps([file.name, stat.st_size, stat.st_mtime_ns]).encode())
        digest.update(json.dumps([label for _, label in self.items]).encode())
        return digest.hexdigest()

    def load(self, index: int) -> Image.Image:
        assert self.source is not None
        try:
            image = _datasets_split(self.source)[index][self.image_column]
            if image is None:
                raise DataError(f"{self.source}: row {index} has no image")
            image.load()
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
            raise DataError(f"{self.source}: row {index}: cannot read image ({one_line(error)})") from error
        return _to_rgb(image)


def open_split(data: str | Path, split: str) -> ImageList:
    """The images and labels of ``split`` in the task folder ``data``.

    Every listed image must exist (checked here); whether it decodes is checked by
    :func:`load_image` when it is used.
    """
    root = _task_folder(data)
    layout, splits = _layout(root)
    if not splits:
        raise DataError(
            f"{root}: no split found (expected <split>.txt, <split>.csv or <split>.json lists, class folders or "
            "a datasets save_to_disk folder)"
        )
    if split not in splits:
        raise DataError(f"{root}: no split {split!r} in this {layout}; available: {', '.join(sorted(splits))}")
    if layout == FOLDERS:
        return _open_folders(root, split, splits)
    if layout == HF_DATASETS:
        return _open_datasets(root, split, splits)
    if layout == JSON_LISTS:
        return _open_json(root, split, splits)
    return _open_list(root, split, layout, splits)


def list_splits(data: str | Path) -> list[str]:
    """The splits the task folder ``data`` offers, sorted."""
    return sorted(_layout(_task_folder(data))[1])


def default_train_split(data: str | Path) -> str:
    """The split to train on where none is named: ``train800val200`` (VTAB-1k), else ``train``."""
    splits = list_splits(data)
    for split in DEFAULT_TRAIN_SPLITS:
        if split in splits:
            return split
    raise DataError(f"{_task_folder(data)}: no {' or '.join(DEFAULT_TRAIN_SPLITS)} split to train on; name one "
                    f"with --train-split (available: {', '.join(splits) or 'none'})")


class Preprocess:
    """The VTAB-1k transform: RGB, bicubic resize to ``image_size`` squared (no crop), normalise.

    Called with a random generator, it augments as the FGVC protocols do: a random resized crop
    (scale 0.08-1, aspect ratio 3/4-4/3) and a horizontal flip with probability 1/2 come first.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    @classmethod
    def for_backbone(cls, backbone: Any, image_size: int) -> Preprocess:
        """The transform at ``image_size`` with the backbone's normalisation (``backbone.config``), which
        must be known: a loader that cannot tell it leaves it None rather than guess."""
        config = backbone.config
        if config.mean is None or config.std is None:
            raise ConfigError(f"backbone {config.name}: its normalisation is unknown (its checkpoint names none); "
                              "give --mean and --std, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 "
                              "(ImageNet's)")
        return cls(image_size, config.mean, config.std)

    def __call__(self, image: Image.Image, augment: np.random.Generator | None = None) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        image = _to_rgb(image)
        if augment is not None:
            image = _random_resized_crop(image, augment)
            if augment.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (S, S, 3)
        return pixels.permute(2, 0, 1).float().div_(255).sub_(self._mean).div_(self._std)


def check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple[float, ...],
                                                                                             tuple[float, ...]]:
    """A user's ``--mean``/``--std``: both, three values each (R, G, B), std positive."""
    if mean is None or std is None:
        raise ConfigError("--mean and --std go together: give both")
    try:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--mean and --std need numbers, got {mean!r} and {std!r}") from error
    for name, values in (("--mean", mean), ("--std", std)):
        if len(values) != 3:
            raise ConfigError(f"{name} needs 3 values (R, G, B), got {len(values)}: {list(values)}")
    if min(std) <= 0:
        raise ConfigError(f"--std must be positive, got {list(std)}")
    return mean, std


def load_image(source: Path | str | bytes, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """The image in the file ``source`` (or in the bytes ``source``, called ``name`` in errors), fully decoded, in
    RGB. One of more than ``max_pixels`` (width x height) is refused before it is decoded."""
    opened: io.BytesIO | Path
    if isinstance(source, bytes):
        name, empty, opened = name or "image", not source, io.BytesIO(source)
    else:
        opened = Path(source)
        name, empty = name or str(opened), opened.is_file() and opened.stat().st_size == 0
    try:
        with Image.open(opened) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise DataError(f"{name}: {image.width}x{image.height} pixels, more than the {max_pixels} allowed")
            image.load()  # PIL decodes lazily: truncation only shows here
            return _to_rgb(image)
    except UnidentifiedImageError as error:
        reason = "empty file" if empty else "not a recognised image format"
        raise DataError(f"{name}: cannot read image ({reason})") from error
    except OSError as error:
        raise DataError(f"{name}: cannot read image ({error.strerror or one_line(error)})") from error
    # PIL's decoders also raise these for damaged files (and DecompressionBombError for huge ones).
    except (ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{name}: cannot read image ({one_line(error)})") from error


def private_generator() -> torch.Generator:
    """For DataLoaders: each loader iterator draws a seed from its generator, and drawing it from
    the global RNG would shift the methods' dropout masks depending on where inputs come from."""
    return torch.Generator().manual_seed(0)


def iterate_loader(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate ``loader``; a QuerytuneError raised in a worker process comes out with its own one-line message.

    PyTorch re-raises a worker's exception in the main process with the worker's whole
    traceback as the message; its last line is ``<module>.<class>: <the original message>``.
    """
    try:
        yield from loader
    except QuerytuneError as error:
        lines = str(error).strip().splitlines()
        if len(lines) < 2:
            raise
        prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
        raise type(error)(lines[-1].removeprefix(prefix)) from None


class ImageDataset(torch.utils.data.Dataset):
    """(preprocessed image, label) pairs of an :class:`ImageList`, which ``images`` holds.

    A key is an index, or (index, seed) for an augmented image whose crop and flip are drawn
    from ``(seed, index)`` alone: whichever worker loads it, and in a resumed run too.
    """

    def __init__(self, images: ImageList, preprocess: Preprocess) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        augment = None if seed is None else np.random.default_rng([seed, index])
        return self.preprocess(self.images.load(index), augment), self.images.items[index][1]


def _random_resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop region: up to 10 draws of an area fraction and a log-uniform
    aspect ratio, then the largest central crop within the ratio bounds."""
    width, height = image.size
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*_CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.crop((left, top, left + w, top + h))
    w, h = width, height
    if width / height < _CROP_RATIO[0]:
        h = round(width / _CROP_RATIO[0])
    elif width / height > _CROP_RATIO[1]:
        w = round(height * _CROP_RATIO[1])
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits as PNG decoders do; PIL's convert would clip at 255.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct conversion warns on every such image
    return image if image.mode == "RGB" else image.convert("RGB")


# Layouts


def _task_folder(data: str | Path) -> Path:
    # abspath, not resolve: a symlinked task folder keeps its own name (the task's name).
    root = Path(os.path.abspath(Path(data).expanduser()))
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return root


def _layout(root: Path) -> tuple[str, dict[str, Path]]:
    """The folder's layout and its splits, each mapped to its list file or folder."""
    if splits := _datasets_splits(root):
        return HF_DATASETS, splits
    # Before the .txt lists: FGVC folders such as CUB_200_2011 also hold the dataset's own .txt files.
    if lists := _list_files(root, ".json"):
        return JSON_LISTS, lists
    if lists := _list_files(root, ".txt"):
        return VTAB, lists
    if lists := _list_files(root, ".csv"):
        return CSV, lists
    splits = {d.name: d for d in _subfolders(root) if any(_has_images(c) for c in _subfolders(d))}
    if any(_has_images(d) for d in _subfolders(root)):
        splits["all"] = root
    return FOLDERS, splits


def _list_files(root: Path, suffix: str) -> dict[str, Path]:
    return {
        file.stem: file
        for file in sorted(root.glob("*" + suffix))
        if file.is_file() and not file.name.startswith(".") and file.stem.lower() not in _NOT_LISTS
    }


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_image(file: Path) -> bool:
    return file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".") and file.is_file()


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if _is_image(f)) if folder.is_dir() else []


def _has_images(folder: Path) -> bool:
    return any(_is_image(f) for f in folder.iterdir())


# Class folders


def _open_folders(root: Path, split: str, splits: dict[str, Path]) -> ImageList:
    folder = splits[split]
    # Classes are named across all split folders so that every split numbers them alike.
    parents = [folder] if folder == root else [d for d in splits.values() if d != root]
    classes = tuple(sorted({c.name for p in parents for c in _subfolders(p) if _has_images(c)}))
    items = tuple((image, label) for label, name in enumerate(classes) for image in _images(folder / name))
    return ImageList(root, split, items, classes, source=folder)


# Hugging Face datasets folders


def _datasets_splits(root: Path) -> dict[str, Path]:
    """The splits of a ``save_to_disk`` folder: a DatasetDict's (one folder each), or one Dataset's, ``all``."""
    index = root / "dataset_dict.json"
    if index.is_file():
        try:
            names = json.loads(_read_text(index))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{index}: not a datasets split index ({one_line(error)})") from error
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise DataError(f"{index}: 'splits' must be a list of names, got {names!r}")
        return {name: root / name for name in names}
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        return {"all": root}
    return {}


@functools.lru_cache(maxsize=16)
def _datasets_split(folder: Path) -> Any:
    """The ``datasets.Dataset`` saved in ``folder``, opened once per process (memory-mapped)."""
    try:
        import datasets
    except ImportError as error:
        raise ConfigError(f"{folder}: a Hugging Face datasets folder; reading it needs the datasets extra: "
                          "pip install 'querytune[datasets]'") from error
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as error:  # a damaged folder raises anything from FileNotFoundError to Arrow's own errors
        raise DataError(f"{folder}: cannot open this datasets folder ({one_line(error)})") from error


def _datasets_columns(dataset: Any, folder: Path) -> tuple[str, str]:
    """The image column (the one of the Image feature) and the label column (``label``/``labels``, else
    the one ClassLabel column)."""
    import datasets

    features = dataset.features
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(images) != 1:
        raise DataError(f"{folder}: expected one image column, found {len(images)} (columns: {', '.join(features)})")
    labels = [name for name in ("label", "labels") if name in features]
    labels = labels or [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(labels) != 1:
        raise DataError(f"{folder}: expected a label column ('label', or one ClassLabel column), found "
                        f"{len(labels)} (columns: {', '.join(features)})")
    return images[0], labels[0]


def _datasets_labels(folder: Path) -> tuple[list[int], tuple[str, ...] | None]:
    """A split's labels and, where its label column is a ClassLabel, the class names."""
    dataset = _datasets_split(folder)
    _, column = _datasets_columns(dataset, folder)
    names = getattr(dataset.features[column], "names", None)
    labels = list(dataset[column])
    for row, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataError(f"{folder}: row {row}: label {label!r} is not a class number")
        if names is not None and label >= len(names):
            raise DataError(f"{folder}: row {row}: label {label} is out of range: the dataset names {len(names)} "
                            "classes")
    return labels, tuple(names) if names is not None else None


def _open_datasets(root: Path, split: str, splits: dict[str, Path]) -> ImageList:
    folder = splits[split]
    image_column, _ = _datasets_columns(_datasets_split(folder), folder)
    labels, classes = _datasets_labels(folder)
    if not labels:
        raise DataError(f"{folder}: split {split!r} holds no images ({HF_DATASETS})")
    max_label = None
    if classes is None:  # numbered over every split, so that all agree on num_classes
        max_label = max(max(_datasets_labels(other)[0], default=0) for other in splits.values())
    items = tuple((folder / f"row-{row}", label) for row, label in enumerate(labels))
    return DatasetsImageList(root, split, items, classes, max_label, folder, image_column)


# JSON annotations (FGVC)


def _open_json(root: Path, split: str, lists: dict[str, Path]) -> ImageList:
    file = lists[split]
    entries = _read_json_list(file)
    if not entries:
        raise DataError(f"{file}: split {split!r} lists no images ({JSON_LISTS})")
    all_labels = {label for other in lists.values() for _, label in _read_json_list(other)}
    if len({type(label) for label in all_labels}) > 1:
        raise DataError(f"{root}: the {JSON_LISTS}'s lists mix integer labels and class names")
    classes = sorted(all_labels)  # numbered in this order in every split, as VPT's JSONDataset does
    number = {label: i for i, label in enumerate(classes)}
    first = entries[0][0]
    images = next((root / name for name in _JSON_IMAGE_FOLDERS if (root / name / first).is_file()), None)
    if images is None:
        raise DataError(f"{file}: its first image {first!r} is not in {root}, {root}/images or {root}/Images")
    items = tuple((_image_path(images, f"{file}, entry {n}", path), number[label])
                  for n, (path, label) in enumerate(entries, 1))
    return ImageList(root, split, items, tuple(str(label) for label in classes), source=file)


def _read_json_list(file: Path) -> list[tuple[str, int | str]]:
    """The (image path, label) entries of an FGVC annotation file."""
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as error:
        raise DataError(f"{file}:{error.lineno}: not JSON ({error.msg})") from error
    if isinstance(data, list) and all(isinstance(entry, dict) and len(entry) == 1 for entry in data):
        entries = [pair for entry in data for pair in entry.items()]
    elif isinstance(data, dict):
        entries = list(data.items())
    else:
        raise DataError(f'{file}: expected {{"<image path>": <label>, ...}} or a list of such one-key objects')
    for n, (path, label) in enumerate(entries, 1):
        if type(label) not in (int, str):  # type(): a JSON true is a bool, not a class
            raise DataError(f"{file}, entry {n}: label {label!r} of {path!r} is neither an integer nor a class name")
    return entries


# List files


def _open_list(root: Path, split: str, layout: str, lists: dict[str, Path]) -> ImageList:
    read = _read_vtab if layout == VTAB else _read_csv
    file = lists[split]
    rows = read(file)
    if not rows:
        raise DataError(f"{file}: split {split!r} lists no images ({layout})")

    classes_file = root / "classes.txt"
    classes = _read_classes(classes_file)
    by_name = layout == CSV and not _is_number(rows[0][2])
    names_file = classes_file if classes is not None else None
    if by_name and classes is None:
        # Named across all lists so that every split numbers the classes alike. Numbers are
        # left out: one among class names is reported at its line below.
        names = {label for f in lists.values() for *_, label in read(f) if not _is_number(label)}
        classes = tuple(sorted(names))
    index = {name: i for i, name in enumerate(classes or ())}

    items = []
    for line, path_text, label_text in rows:
        image = _image_path(root, f"{file}:{line}", path_text)
        if by_name:
            label = _class_label(file, line, label_text, index, names_file, rows[0])
        else:
            label = _integer_label(file, line, label_text)
            if classes is not None and label >= len(classes):
                raise DataError(
                    f"{file}:{line}: label {label} is out of range: {classes_file} names {len(classes)} classes"
                )
        items.append((image, label))

    max_label = None
    if classes is None:
        max_label = max(int(label) for f in lists.values() for *_, label in read(f) if _is_integer(label))
    return ImageList(root, split, tuple(items), classes, max_label, file)


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text") from error


def _read_vtab(file: Path) -> list[Row]:
    rows = []
    for line, text in enumerate(_read_text(file).split("\n"), 1):
        text = text.strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)  # the last field is the label; paths may hold spaces
        if len(parts) < 2:
            raise DataError(f"{file}:{line}: expected '<image path> <label>', got {text!r}")
        rows.append((line, parts[0], parts[1]))
    return rows


def _read_csv(file: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(_read_text(file), newline=""))
    header = next((r for r in reader if any(c.strip() for c in r)), None)
    if header is None:
        return []
    columns = [c.strip().lower() for c in header]
    path_column = next((columns.index(c) for c in _PATH_COLUMNS if c in columns), None)
    if path_column is None or "label" not in columns:
        raise DataError(
            f"{file}:{reader.line_num}: the header needs a 'path' (or 'image', 'filename') column "
            f"and a 'label' column, got {header}"
        )
    label_column = columns.index("label")
    rows = []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        cells = [row[i].strip() if i < len(row) else "" for i in (path_column, label_column)]
        if not all(cells):
            raise DataError(f"{file}:{reader.line_num}: expected an image path and a label, got {row}")
        rows.append((reader.line_num, cells[0], cells[1]))
    return rows


def _read_classes(file: Path) -> tuple[str, ...] | None:
    if not file.is_file():
        return None
    names = [name.strip() for name in _read_text(file).split("\n")]
    while names and not names[-1]:
        names.pop()
    seen: dict[str, int] = {}
    for line, name in enumerate(names, 1):
        if not name:
            raise DataError(f"{file}:{line}: empty class name")
        if name in seen:
            raise DataError(f"{file}:{line}: class {name!r} already named on line {seen[name]}")
        seen[name] = line
    if not names:
        raise DataError(f"{file}: no class names")
    return tuple(names)


def _is_integer(text: str) -> bool:
    return _INTEGER.fullmatch(text) is not None


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def _integer_label(file: Path, line: int, text: str) -> int:
    if not _is_integer(text):
        raise DataError(f"{file}:{line}: label {text!r} is not an integer")
    label = int(text)
    if label < 0:
        raise DataError(f"{file}:{line}: label {label} is negative")
    return label


def _class_label(file: Path, line: int, text: str, index: dict[str, int], classes_file: Path | None, first: Row) -> int:
    if text in index:
        return index[text]
    if classes_file is not None:
        raise DataError(f"{file}:{line}: label {text!r} is not a class in {classes_file}")
    raise DataError(
        f"{file}:{line}: label {text!r} is a number, but this file labels by class name (line {first[0]}: {first[2]!r})"
    )


def _image_path(root: Path, where: str, text: str) -> Path:
    """The listed image ``text`` under ``root``; ``where`` names the list entry in messages."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise DataError(f"{where}: image path {text!r} contains control characters")
    if Path(text).is_absolute():
        raise DataError(f"{where}: image path {text!r} is absolute; list it relative to {root}")
    # Lexical, not resolved: symlinks inside the task folder may point elsewhere (shared image stores).
    path = Path(os.path.normpath(root / text))
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image path {text!r} leads outside the task folder {root}")
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return path
