"""Task folders cut from a VTAB-1k task folder: fewer training images (:func:`cut_lists`) or the folds of a
cross-validation (:func:`fold_lists`), written by :func:`write_task` as new list files beside links to the
task's images, so that no image is copied.

A written folder keeps the task's name and the relative paths of its images, so its splits have the same
feature-cache entries as the task's own where they list the same images (:mod:`querytune.trunk.cache`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ..errors import DataError
from .core import read_text
from .splits import SEARCH_TRAIN, SEARCH_VAL, TEST, TRAIN


def list_lines(task: Path, split: str) -> list[str]:
    """The entries of the task's VTAB-1k list ``<split>.txt``, one a line."""
    file = task / f"{split}.txt"
    if not file.is_file():
        raise DataError(f"{task}: no {file.name}; a cut needs a VTAB-1k task folder ({TRAIN}, {SEARCH_TRAIN}, "
                        f"{SEARCH_VAL} and {TEST} lists)")
    return [line.strip() for line in read_text(file).splitlines() if line.strip()]


def sample(lines: list[str], count: int, rng: random.Random) -> list[str]:
    """``count`` of ``lines`` drawn at random, in their listed order."""
    kept = set(rng.sample(range(len(lines)), count))
    return [line for index, line in enumerate(lines) if index in kept]


def cut_lists(task: Path, images: int, seed: int = 0) -> dict[str, list[str]]:
    """The task's lists with its training split cut to ``images`` images: train800 and val200 shrunk in
    proportion (drawn at random with ``seed``), train800val200 their union in its order, test unchanged."""
    train, val, whole = (list_lines(task, split) for split in (SEARCH_TRAIN, SEARCH_VAL, TRAIN))
    if not 2 <= images <= len(whole):
        raise DataError(f"{task}: cannot cut {TRAIN} ({len(whole)} images) to {images} images")
    val_count = min(len(val), max(1, round(images * len(val) / len(whole))))
    rng = random.Random(seed)
    kept_train, kept_val = sample(train, images - val_count, rng), sample(val, val_count, rng)
    kept = set(kept_train) | set(kept_val)
    return {SEARCH_TRAIN: kept_train, SEARCH_VAL: kept_val, TRAIN: [line for line in whole if line in kept],
            TEST: list_lines(task, TEST)}


def fold_lists(task: Path, folds: int, fold: int, seed: int = 0) -> dict[str, list[str]]:
    """Fold ``fold`` of a ``folds``-fold cross-validation over the task's train800val200: its train800 the
    other folds, its val200 this one (the folds drawn at random with ``seed``), train800val200 unchanged, and
    no test list: a search on the folds cannot read the test split."""
    whole = list_lines(task, TRAIN)
    if not 2 <= folds <= len(whole) or not 0 <= fold < folds:
        raise DataError(f"{task}: no fold {fold} of {folds} over {TRAIN} ({len(whole)} images)")
    order = list(range(len(whole)))
    random.Random(seed).shuffle(order)
    held_out = set(order[fold::folds])
    return {SEARCH_TRAIN: [line for index, line in enumerate(whole) if index not in held_out],
            SEARCH_VAL: [line for index, line in enumerate(whole) if index in held_out],
            TRAIN: whole}


def write_task(task: Path, out: Path, lists: dict[str, list[str]]) -> Path:
    """A task folder ``out/<task's name>`` with ``lists`` as its split lists and links to everything else of
    ``task`` (its images, classes.txt) but its other split lists; returns it. Rewriting it is a no-op."""
    task = Path(os.path.abspath(task))
    folder = Path(out) / task.name
    folder.mkdir(parents=True, exist_ok=True)
    task_lists = {file.stem for file in task.glob("*.txt") if file.stem in (TRAIN, SEARCH_TRAIN, SEARCH_VAL, TEST)}
    for entry in sorted(task.iterdir()):
        link = folder / entry.name
        if entry.stem in task_lists and entry.suffix == ".txt" or entry.name.startswith("."):
            continue
        if not link.is_symlink():
            link.symlink_to(entry)
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
    return folder
