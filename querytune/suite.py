"""A suite of tasks for the bench: task folders with their VTAB groups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .data import list_splits
from .data.splits import FINAL, SEARCH
from .errors import ConfigError, DataError

VTAB_SPLITS = (*FINAL, *SEARCH)  # a folder offering any of these looks like a VTAB-1k task


@dataclass(frozen=True)
class SuiteTask:
    """A task of a bench's suite: its name, folder and VTAB group."""

    name: str
    path: Path
    group: str


def discover_tasks(suite: Path, groups: dict[str, str] | None = None) -> list[SuiteTask]:
    """Task folders of a suite with their groups; a task folder itself is a suite of that one task.

    Groups come from ``groups`` (explicit), else a ``groups.txt`` in the suite folder
    (``<task> <group>`` per line), else a ``group.txt`` in each task folder, else "other".
    A folder that offers some of VTAB-1k's splits but not the final runs' is an error naming each such
    folder and the file it lacks; a folder with none of them (not a task) is passed over.
    """
    suite = Path(suite)
    if not suite.is_dir():
        raise DataError(f"suite folder not found: {suite}")
    if missing := missing_split_files(suite):  # a task folder given as the suite
        raise DataError(f"{suite}: a task folder without a split the bench reads: it has no {', '.join(missing)}")
    if has_bench_splits(suite):
        folders = [suite]
        known = dict(groups or {})
    else:
        subfolders = [p for p in sorted(suite.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        lacking = {folder: missing_split_files(folder) for folder in subfolders}
        incomplete = [f"{folder.name} has no {', '.join(missing)}" for folder, missing in lacking.items() if missing]
        if incomplete:
            raise DataError(f"{suite}: task folders without a split the bench reads: {'; '.join(incomplete)}")
        folders = [folder for folder in subfolders if has_bench_splits(folder)]
        known = dict(groups or {}) or read_groups_file(suite / "groups.txt")
    if not folders:
        raise DataError(f"{suite}: no task folders with {' and '.join(FINAL)} splits")
    tasks = []
    for folder in folders:
        name = Path(os.path.abspath(folder)).name  # as data.py names a task: a symlink keeps its own name
        group_file = folder / "group.txt"
        group = known.get(name) or (group_file.read_text().strip() if group_file.is_file() else "other")
        tasks.append(SuiteTask(name, folder, group.lower()))
    if folders == [suite]:  # a suite of one may take the whole suite's groups, but must find its own there
        if known and tasks[0].name not in known:
            raise ConfigError(f"groups name no group for the task {tasks[0].name}")
        return tasks
    unknown = sorted(set(known) - {task.name for task in tasks})
    if unknown:
        raise ConfigError(f"groups name tasks not in {suite}: {', '.join(unknown)}")
    return tasks


def has_bench_splits(folder: Path) -> bool:
    """Whether ``folder`` is a task folder the bench can use: the final runs' splits (train800val200 to
    train on, test to report)."""
    try:
        splits = list_splits(folder)
    except DataError:
        return False
    return all(split in splits for split in FINAL)


def missing_split_files(folder: Path) -> list[str]:
    """The files of the final runs' splits that ``folder`` lacks, named as it holds its other splits
    (``test.txt`` beside ``train800val200.txt``); none where it offers none of VTAB-1k's splits (not a task)."""
    try:
        splits = list_splits(folder)
    except DataError:
        return []
    offered = [split for split in VTAB_SPLITS if split in splits]
    if not offered:
        return []
    suffix = next((suffix for suffix in (".txt", ".csv", ".json") if (folder / f"{offered[0]}{suffix}").is_file()),
                  "/")
    return [f"{split}{suffix}" for split in FINAL if split not in splits]


def read_groups_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    groups = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected '<task> <group>', got {line!r}")
        groups[parts[0]] = parts[1]
    return groups
