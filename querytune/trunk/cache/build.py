"""Building feature-cache entries (:mod:`.entry`), under faults, for training and ``querytune cache build``.

Faults: every shard is written to a temporary file, synced to disk and renamed once whole
(:mod:`querytune.files`), and then its record (its files' checksums) is written, so an
interrupted build leaves only whole shards and building again computes the rest. A shard is
kept only through its record and while it is still as recorded (:func:`~.entry.trusted_record`):
one that fails its header and size check, or has no record (its build was killed before writing
it), or was changed after it, is rebuilt, never read nor hashed as found.

Space: the entry's size is printed and checked against the free space before building,
and each shard's blocks are allocated (``posix_fallocate``) before it is written
through its memory map, so a full disk is a one-line :class:`~querytune.errors.StorageError`
naming the folder, not a SIGBUS; a failed build leaves no temporary file and no meta.json.

Checksums: each shard's sha256 is computed while it is written. Checking them costs a read of
the whole entry, more than a few percent of a cached epoch (``benchmarks/cache_checksums.py``),
so an entry is checked whole once, the first time it is opened for training, and meta.json
records that it was (``verified``); on every later open only the shards the cheap check
(modification time, sampled blocks) cannot vouch for are. A corrupted shard is rebuilt.

Across processes (torchrun) every rank builds every ``world``-th shard, then rank 0
checks them all and writes meta.json (:func:`ensure_cache`). Two jobs that want the
same entry (two benches, two torchrun jobs on shared storage) take its lock file
(``flock``, which the kernel releases when its holder dies, even by ``kill -9``): one
builds, the other waits and then finds the entry complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import distributed
from ...backbones import check_input_size
from ...backbones.vit import VisionTransformer
from ...data import (
    ImageDataset,
    ImageList,
    Preprocess,
    check_outside_task,
    iterate_loader,
    open_split,
    private_generator,
)
from ...errors import DataError, StorageError
from ...files import folder_lock, remove_stale_temporaries, storage_error, temporary_path, write_text
from ...progress import note, progress_bar
from ..features import extract_features
from ..precision import Precision
from .entry import (
    FORMAT_VERSION,
    POOLED_KIND,
    STORAGE_DTYPE,
    CacheKey,
    FeatureCache,
    complete_meta,
    data_checksum,
    entry_shard_size,
    feature_shapes,
    file_record,
    read_meta,
    shard_file,
    shard_rows,
    trusted_shards,
    untrusted_shards,
    verify_entry,
    whole_split_entry,
    write_record,
)

SHARD_SIZE = 64  # images per shard: also the unit of work split across ranks and redone after a kill
NPY_HEADER_BYTES = 128  # a .npy header of these shapes (the estimate's per-file overhead)


def human_size(nbytes: float) -> str:
    """'88.0 KiB': binary units, as ``du -h`` and ``df -h`` count."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = 0
    while nbytes >= 1024 and power < len(units) - 1:
        nbytes /= 1024
        power += 1
    return f"{nbytes:.0f} B" if power == 0 else f"{nbytes:.1f} {units[power]}"


def entry_nbytes(shapes: dict[str, list[int]], rows: list[int]) -> int:
    """Bytes on disk of the shards holding ``rows`` images each."""
    per_image = sum(2 * int(np.prod(shape)) for shape in shapes.values())  # float16
    return sum(count * per_image + NPY_HEADER_BYTES * len(shapes) for count in rows)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """A StorageError naming ``folder`` (or the nearest existing folder above it) where ``needed`` bytes do not fit."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise StorageError(f"{folder}: {what} needs {human_size(needed)}, {human_size(free)} free there; free "
                           "space or choose another --cache")


def reserved_shard(file: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new float16 ``.npy`` file of ``shape``, memory-mapped for writing, its blocks allocated first:
    writing through a memory map into a sparse file on a full disk kills the process with SIGBUS."""
    try:
        array = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=shape)
        with open(file, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, array.offset + array.nbytes)
    except BaseException:
        file.unlink(missing_ok=True)
        raise
    return array


def entry_lock(path: Path, show_progress: bool = True) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of the entry at ``path`` (created if absent), waiting while another process holds it
    (:func:`querytune.files.folder_lock`)."""
    return folder_lock(path, lambda holder: note(f"{path.name}: another process is building it ({holder}); "
                                                 "waiting for it", show_progress))


@dataclass(frozen=True)
class Building:
    """How cache entries are built (not what they hold, which is their :class:`CacheKey`): images per
    trunk batch and per shard, where the trunk runs, the image-loading processes, progress bars."""

    batch_size: int = 64
    shard_size: int = SHARD_SIZE
    device: torch.device | str = "cpu"
    workers: int = 0
    show_progress: bool = True


def build_cache(root: Path, key: CacheKey, building: Building = Building(), shards: range | None = None) -> Path:
    """Compute the shards of the cache entry ``key`` under ``root`` that are missing, torn or not as their records
    say (:func:`~.entry.trusted_record`); return its folder.

    ``shards`` restricts the work to some shard indices (distributed building). A call
    for all shards (the default) also finalises the entry: it writes meta.json and
    removes temporary files that killed builders left behind. An entry started with
    another shard size keeps its own. The caller holds the entry's lock (:func:`ensure_cache`).
    """
    path, images, show_progress = key.folder(root), key.images, building.show_progress
    shard_size = entry_shard_size(path, building.shard_size)
    shapes = feature_shapes(key.backbone, key.preprocess, key.with_layers)
    rows = shard_rows(len(images.items), shard_size)
    wanted = shards if shards is not None else range(len(rows))
    kept = trusted_shards(path, shapes, rows, wanted)
    todo = [s for s in wanted if s not in kept]
    if not todo and (shards is not None or read_meta(path) is not None):
        return path
    needed = entry_nbytes(shapes, [rows[s] for s in todo])
    check_free_space(path, needed, f"the feature cache of {images.task}/{images.split}")
    if todo:
        note(f"caching {images.task}/{images.split}: {len(images.items)} images, "
             f"{human_size(entry_nbytes(shapes, rows))} on disk ({human_size(needed)} to write) -> {path}",
             show_progress)
    records = build_shards(path, key, shapes, rows, shard_size, todo, building)
    if shards is None:
        remove_stale_temporaries(path)
        for record in kept.values():  # built by other ranks or an earlier, killed build
            records.update(record)
        meta = {
            "format": FORMAT_VERSION,
            "task": images.task,
            "split": images.split,
            "backbone": key.backbone.config.name,
            "image_size": key.preprocess.image_size,
            "num_images": len(images.items),
            "trunk_bf16": key.trunk_bf16,
            "shard_size": shard_size,
            "shapes": shapes,
            "labels": [label for _, label in images.items],
            "checksums": {name: record["sha256"] for name, record in sorted(records.items())},
            "verified": False,
        }
        write_text(path / "meta.json", json.dumps(meta))
    return path


class TimedImageDataset(ImageDataset):
    """:class:`ImageDataset` whose items also say how long their decoding and preprocessing took."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, float]:  # type: ignore[override]
        started = time.perf_counter()
        image, label = super().__getitem__(key)
        return image, label, time.perf_counter() - started


@dataclass
class StageTimes:
    """Seconds each stage of a cache build was busy, over its ``images``: decoding (summed over the loader's
    ``workers``, which decode side by side), the trunk (with the features' move to the host) and writing
    (the :class:`ShardWriter`'s thread), and the build's wall time; as text, the images per second each
    stage could sustain alone and the build's."""

    workers: int = 0
    images: int = 0
    decode: float = 0.0
    trunk: float = 0.0
    write: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def rates(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        return {"build": self.images / wall, "decode": self.images * max(1, self.workers) / max(self.decode, 1e-9),
                "trunk": self.images / max(self.trunk, 1e-9), "write": self.images / max(self.write, 1e-9)}

    def __str__(self) -> str:
        rates = self.rates()
        workers = f"{self.workers} worker{'s' * (self.workers != 1)}" if self.workers else "in this process"
        return (f"{self.images} images at {rates['build']:.1f} img/s; each stage alone: decode "
                f"{rates['decode']:.1f} img/s ({workers}), trunk {rates['trunk']:.1f}, write {rates['write']:.1f}")


def build_shards(path: Path, key: CacheKey, shapes: dict[str, list[int]], rows: list[int], shard_size: int,
                 todo: list[int], building: Building) -> dict[str, dict[str, str]]:
    """Compute the shards ``todo`` of the entry ``key`` at ``path``; return their files' records by name."""
    if not todo:
        return {}
    images, batch_size, device = key.images, building.batch_size, building.device
    backbone = key.backbone.to(device).eval()
    # One loader for every shard to do (workers start once); no batch spans two shards.
    plan = [(shard, list(range(first, min(first + batch_size, shard * shard_size + rows[shard]))))
            for shard in todo for first in range(shard * shard_size, shard * shard_size + rows[shard], batch_size)]
    loader = torch.utils.data.DataLoader(
        TimedImageDataset(images, key.preprocess), batch_sampler=[indices for _, indices in plan],
        num_workers=building.workers,
        pin_memory=torch.device(device).type == "cuda", generator=private_generator(),
    )
    writer = ShardWriter(path, shapes, rows)
    stages = StageTimes(workers=building.workers)
    with progress_bar(f"caching {images.task}/{images.split}", total=sum(rows[s] for s in todo),
                      enabled=building.show_progress) as advance:
        try:
            path.mkdir(parents=True, exist_ok=True)
            for (shard, indices), (batch, _, decode_seconds) in zip(plan, iterate_loader(loader)):
                started = time.perf_counter()
                feats = extract_features(backbone, batch.to(device, non_blocking=True), key.with_layers,
                                         STORAGE_DTYPE, key.precision)
                arrays = {POOLED_KIND: feats.pooled.cpu().numpy()}
                if feats.layers is not None:  # with_layers
                    arrays["layers"] = feats.layers.cpu().numpy()
                stages.trunk += time.perf_counter() - started
                stages.decode += float(decode_seconds.sum())
                writer.write(shard, indices[0] - shard * shard_size, arrays)
                advance(len(batch))
            writer.finish()
        except OSError as error:
            raise storage_error(path, error, "the feature cache") from error
        finally:
            writer.close()
    stages.write, stages.images = writer.busy_seconds, sum(rows[s] for s in todo)
    note(f"{images.task}/{images.split}: {stages}", building.show_progress)
    return writer.records


class ShardWriter:
    """Writes computed batches into an entry's shard files on one background thread, so that the trunk
    computes the next batch while this one is copied into the memory map and, at a shard's end, synced,
    hashed, renamed into place and recorded (on a GPU the trunk is faster than the disk). At most ``depth``
    batches wait; a failed write surfaces at the next :meth:`write` or at :meth:`finish`, and the writes queued
    after it are dropped (they would land in the failed shard's files).

    A shard is written in place into temporary files, reserved whole first, and renamed once whole and on
    disk; then its record is written (:func:`~.entry.write_record`). :meth:`close` removes the temporary files
    of a shard left unfinished."""

    def __init__(self, path: Path, shapes: dict[str, list[int]], rows: list[int], depth: int = 2) -> None:
        self.path, self.shapes, self.rows, self.depth = path, shapes, rows, depth
        self.records: dict[str, dict[str, str]] = {}  # of the shards written, by file name
        self.busy_seconds = 0.0  # the thread's time spent writing, syncing, hashing and renaming
        self._failed = False
        self._files: dict[str, np.memmap] = {}  # the shard being written: touched by the writer thread only
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._pending: deque[Future[None]] = deque()

    def write(self, shard: int, row: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue ``arrays`` (by kind) for rows ``row ..`` of ``shard``."""
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, shard, row, arrays))

    def finish(self) -> None:
        """Wait for every queued write."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Let queued writes end (their errors were or will be raised by the caller's path), stop the
        thread, and remove an unfinished shard's temporary files."""
        self._pool.shutdown(wait=True)
        self._pending.clear()
        for array in self._files.values():
            assert array.filename is not None
            Path(array.filename).unlink(missing_ok=True)
        self._files = {}

    def _write(self, shard: int, row: int, arrays: dict[str, np.ndarray]) -> None:
        if self._failed:
            return
        started = time.perf_counter()
        try:
            self._write_rows(shard, row, arrays)
        except BaseException:
            self._failed = True
            raise
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _write_rows(self, shard: int, row: int, arrays: dict[str, np.ndarray]) -> None:
        if not self._files:  # a shard begins
            for kind, shape in self.shapes.items():
                self._files[kind] = reserved_shard(temporary_path(shard_file(self.path, shard, kind)),
                                                   (self.rows[shard], *shape))
        for kind, array in arrays.items():
            self._files[kind][row : row + len(array)] = array
        if row + len(arrays[POOLED_KIND]) == self.rows[shard]:
            records = {}
            for kind, mapped in self._files.items():
                mapped.flush()
                assert mapped.filename is not None  # a memmap opened on a file
                with open(mapped.filename, "rb") as handle:
                    os.fsync(handle.fileno())  # on disk before its record says it is
                checksum = data_checksum(mapped)
                file = shard_file(self.path, shard, kind)
                os.replace(mapped.filename, file)
                records[file.name] = file_record(file, checksum)
            self._files = {}
            write_record(self.path, shard, records)
            self.records.update(records)


def ensure_cache(root: Path, key: CacheKey, building: Building = Building(), verify: bool = False
                 ) -> tuple[Path, bool]:
    """The folder of the complete cache entry ``key`` under ``root``, built where missing or torn, and whether this
    call built any of it. Shards the check on every open cannot vouch for (:func:`~.entry.untrusted_shards`) are
    checked against their checksums; with ``verify`` (training) every shard is, once; a corrupted one is rebuilt.

    Rank 0 holds the entry's lock while it is built or checked. Across processes every rank
    builds shards ``rank, rank + world, ...``; after a barrier rank 0 checks every shard
    (building any still missing) and writes meta.json; after another barrier every rank may
    read the entry.
    """
    check_outside_task(key.images.root, root, "--cache")
    path = key.folder(root)
    rank, world = distributed.rank(), distributed.world_size()
    show_progress = building.show_progress
    meta = complete_meta(path)
    ready = meta is not None and (meta.get("verified", False) or not verify) and not untrusted_shards(path, meta)
    if meta is not None and not ready and not os.access(path, os.W_OK):
        # a read-only cache (shared, a snapshot): nothing can be recorded or rebuilt, so checked on every open
        corrupted = verify_entry(path, shards_to_check(path, meta, verify), show_progress, record=False)
        if corrupted:
            raise DataError(f"{corrupted[0]}: corrupted (its checksum differs) in a read-only feature cache; "
                            "build the cache in another --cache folder")
        return path, False
    built = False
    with entry_lock(path, show_progress) if rank == 0 and not ready else contextlib.nullcontext():
        distributed.barrier()  # no rank builds before rank 0 holds the entry
        if rank == 0:  # shards changed since their record are checked, not rebuilt, where meta.json vouches for them
            remove_corrupted_shards(path, verify, show_progress)
        if world > 1:
            distributed.barrier()
            num_shards = len(shard_rows(len(key.images.items), entry_shard_size(path, building.shard_size)))
            build_cache(root, key, building, shards=range(rank, num_shards, world))
            distributed.barrier()
        if rank == 0:
            built = complete_meta(path) is None  # another process may have built it while this one waited
            build_cache(root, key, building)
            if remove_corrupted_shards(path, verify, show_progress):  # with verify, a new entry is read whole once
                build_cache(root, key, building)
                if again := remove_corrupted_shards(path, verify, show_progress):
                    raise DataError(f"{again[0]}: corrupted again right after it was rebuilt; check the disk or "
                                    "choose another --cache")
    distributed.barrier()
    return path, built


def shards_to_check(path: Path, meta: dict[str, Any], verify: bool) -> list[int]:
    """The shards of the complete entry at ``path`` to check against their checksums: all of them with ``verify``
    where the entry was never checked whole, else those the check on every open cannot vouch for."""
    if verify and not meta.get("verified"):
        return list(range(len(shard_rows(meta["num_images"], meta["shard_size"]))))
    return untrusted_shards(path, meta)


def remove_corrupted_shards(path: Path, verify: bool, show_progress: bool) -> list[Path]:
    """Check the shards of the entry at ``path`` that need it (:func:`shards_to_check`; none where the entry has no
    meta.json), recording those that hold, and remove the corrupted ones; return those."""
    meta = read_meta(path)
    if meta is None:
        return []
    corrupted = verify_entry(path, shards_to_check(path, meta, verify), show_progress)
    if corrupted:
        note(f"{', '.join(str(file) for file in corrupted)}: corrupted (checksum differs); rebuilding", show_progress)
    for file in corrupted:
        file.unlink(missing_ok=True)  # its record is rewritten with the shard
    return corrupted


def cache_splits(root: Path, backbone: VisionTransformer, data: str | Path, splits: list[str],
                 image_size: int | str | Sequence[int],
                 precision: Precision = Precision.FP32, building: Building = Building()
                 ) -> list[tuple[ImageList, Path, bool]]:
    """Build (where missing or torn) the per-layer cache entries of a task's ``splits`` for runs in
    ``precision``, in order; return each split's images, entry folder and whether this call built it (on
    rank 0). What ``querytune cache`` and the bench do before training."""
    preprocess = Preprocess.for_backbone(backbone, image_size)
    check_input_size(backbone, preprocess.size)
    entries = []
    for images in (open_split(data, split) for split in splits):
        key = CacheKey(backbone, images, preprocess, True, precision)
        part = whole_split_entry(root, key)
        if part is not None:  # read from the whole split's entry: nothing to build
            entries.append((images, part[0].folder(root), False))
        else:
            entries.append((images, *ensure_cache(root, key, building)))
    return entries


def open_or_build_cache(root: Path, key: CacheKey, building: Building = Building()) -> FeatureCache:
    """The cache entry ``key``, built where missing or torn and checked against its checksums (opened for
    training: whole once, then where the check on every open asks for it); a full entry also serves
    class-token readers, and the entry of the split ``key``'s images are part of serves them where they
    have none of their own (:func:`whole_split_entry`); per-layer readers build it where missing,
    class-token readers use it only where it exists."""
    part = whole_split_entry(root, key, complete_only=not key.with_layers)
    if part is not None:
        whole, rows = part
        path, _ = ensure_cache(root, whole, building, verify=True)
        return FeatureCache.open(path).part(rows)
    full = replace(key, with_layers=True)
    if read_meta(full.folder(root)) is not None:
        key = full
    path, _ = ensure_cache(root, key, building, verify=True)
    return FeatureCache.open(path)
