"""Atomic file writes: a file appears under its final name only once it is whole.

Every writer (run folders, checkpoints, adapters, feature-cache shards and meta) writes
to a temporary file named after the final one, this host and this process, so two
writers never share one, and then renames it over the final name. A kill, even
``kill -9``, leaves the old file or the new one, never a torn one, plus at most a
stale temporary file that :func:`remove_stale_temporaries` deletes later.

There is no fsync: only a power loss could still tear a file, and the readers check
what they read (a torn checkpoint is reported, a torn cache shard rebuilt).

A write that fails (no space left, a read-only folder, no permission) removes its
temporary file and is reported as a :class:`~querytune.errors.StorageError` naming the
folder (:func:`storage_error`); writers that are not Python's own file objects (torch,
safetensors) write through :func:`recording_writes` or to bytes, so the ``OSError``
behind their own error types is what is reported.

A folder that one process at a time may write (a cache entry, a run folder, a bench folder) is held
with :func:`folder_lock`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

from .errors import StorageError

LOCK_FILE = ".lock"  # in a locked folder: held (flock) by the process writing the folder


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def storage_error(folder: Path, error: OSError, what: str) -> StorageError:
    """A failed write as one line naming the folder, e.g. 'runs/a: cannot write checkpoint.pt (No space left...)'."""
    return StorageError(f"{folder}: cannot write {what} ({error.strerror or error}); free space there or choose "
                        "another folder")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the file's content to ``tmp``, which then replaces ``path``; an ``OSError``
    on the way is a :class:`StorageError` naming the folder, and leaves neither file behind."""
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise storage_error(path.parent, error, path.name) from error
        raise


class _RecordingFile:
    """A binary file whose first failed write is kept: torch reports one as its own RuntimeError."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


@contextmanager
def recording_writes(path: Path) -> Iterator[IO[bytes]]:
    """``path`` opened for writing; whatever a library raises after a write failed, the ``OSError`` is raised."""
    with open(path, "wb") as handle:
        file = _RecordingFile(handle)
        try:
            yield cast(IO[bytes], file)  # what torch.save writes to: write() and flush()
        except Exception as error:
            if file.error is not None and file.error is not error:
                raise file.error from error
            raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def append_text(path: Path, text: str) -> None:
    """Append to a log (a torn last line is what its readers skip); a failed write is a StorageError."""
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as error:
        raise storage_error(path.parent, error, path.name) from error


def umask_modes(*paths: Path) -> None:
    """Give the files ``paths`` (and the files under those that are folders) the mode a file opened by Python
    gets, 0666 less the umask (0644 under umask 022): safetensors' ``save_file``, and PEFT through it, writes
    its files 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in paths:
        for file in [path, *path.rglob("*")] if path.is_dir() else [path]:
            if file.is_file():
                file.chmod(0o666 & ~umask)


def special_kind(path: Path) -> str | None:
    """What ``path`` is where it is neither a file nor a folder ('a named pipe (FIFO)', 'a symlink loop',
    ...); None where nothing is there."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symlink loop"
        if path.is_symlink():
            return f"a symlink to {os.readlink(path)}, which does not exist"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return f"unreadable ({error.strerror})"
    kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}
    return next((kind for is_kind, kind in kinds.items() if is_kind(mode)), "neither a file nor a folder")


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


@contextmanager
def folder_lock(folder: Path, busy: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of ``folder`` (created, with its parents, if absent) against other processes. Where
    another process holds it, ``busy(holder)`` is called with the holder ('pid 123'): it raises to refuse,
    or returns to wait for the lock.

    ``flock`` on the empty file ``folder/.lock``: the kernel releases it when its holder dies, even by
    ``kill -9``, so a killed writer never leaves the folder locked (only the file, which the next holder
    takes), and names the holder in ``/proc/locks``; on NFS Linux maps it to a lock the server keeps. The
    lock file is removed on release (a waiter then finds its lock file gone and locks the next one), and
    the folder too where this call created it and nothing else was written (a build refused for lack of
    space, a run that failed before it started).
    """
    lock = folder / LOCK_FILE
    while True:
        try:
            folder.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:
            raise storage_error(folder, error, LOCK_FILE) from error
        try:
            handle = open(lock, "a")
        except OSError as error:
            raise storage_error(folder, error, LOCK_FILE) from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy(lock_holder(handle))
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the lock file was removed while this process waited: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # gone already where the holder removed the folder
            lock.unlink()
            if created:
                folder.rmdir()  # where empty
        handle.close()


def lock_holder(handle: IO[str]) -> str:
    """'pid 123', the process holding the ``flock`` on ``handle``'s file, as this host's ``/proc/locks`` lists it."""
    stat = os.fstat(handle.fileno())
    file_id = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # '1: FLOCK ADVISORY WRITE 4521 fe:00:2150578 0 EOF'; '1: -> FLOCK ...' waits
            if fields[1:2] == ["FLOCK"] and fields[5:6] == [file_id]:
                return f"pid {fields[4]}"
    return "pid unknown: another host's, or gone meanwhile"
