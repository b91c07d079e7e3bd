"""A task folder: which of the five layouts it is in, its splits, and the one to train on."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .class_folders import FOLDERS, has_images, open_folders, subfolders
from .core import ImageList
from .fgvc_json import JSON_LISTS, open_json
from .hf_datasets import HF_DATASETS, datasets_splits, open_datasets
from .lists import CSV, VTAB, open_list
from .splits import TRAIN

DEFAULT_TRAIN_SPLITS = (TRAIN, "train")
# Files beside the split lists that are not lists themselves.
_NOT_LISTS = frozenset({"classes", "readme", "license"})


def open_split(data: str | Path, split: str) -> ImageList:
    """The images and labels of ``split`` in the task folder ``data``.

    Every listed image must exist (checked here); whether it decodes is checked by
    :func:`load_image` when it is used.
    """
    root = _task_folder(data)
    layout, splits = _layout(root)
    if not splits:
        raise DataError(
            f"{root}: no split found (expected a datasets save_to_disk folder, <split>.json, <split>.txt or "
            "<split>.csv lists, or class folders)"
        )
    if split not in splits:
        raise DataError(f"{root}: no split {split!r} in this {layout}; available: {', '.join(sorted(splits))}")
    if layout == FOLDERS:
        return open_folders(root, split, splits)
    if layout == HF_DATASETS:
        return open_datasets(root, split, splits)
    if layout == JSON_LISTS:
        return open_json(root, split, splits)
    return open_list(root, split, layout, splits)


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


def check_outside_task(data: str | Path, folder: str | Path, flag: str) -> None:
    """``folder``, one querytune writes (``--out``, ``--cache``), must not lie inside the task folder ``data``:
    a data folder is never written to (in a class-folder task it would even be read as one of its classes, a
    run's ``curves.png`` as its image)."""
    root = Path(os.path.realpath(Path(data).expanduser()))
    if root.is_dir() and Path(os.path.realpath(folder)).is_relative_to(root):
        raise DataError(f"{flag} {folder}: inside the task folder {data}, which querytune never writes to; "
                        "choose a folder outside it")


def _task_folder(data: str | Path) -> Path:
    # abspath, not resolve: a symlinked task folder keeps its own name (the task's name).
    root = Path(os.path.abspath(Path(data).expanduser()))
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return root


def _layout(root: Path) -> tuple[str, dict[str, Path]]:
    """The folder's layout and its splits, each mapped to its list file or folder."""
    if splits := datasets_splits(root):
        return HF_DATASETS, splits
    # Before the .txt lists: FGVC folders such as CUB_200_2011 also hold the dataset's own .txt files.
    if lists := _list_files(root, ".json"):
        return JSON_LISTS, lists
    if lists := _list_files(root, ".txt"):
        return VTAB, lists
    if lists := _list_files(root, ".csv"):
        return CSV, lists
    splits = {d.name: d for d in subfolders(root) if any(has_images(c) for c in subfolders(d))}
    if any(has_images(d) for d in subfolders(root)):
        splits["all"] = root
    return FOLDERS, splits


def _list_files(root: Path, suffix: str) -> dict[str, Path]:
    return {
        file.stem: file
        for file in sorted(root.glob("*" + suffix))
        if file.is_file() and not file.name.startswith(".") and file.stem.lower() not in _NOT_LISTS
    }
