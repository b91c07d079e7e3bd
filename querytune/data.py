"""Image tasks on disk: list files and class folders, images, the VTAB-1k transform.

A task folder holds its splits in one of three layouts, detected in this order:

1. VTAB-1k task folder: ``<split>.txt`` lists, one ``<relative image path> <int label>``
   per line, and an optional ``classes.txt`` (line i names label i).
2. CSV lists: ``<split>.csv`` with a header naming a ``path`` (or ``image``/``filename``)
   column and a ``label`` column; labels are integers or class names.
3. Class folders: ``<split>/<class name>/<image>``, or ``<class name>/<image>`` directly
   in the task folder, which is then the split ``all``.

Problems with the folder, a list or an image raise :class:`DataError` naming the file
(and the line, for lists).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
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

VTAB = "VTAB-1k task folder"
CSV = "CSV list folder"
FOLDERS = "class-folder layout"

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


def open_split(data: str | Path, split: str) -> ImageList:
    """The images and labels of ``split`` in the task folder ``data``.

    Every listed image must exist (checked here); whether it decodes is checked by
    :func:`load_image` when it is used.
    """
    root = _task_folder(data)
    layout, splits = _layout(root)
    if not splits:
        raise DataError(
            f"{root}: no split found (expected <split>.txt lists, <split>.csv lists or class folders)"
        )
    if split not in splits:
        raise DataError(f"{root}: no split {split!r} in this {layout}; available: {', '.join(sorted(splits))}")
    if layout == FOLDERS:
        return _open_folders(root, split, splits)
    return _open_list(root, split, layout, splits)


def list_splits(data: str | Path) -> list[str]:
    """The splits the task folder ``data`` offers, sorted."""
    return sorted(_layout(_task_folder(data))[1])


class Preprocess:
    """The VTAB-1k transform: RGB, bicubic resize to ``image_size`` squared (no crop), normalise."""

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

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        image = _to_rgb(image).resize(size, Image.Resampling.BICUBIC)
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
    """(preprocessed image, label) pairs of an :class:`ImageList`, which ``images`` holds."""

    def __init__(self, images: ImageList, preprocess: Preprocess) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.images.items[index]
        return self.preprocess(load_image(path)), label


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
        image = _image_path(root, file, line, path_text)
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


def _image_path(root: Path, file: Path, line: int, text: str) -> Path:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise DataError(f"{file}:{line}: image path {text!r} contains control characters")
    if Path(text).is_absolute():
        raise DataError(f"{file}:{line}: image path {text!r} is absolute; list it relative to {root}")
    # Lexical, not resolved: symlinks inside the task folder may point elsewhere (shared image stores).
    path = Path(os.path.normpath(root / text))
    if not path.is_relative_to(root):
        raise DataError(f"{file}:{line}: image path {text!r} leads outside the task folder {root}")
    if not path.is_file():
        raise DataError(f"{file}:{line}: image not found: {path}")
    return path
