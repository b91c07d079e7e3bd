"""Housekeeping of a feature-cache folder, behind ``querytune cache ls|rm|prune``."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import DataError, StorageError
from ...files import LOCK_FILE, folder_lock
from ...progress import note
from .entry import POOLED_KIND, read_meta, shard_file


@dataclass
class CacheEntry:
    """An entry of a cache folder as ``querytune cache ls`` shows it."""

    path: Path
    nbytes: int
    last_used: float  # seconds since the epoch: meta.json's modification time (the folder's while incomplete)
    meta: dict[str, Any] | None  # None: incomplete (being built, or its build was killed)

    @property
    def name(self) -> str:
        return self.path.name


def is_entry(path: Path) -> bool:
    """Whether ``path`` is a folder this module wrote (meta.json, shards or its lock file)."""
    return path.is_dir() and any(file.exists() for file in (path / "meta.json", path / LOCK_FILE,
                                                            shard_file(path, 0, POOLED_KIND)))


def list_entries(root: Path) -> list[CacheEntry]:
    """The entries under ``root``, most recently used first."""
    entries = []
    for path in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if not is_entry(path):
            continue
        meta = read_meta(path)
        last_used = (path / "meta.json").stat().st_mtime if meta is not None else path.stat().st_mtime
        nbytes = sum(file.stat().st_size for file in path.iterdir() if file.is_file())
        entries.append(CacheEntry(path, nbytes, last_used, meta))
    return sorted(entries, key=lambda entry: -entry.last_used)


def remove_entry(root: Path, name: str) -> CacheEntry:
    """Delete the entry ``name`` (a folder name ``cache ls`` shows) of the cache folder ``root``; an entry that
    another process is building is refused."""
    by_name = {entry.name: entry for entry in list_entries(root)}
    entry = by_name.get(Path(name).name)  # the name, or the entry's path
    if entry is None:
        raise DataError(f"{name}: no such entry in the feature cache {root} (see querytune cache ls)")
    def refuse(holder: str) -> None:
        raise DataError(f"{entry.path}: another process is building it ({holder}); try again once it is done")

    with folder_lock(entry.path, refuse):
        try:
            shutil.rmtree(entry.path)
        except OSError as error:
            raise StorageError(f"{entry.path}: cannot remove it ({error.strerror or error})") from error
    return entry


def prune_entries(root: Path, older_than: float | None = None, max_bytes: int | None = None,
                  now: float | None = None) -> list[CacheEntry]:
    """Delete the entries last used more than ``older_than`` seconds ago, then the least recently used ones
    until the rest hold at most ``max_bytes``; return those deleted (entries being built are kept)."""
    now = time.time() if now is None else now
    kept_bytes = 0
    removed = []
    for entry in list_entries(root):  # most recently used first: the oldest are the ones over the limit
        too_old = older_than is not None and now - entry.last_used > older_than
        too_big = max_bytes is not None and kept_bytes + entry.nbytes > max_bytes
        if too_old or too_big:
            try:
                removed.append(remove_entry(root, entry.name))
                continue
            except DataError as error:  # being built
                note(str(error))
        kept_bytes += entry.nbytes
    return removed


def default_cache_root() -> Path:
    """``$QUERYTUNE_CACHE``, else ``~/.cache/querytune/features``."""
    return Path(os.environ.get("QUERYTUNE_CACHE", Path.home() / ".cache" / "querytune" / "features"))
