"""Class folders: ``<split>/<class name>/<image>``, or ``<class name>/<image>`` directly in the task folder."""

from __future__ import annotations

from pathlib import Path

from .core import IMAGE_SUFFIXES, ImageList

FOLDERS = "class-folder layout"


def open_folders(root: Path, split: str, splits: dict[str, Path]) -> ImageList:
    folder = splits[split]
    # Classes are named across all split folders so that every split numbers them alike.
    parents = [folder] if folder == root else [d for d in splits.values() if d != root]
    classes = tuple(sorted({c.name for p in parents for c in subfolders(p) if has_images(c)}))
    items = tuple((image, label) for label, name in enumerate(classes) for image in _images(folder / name))
    return ImageList(root, split, items, classes, source=folder)


def subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_image(file: Path) -> bool:
    return file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".") and file.is_file()


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if _is_image(f)) if folder.is_dir() else []


def has_images(folder: Path) -> bool:
    return any(_is_image(f) for f in folder.iterdir())
