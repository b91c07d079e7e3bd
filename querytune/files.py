"""Atomic file writes: a file appears under its final name only once it is whole.

Every writer (run folders, checkpoints, adapters, feature-cache shards and meta) writes
to a temporary file named after the final one, this host and this process, so two
writers never share one, and then renames it over the final name. A kill, even
``kill -9``, leaves the old file or the new one, never a torn one, plus at most a
stale temporary file that :func:`remove_stale_temporaries` deletes later.

There is no fsync: only a power loss could still tear a file, and the readers check
what they read (a torn checkpoint is reported, a torn cache shard rebuilt).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the file's content to ``tmp``, which then replaces ``path``."""
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files (and folders, such as an export's) in ``folder`` that killed processes
    of this host left behind."""
    host = socket.gethostname()
    for tmp in folder.glob(f"*.{host}.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
