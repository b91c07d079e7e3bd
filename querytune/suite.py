"""A suite of tasks for the bench: task folders with their VTAB groups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .data import list_splits
from .data.splits import FINAL
from .errors import ConfigError, DataError


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
    """
    suite = Path(suite)
    if not suite.is_dir():
        raise DataError(f"suite folder not found: {suite}")
    if has_bench_splits(suite):
        folders = [suite]
        known = dict(groups or {})
    else:
        folders = [p for p in sorted(suite.iterdir()) if p.is_dir() and not p.name.startswith(".")
                   and has_bench_splits(p)]
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
