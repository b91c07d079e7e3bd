"""List files: VTAB-1k's ``<split>.txt`` (``<path> <int label>`` lines) and ``<split>.csv`` lists, both read
by :func:`open_list`, each with its own row reader; ``classes.txt`` names the classes where present."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from ..errors import DataError
from .core import ImageList, image_path, read_text

VTAB = "VTAB-1k task folder"
CSV = "CSV list folder"
_PATH_COLUMNS = ("path", "image", "filename")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# One list entry: line number, image path text, label text.
Row = tuple[int, str, str]


def open_list(root: Path, split: str, layout: str, lists: dict[str, Path]) -> ImageList:
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
        image = image_path(root, f"{file}:{line}", path_text)
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


def _read_vtab(file: Path) -> list[Row]:
    rows = []
    for line, text in enumerate(read_text(file).split("\n"), 1):
        text = text.strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)  # the last field is the label; paths may hold spaces
        if len(parts) < 2:
            raise DataError(f"{file}:{line}: expected '<image path> <label>', got {text!r}")
        rows.append((line, parts[0], parts[1]))
    return rows


def _read_csv(file: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
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
    names = [name.strip() for name in read_text(file).split("\n")]
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
