"""A suite of tasks for the bench: task folders with their VTAB groups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import list_splits
from .errors import ConfigError, DataError


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    group: str


def discover_tasks(suite: Path, groups: dict[str, str] | None = None) -> list[Task]:
    """Task folders of a suite with their groups.

    Groups come from ``groups`` (explicit), else a ``groups.txt`` in the suite folder
    (``<task> <group>`` per line), else a ``group.txt`` in each task folder, else "other".
    """
    suite = Path(suite)
    if not suite.is_dir():
        raise DataError(f"suite folder not found: {suite}")
    names = sorted(p.name for p in suite.iterdir() if p.is_dir() and not p.name.startswith("."))
    tasks_with_splits = []
    for name in names:
        try:
            splits = list_splits(suite / name)
        except DataError:
            continue
        if "train800val200" in splits and "test" in splits:
            tasks_with_splits.append(name)
    if not tasks_with_splits:
        raise DataError(f"{suite}: no task folders with train800val200 and test splits")
    known = dict(groups or {}) or read_groups_file(suite / "groups.txt")
    tasks = []
    for name in tasks_with_splits:
        group_file = suite / name / "group.txt"
        group = known.get(name) or (group_file.read_text().strip() if group_file.is_file() else "other")
        tasks.append(Task(name, suite / name, group.lower()))
    unknown = sorted(set(known) - set(tasks_with_splits))
    if unknown:
        raise ConfigError(f"groups name tasks not in {suite}: {', '.join(unknown)}")
    return tasks


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
