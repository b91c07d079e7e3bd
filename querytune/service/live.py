"""A live runs folder (``querytune serve --runs-dir DIR``): every finished run directly under DIR served, the set
rescanned on demand (the service polls it every few seconds, and at once on SIGHUP or ``POST /admin/reload``).

Each scan builds a new, immutable :class:`~querytune.serve.MultiTaskServer` from the runs loaded so far and swaps
it in whole: a request takes the set current when it arrives and is answered by it, so tasks change between two
batches, never within one. A run is loaded once per version of its files (their inode, size and modification
time); a folder that cannot be served (unfinished, corrupt, for another backbone or input size, or reaching
outside DIR through a symlink) is logged once per version and left out.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..backbones import load_backbone
from ..backbones.vit import VisionTransformer
from ..errors import ConfigError, QuerytuneError, one_line
from ..runfolder import ADAPTER, ADAPTER_CHECKSUM, read_run_config
from ..serve import MultiTaskServer, ServedMethod, load_served, run_mismatch, serving_precision
from ..trunk.cache import backbone_fingerprint

RUN_FILES = ("config.json", ADAPTER, ADAPTER_CHECKSUM, "metrics.json")  # what a run is served from
Version = tuple[Any, ...]  # what a scan compares to see whether a run folder changed


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LiveRuns:
    """The finished runs under ``root`` on one backbone (a model, or where to load it from); :attr:`current` is the
    set served now (None: none yet)."""

    def __init__(self, root: Path, backbone: VisionTransformer | str | Path, device: torch.device | str | None = None,
                 say: Callable[[str], None] = say_on_stderr) -> None:
        if not root.is_dir():
            raise ConfigError(f"--runs-dir {root}: not a folder")
        self.root = root.resolve()
        self.backbone = load_backbone(backbone)  # after the folder's check: a typo costs no model load
        self.device = device
        self.say = say
        self.current: MultiTaskServer | None = None
        self.versions: dict[str, Version] = {}  # folder name -> the version last looked at, served or not
        self.loaded: dict[str, tuple[ServedMethod, dict[str, Any]]] = {}  # folder name -> its task and config
        self.reference: tuple[Path, dict[str, Any]] | None = None  # the first run served: input size, normalisation
        self.lock = threading.Lock()  # one scan at a time
        self.unreadable: str | None = None  # why the root could not be read at the last scan

    def scan(self) -> bool:
        """Look at every folder under the root once; serve the runs added or changed, stop those removed or broken.
        Whether the served set changed."""
        with self.lock:
            try:
                found = {entry.name: entry for entry in self.root.iterdir()
                         if not entry.name.startswith(".") and entry.is_dir()}
            except OSError as error:  # the folder itself gone or unreadable: the runs served stay, said once
                if self.unreadable != (unreadable := one_line(error)):
                    self.say(f"{self.root}: cannot be read ({unreadable}); the runs served stay")
                self.unreadable = unreadable
                return False
            self.unreadable = None
            changed = False
            added: list[str] = []
            for name in sorted(self.versions.keys() - found.keys()):
                del self.versions[name]
                if self.loaded.pop(name, None) is not None:
                    self.say(f"{self.root / name}: removed; no longer served")
                    changed = True
            for name, folder in sorted(found.items()):
                version = self.version_of(folder)
                if self.versions.get(name) == version:
                    continue
                self.versions[name] = version
                stopped = self.loaded.pop(name, None) is not None
                changed |= stopped
                try:
                    self.loaded[name] = self.load(name, folder, version)
                except Exception as error:  # whatever a broken run raises, the others go on being served
                    why = error if isinstance(error, QuerytuneError) else f"{type(error).__name__}: {one_line(error)}"
                    self.say(f"{folder}: not served{' any more' if stopped else ''}: {why}")
                    continue
                self.say(f"{folder}: {'replaced; now serving the new run' if stopped else 'served'}")
                added.append(name)
                changed = True
            if changed:
                try:
                    self.current = self.build()
                except Exception:  # some new run does not combine with the others: the rest stay served
                    self.current = self.build_refusing(added)
            return changed

    def build_refusing(self, added: list[str]) -> MultiTaskServer | None:
        """A server for the runs loaded but those of ``added`` that cannot be served with the others, which are
        dropped with one line each: each added run tried in turn with those kept so far (a build per added run,
        only where the set as a whole could not be built)."""
        candidates = {name: self.loaded.pop(name) for name in added}
        server = self.build()
        for name, task in candidates.items():
            self.loaded[name] = task
            try:
                server = self.build()
            except Exception as error:
                why = error if isinstance(error, QuerytuneError) else f"{type(error).__name__}: {one_line(error)}"
                del self.loaded[name]
                self.say(f"{self.root / name}: not served: cannot be served with the other runs: {why}")
        return server

    def version_of(self, folder: Path) -> Version:
        """The folder's real path and, per run file, its identity and size and modification time (None if absent);
        an unfinished run (no metrics.json) is one version however its other files change while it trains."""
        real = folder.resolve()
        if not (real / "metrics.json").exists():
            return (real, "unfinished")
        stats: list[tuple[int, ...] | None] = []
        for file in RUN_FILES:
            try:
                info = (real / file).stat()
            except OSError:
                stats.append(None)
                continue
            stats.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
        return (real, *stats)

    def load(self, name: str, folder: Path, version: Version) -> tuple[ServedMethod, dict[str, Any]]:
        """The run in ``folder`` as a task, or a one-line error saying why it cannot be served."""
        if version[1] == "unfinished":
            raise ConfigError("not finished (no metrics.json)")
        for path in (folder, *(folder / file for file in RUN_FILES)):
            if not self.inside(path):
                raise ConfigError(f"{path.name if path != folder else 'the folder'} leads to {path.resolve()}, "
                                  f"outside {self.root}")
        config = read_run_config(folder)
        extend = config["options"].get("extend") if isinstance(config["options"], dict) else None
        if extend is not None and not self.inside(Path(extend)):
            raise ConfigError(f"extends {extend}, outside {self.root}")
        if self.reference is not None:
            if (mismatch := run_mismatch(folder, config, *self.reference)) is not None:
                raise ConfigError(mismatch)
        elif config["backbone"]["fingerprint"] != backbone_fingerprint(self.backbone):
            raise ConfigError(f"was trained on backbone {config['backbone']['name']!r}, not the one served "
                              "(--backbone)")
        task = load_served(name, folder, config, self.backbone)
        if self.reference is None:
            self.reference = (folder, config)
        return task, config

    def inside(self, path: Path) -> bool:
        """Whether ``path``, its symlinks resolved, lies under the root (an absent path resolves as far as it can)."""
        return Path(os.path.realpath(path)).is_relative_to(self.root)

    def build(self) -> MultiTaskServer | None:
        """A new server for the runs loaded now (None if there is none); the one it replaces is left untouched
        for the requests still answered by it."""
        if not self.loaded:
            return None
        assert self.reference is not None
        tasks = [task for task, _ in self.loaded.values()]
        configs = [config for _, config in self.loaded.values()]
        return MultiTaskServer(self.backbone, tasks, self.reference[1]["image_size"], serving_precision(configs),
                               self.device)

