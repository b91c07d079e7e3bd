"""On-disk feature cache for the frozen-backbone methods.

The frozen trunk is run once per image; its :class:`~querytune.features.Features`
(per-block normalised tokens and the final class token) are stored in float16 as
``.npy`` shards that later epochs memory-map, so data larger than RAM works.

Layout of one cache entry, ``<root>/<task>-<split>-<key16>/``:

    shard-00000.layers.npy   (n, L, N, D) float16   (absent in a class-token-only entry)
    shard-00000.cls.npy      (n, D) float16
    ...
    meta.json                written once every shard exists: shard size, feature shapes, labels,
                             each shard's sha256; its modification time is when the entry was last used
    .lock                    held (flock) by the process building the entry

The key hashes everything the features depend on: the backbone's weights and
architecture, the preprocessing (image size, mean, std), the split's file list with
labels, sizes and modification times, the storage dtype and the format version, so a
stale entry is never reused. Methods that read only the final class token (linear
probe) use a class-token-only entry, or a full one where it exists.

Faults: every shard is written to a temporary file and renamed once whole
(:mod:`querytune.files`), so an interrupted build leaves only whole shards and
building again computes the rest. Whatever else may sit under a shard's final name
(a file truncated or overwritten by other means) is caught by checking every shard's
header (dtype, shape) and file size against what the entry must hold, each time the
entry is built or opened (a few bytes read per shard); a shard that fails is rebuilt,
never read.

Space: the entry's size is printed and checked against the free space before building,
and each shard's blocks are allocated (``posix_fallocate``) before it is written
through its memory map, so a full disk is a one-line :class:`~querytune.errors.StorageError`
naming the folder, not a SIGBUS; a failed build leaves no temporary file and no meta.json.

Corruption (bytes changed, size kept) is caught by the sha256 of each shard's data,
computed while the shard is written and kept in meta.json. Checking costs a read of the
whole entry, more than a few percent of a cached epoch (``benchmarks/cache_checksums.py``),
so an entry is checked once, the first time it is opened for training, and meta.json
records that it was (``verified``); a corrupted shard is rebuilt. Entries from before
checksums existed stay readable: their checksums are recorded at that first check.

Across processes (torchrun) every rank builds every ``world``-th shard, then rank 0
checks them all and writes meta.json (:func:`ensure_cache`). Two jobs that want the
same entry (two benches, two torchrun jobs on shared storage) take its lock file
(``flock``, which the kernel releases when its holder dies, even by ``kill -9``): one
builds, the other waits and then finds the entry complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..backbones.vit import VisionTransformer
from ..data import ImageDataset, ImageList, Preprocess, iterate_loader, open_split, private_generator
from ..errors import DataError, StorageError
from ..files import remove_stale_temporaries, storage_error, temporary_path, write_text
from ..progress import note, progress_bar
from .features import Features, copy_converted, extract_features

FORMAT_VERSION = 2
STORAGE_DTYPE = torch.float16
SHARD_SIZE = 64  # images per shard: also the unit of work split across ranks and redone after a kill
FINGERPRINT_ATTRIBUTE = "_querytune_fingerprint"  # where a backbone object keeps its fingerprint once computed
LOCK_FILE = ".lock"
NPY_HEADER_BYTES = 128  # a .npy header of these shapes (the estimate's per-file overhead)


def backbone_fingerprint(backbone: VisionTransformer) -> str:
    """sha256 of the architecture and every weight (computed once per model object)."""
    cached = getattr(backbone, FINGERPRINT_ATTRIBUTE, None)
    if cached is not None:
        return cached
    # Earlier runs' fingerprints hold: "extra", a field ViTConfig once had (always empty), is hashed still,
    # and fields added since are hashed only where they differ from their defaults.
    architecture = {**backbone.config.to_dict(), "extra": {}}
    if not architecture["global_pool"]:
        del architecture["global_pool"]
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    fingerprint = digest.hexdigest()
    setattr(backbone, FINGERPRINT_ATTRIBUTE, fingerprint)  # a plain attribute, not a tensor or a module
    return fingerprint


def cache_key(backbone: VisionTransformer, images: ImageList, preprocess: Preprocess, with_layers: bool,
              bf16: bool) -> str:
    parts = {
        "with_layers": with_layers,
        "trunk_bf16": bf16,
        "format": FORMAT_VERSION,
        "dtype": str(STORAGE_DTYPE),
        "backbone": backbone_fingerprint(backbone),
        "image_size": preprocess.image_size,
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "images": images.fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def shard_file(path: Path, shard: int, kind: str) -> Path:
    return path / f"shard-{shard:05d}.{kind}.npy"


def open_shard(file: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """``file`` memory-mapped (copy-on-write) if it holds exactly a float16 array of ``shape``, else None.

    Reads only the header: a missing, truncated, extended or foreign file is caught by
    its header or its size, not by reading the data.
    """
    try:
        array = np.load(file, mmap_mode="c")
    except (OSError, ValueError, EOFError):  # missing, shorter than its header says, not .npy
        return None
    if array.dtype != np.float16 or array.shape != shape or file.stat().st_size != array.offset + array.nbytes:
        return None
    return array


def data_checksum(array: np.ndarray) -> str:
    """The sha256 of an array's data (its header is checked by :func:`open_shard`)."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


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


def human_size(nbytes: float) -> str:
    """'88.0 KiB': binary units, as ``du -h`` and ``df -h`` count."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = 0
    while nbytes >= 1024 and power < len(units) - 1:
        nbytes /= 1024
        power += 1
    return f"{nbytes:.0f} B" if power == 0 else f"{nbytes:.1f} {units[power]}"


@dataclass
class FeatureCache:
    """A complete cache entry, memory-mapped."""

    path: Path
    labels: np.ndarray
    shard_size: int
    layers: list[torch.Tensor] | None
    cls: list[torch.Tensor]
    rows: np.ndarray | None = None  # a part of the entry (see :meth:`part`): its rows, in order

    def __len__(self) -> int:
        return len(self.labels)

    def part(self, rows: np.ndarray) -> FeatureCache:
        """The entry seen as holding only its ``rows`` (indices into the entry), in that order."""
        return FeatureCache(self.path, self.labels[rows], self.shard_size, self.layers, self.cls, rows)

    @classmethod
    def open(cls, path: Path) -> FeatureCache:
        meta = read_meta(path)
        if meta is None:
            raise DataError(f"{path}: not a complete feature cache (meta.json missing, unreadable or of another "
                            "format); build the cache again")
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            os.utime(path / "meta.json")  # marks the entry used (``querytune cache ls``, ``prune``)
        layers, cls_tokens = [], []
        for shard, rows in enumerate(shard_rows(meta["num_images"], meta["shard_size"])):
            arrays = {}
            for kind in meta["shapes"]:
                file = shard_file(path, shard, kind)
                # copy-on-write mappings: never written, but torch wants writable arrays
                arrays[kind] = open_shard(file, (rows, *meta["shapes"][kind]))
                if arrays[kind] is None:
                    raise DataError(f"{file}: missing or torn feature-cache shard; build the cache again to redo it")
            cls_tokens.append(torch.from_numpy(arrays["cls"]))
            if "layers" in arrays:
                layers.append(torch.from_numpy(arrays["layers"]))
        return cls(path, np.asarray(meta["labels"], dtype=np.int64), meta["shard_size"],
                   layers if "layers" in meta["shapes"] else None, cls_tokens)

    def nbytes(self, with_layers: bool = True) -> int:
        """Bytes of the entry's class tokens, and per-layer tokens with ``with_layers``."""
        kinds = [self.cls] + ([self.layers] if with_layers and self.layers is not None else [])
        whole = sum(shard.nbytes for shards in kinds for shard in shards)
        return whole if self.rows is None else whole * len(self) // sum(len(shard) for shard in self.cls)

    def load(self, device: torch.device, with_layers: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole entry in ``device`` memory, float16: class tokens (n, D) and, with ``with_layers``,
        per-layer tokens stored layer-major (L, n, N, D), so that gathering a batch along dim 1 yields
        each layer's tokens contiguous."""
        if with_layers and self.layers is None:
            raise DataError(f"{self.path}: holds class tokens only, per-layer features were asked for")
        if self.rows is not None:  # a part: its rows gathered on the host, so the device holds only them
            part = self.features(np.arange(len(self)), with_layers)
            layers = part.layers.transpose(0, 1).contiguous().to(device) if part.layers is not None else None
            return part.cls.to(device), layers
        cls = torch.cat([shard.to(device) for shard in self.cls])
        if not with_layers:
            return cls, None
        assert self.layers is not None  # checked above
        first = self.layers[0]
        layers = torch.empty(first.shape[1], len(self), *first.shape[2:], dtype=first.dtype, device=device)
        start = 0
        for shard in self.layers:
            layers[:, start : start + len(shard)] = shard.to(device).transpose(0, 1)
            start += len(shard)
        return cls, layers

    def features(self, indices: np.ndarray | list[int], with_layers: bool = True,
                 out: Features | None = None) -> Features:
        """Features of the given image indices, in that order.

        With ``out`` (buffers of at least ``len(indices)`` rows, any float dtype) the rows are
        converted into it and views of it are returned: reusing buffers across batches avoids
        faulting in fresh pages for every batch, which otherwise costs more than the copy.
        """
        layers = self.layers if with_layers else None
        if with_layers and layers is None:
            raise DataError(f"{self.path}: holds class tokens only, per-layer features were asked for")
        count = len(indices)
        if out is None:
            out = Features(torch.empty(count, *self.cls[0].shape[1:], dtype=torch.float16),
                           torch.empty(count, *layers[0].shape[1:], dtype=torch.float16) if layers is not None
                           else None)
        if self.rows is not None:
            indices = self.rows[np.asarray(indices, dtype=np.int64)]
        for row, index in enumerate(indices):
            shard, offset = divmod(int(index), self.shard_size)
            out.cls[row].copy_(self.cls[shard][offset])
            if layers is not None:
                assert out.layers is not None  # buffers given in ``out`` hold per-layer rows too
                copy_converted(out.layers[row], layers[shard][offset])
        if layers is None:
            return Features(out.cls[:count], None)
        assert out.layers is not None
        return Features(out.cls[:count], out.layers[:count])


# VTAB-1k's train800 and val200 are the two parts of its train800val200: training reads the parts from
# that split's entry (built where missing), so a search on train800 -> val200 and the final runs on
# train800val200 cost one trunk pass and one entry's disk.
WHOLE_SPLIT = {"train800": "train800val200", "val200": "train800val200"}


def whole_split_entry(root: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                      bf16: bool, complete_only: bool = True) -> tuple[ImageList, np.ndarray] | None:
    """Where ``images`` have no per-layer entry of their own but are all in the split they are part of
    (:data:`WHOLE_SPLIT`), whose entry is complete (or, without ``complete_only``, may be built): that
    split, and the rows of ``images`` in it."""
    whole_name = WHOLE_SPLIT.get(images.split)
    if whole_name is None or read_meta(cache_dir_for(root, backbone, images, preprocess, True, bf16)) is not None:
        return None
    try:
        whole = open_split(images.root, whole_name)
    except DataError:  # the task has no such split
        return None
    if complete_only and read_meta(cache_dir_for(root, backbone, whole, preprocess, True, bf16)) is None:
        return None
    position = {item: row for row, item in enumerate(whole.items)}
    rows = [position.get(item) for item in images.items]
    if any(row is None for row in rows):
        return None
    return whole, np.asarray(rows, dtype=np.int64)


def cache_dir_for(root: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                  with_layers: bool = True, bf16: bool = False) -> Path:
    kind = ("" if with_layers else "-cls") + ("-bf16" if bf16 else "")
    key = cache_key(backbone, images, preprocess, with_layers, bf16)
    return Path(root) / f"{images.task}-{images.split}{kind}-{key[:16]}"


def shard_rows(num_images: int, shard_size: int) -> list[int]:
    """The number of images in each shard."""
    return [min(shard_size, num_images - start) for start in range(0, num_images, shard_size)]


def feature_shapes(backbone: VisionTransformer, preprocess: Preprocess, with_layers: bool) -> dict[str, list[int]]:
    """The per-image shape of each stored kind: ``cls`` (D,) and, with layers, ``layers`` (L, N, D)."""
    config = backbone.config
    shapes = {"cls": [config.embed_dim]}
    if with_layers:
        shapes["layers"] = [config.depth, config.num_tokens(preprocess.image_size), config.embed_dim]
    return shapes


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta.json of the entry at ``path`` where it is whole and of this format, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta["format"] == FORMAT_VERSION and isinstance(meta["shard_size"], int) and meta["shard_size"] > 0:
            return meta
    except (OSError, ValueError, TypeError, KeyError):  # absent, or torn by a power loss
        pass
    return None


def entry_shard_size(path: Path, default: int) -> int:
    """The shard size of the entry at ``path`` where its meta.json says, else ``default``."""
    meta = read_meta(path)
    return default if meta is None else meta["shard_size"]


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


@contextlib.contextmanager
def entry_lock(path: Path, show_progress: bool = True) -> Iterator[None]:
    """Hold the lock of the entry at ``path`` (created if absent), waiting while another process holds it.

    ``flock``: the kernel releases it when its holder dies, even by ``kill -9``, so a killed
    builder never leaves the entry locked; on NFS Linux maps it to a lock the server keeps.
    A folder left holding only the lock file (a build refused for lack of space) is removed.
    """
    lock = path / LOCK_FILE
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")
        except OSError as error:
            raise storage_error(path, error, "the feature cache") from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"{path.name}: another process is building it; waiting for it", show_progress)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the entry was removed while this process waited: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.listdir(path) == [LOCK_FILE]:
                shutil.rmtree(path)  # waiters find their lock file gone and lock the next one
        handle.close()


def whole_shards(path: Path, shapes: dict[str, list[int]], rows: list[int], shards: range | list[int]) -> list[int]:
    """Which of ``shards`` are whole: each kind's file there with the header and size it must have."""
    return [shard for shard in shards
            if all(open_shard(shard_file(path, shard, kind), (rows[shard], *shape)) is not None
                   for kind, shape in shapes.items())]


def complete_meta(path: Path) -> dict[str, Any] | None:
    """The meta.json of the entry at ``path`` where the entry is complete (every shard whole), else None."""
    meta = read_meta(path)
    if meta is None:
        return None
    rows = shard_rows(meta["num_images"], meta["shard_size"])
    return meta if len(whole_shards(path, meta["shapes"], rows, range(len(rows)))) == len(rows) else None


def build_cache(
    root: Path,
    backbone: VisionTransformer,
    images: ImageList,
    preprocess: Preprocess,
    with_layers: bool = True,
    bf16: bool = False,
    batch_size: int = 64,
    shard_size: int = SHARD_SIZE,
    device: torch.device | str = "cpu",
    workers: int = 0,
    shards: range | None = None,
    show_progress: bool = True,
) -> Path:
    """Compute the shards of the cache entry for ``images`` that are missing or torn; return its folder.

    ``shards`` restricts the work to some shard indices (distributed building). A call
    for all shards (the default) also finalises the entry: it writes meta.json and
    removes temporary files that killed builders left behind. An entry started with
    another shard size keeps its own. The caller holds the entry's lock (:func:`ensure_cache`).
    """
    path = cache_dir_for(root, backbone, images, preprocess, with_layers, bf16)
    shard_size = entry_shard_size(path, shard_size)
    shapes = feature_shapes(backbone, preprocess, with_layers)
    rows = shard_rows(len(images.items), shard_size)
    wanted = shards if shards is not None else range(len(rows))
    whole = set(whole_shards(path, shapes, rows, wanted))
    todo = [s for s in wanted if s not in whole]
    if not todo and (shards is not None or read_meta(path) is not None):
        return path
    needed = entry_nbytes(shapes, [rows[s] for s in todo])
    check_free_space(path, needed, f"the feature cache of {images.task}/{images.split}")
    if todo:
        note(f"caching {images.task}/{images.split}: {len(images.items)} images, "
             f"{human_size(entry_nbytes(shapes, rows))} on disk ({human_size(needed)} to write) -> {path}",
             show_progress)
    checksums = build_shards(path, backbone, images, preprocess, shapes, rows, shard_size, todo, with_layers, bf16,
                             batch_size, device, workers, show_progress)
    if shards is None:
        remove_stale_temporaries(path)
        for shard in sorted(whole):  # built by other ranks or an earlier, killed build: read back once
            for kind in shapes:
                array = open_shard(shard_file(path, shard, kind), (rows[shard], *shapes[kind]))
                assert array is not None  # checked whole above; only this entry's lock holder writes it
                checksums[shard_file(path, shard, kind).name] = data_checksum(array)
        meta = {
            "format": FORMAT_VERSION,
            "task": images.task,
            "split": images.split,
            "backbone": backbone.config.name,
            "image_size": preprocess.image_size,
            "num_images": len(images.items),
            "trunk_bf16": bf16,
            "shard_size": shard_size,
            "shapes": shapes,
            "labels": [label for _, label in images.items],
            "checksums": dict(sorted(checksums.items())),
            "verified": False,
        }
        write_text(path / "meta.json", json.dumps(meta))
    return path


def build_shards(path: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                 shapes: dict[str, list[int]], rows: list[int], shard_size: int, todo: list[int], with_layers: bool,
                 bf16: bool, batch_size: int, device: torch.device | str, workers: int,
                 show_progress: bool) -> dict[str, str]:
    """Compute the shards ``todo`` of the entry at ``path``; return their files' data checksums by name."""
    if not todo:
        return {}
    backbone = backbone.to(device).eval()
    # One loader for every shard to do (workers start once); no batch spans two shards.
    plan = [(shard, list(range(first, min(first + batch_size, shard * shard_size + rows[shard]))))
            for shard in todo for first in range(shard * shard_size, shard * shard_size + rows[shard], batch_size)]
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, preprocess), batch_sampler=[indices for _, indices in plan], num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", generator=private_generator(),
    )
    writer = ShardWriter(path, shapes, rows)
    with progress_bar(f"caching {images.task}/{images.split}", total=sum(rows[s] for s in todo),
                      enabled=show_progress) as advance:
        try:
            path.mkdir(parents=True, exist_ok=True)
            for (shard, indices), (batch, _) in zip(plan, iterate_loader(loader)):
                feats = extract_features(backbone, batch.to(device, non_blocking=True), with_layers, STORAGE_DTYPE,
                                         bf16)
                arrays = {"cls": feats.cls.cpu().numpy()}
                if feats.layers is not None:  # with_layers
                    arrays["layers"] = feats.layers.cpu().numpy()
                writer.write(shard, indices[0] - shard * shard_size, arrays)
                advance(len(batch))
            writer.finish()
        except OSError as error:
            raise storage_error(path, error, "the feature cache") from error
        finally:
            writer.close()
    return writer.checksums


class ShardWriter:
    """Writes computed batches into an entry's shard files on one background thread, so that the trunk
    computes the next batch while this one is copied into the memory map and, at a shard's end, flushed,
    hashed and renamed into place (on a GPU the trunk is faster than the disk). At most ``depth`` batches
    wait; a failed write surfaces at the next :meth:`write` or at :meth:`finish`, and the writes queued
    after it are dropped (they would land in the failed shard's files).

    A shard is written in place into temporary files, reserved whole first, and renamed once whole;
    :meth:`close` removes the temporary files of a shard left unfinished."""

    def __init__(self, path: Path, shapes: dict[str, list[int]], rows: list[int], depth: int = 2) -> None:
        self.path, self.shapes, self.rows, self.depth = path, shapes, rows, depth
        self.checksums: dict[str, str] = {}
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
        try:
            self._write_rows(shard, row, arrays)
        except BaseException:
            self._failed = True
            raise

    def _write_rows(self, shard: int, row: int, arrays: dict[str, np.ndarray]) -> None:
        if not self._files:  # a shard begins
            for kind, shape in self.shapes.items():
                self._files[kind] = reserved_shard(temporary_path(shard_file(self.path, shard, kind)),
                                                   (self.rows[shard], *shape))
        for kind, array in arrays.items():
            self._files[kind][row : row + len(array)] = array
        if row + len(arrays["cls"]) == self.rows[shard]:
            for kind, mapped in self._files.items():
                mapped.flush()
                self.checksums[shard_file(self.path, shard, kind).name] = data_checksum(mapped)
                assert mapped.filename is not None  # a memmap opened on a file
                os.replace(mapped.filename, shard_file(self.path, shard, kind))
            self._files = {}


def verify_entry(path: Path, show_progress: bool = True, record: bool = True) -> list[Path]:
    """Check every shard of the complete entry at ``path`` against its checksum; return the corrupted shards'
    files. With ``record``, where all held, meta.json records that (and the checksums of an entry from
    before they existed)."""
    meta = read_meta(path)
    assert meta is not None  # a complete entry
    recorded = meta.get("checksums", {})
    corrupted, checksums = [], {}
    rows = shard_rows(meta["num_images"], meta["shard_size"])
    with progress_bar(f"checking {path.name}", total=len(rows), enabled=show_progress) as advance:
        for shard, count in enumerate(rows):
            for kind, shape in meta["shapes"].items():
                file = shard_file(path, shard, kind)
                array = open_shard(file, (count, *shape))
                checksums[file.name] = "" if array is None else data_checksum(array)
                if not checksums[file.name] or checksums[file.name] != recorded.get(file.name, checksums[file.name]):
                    corrupted.append(file)
            advance()
    if record and not corrupted:
        write_text(path / "meta.json", json.dumps({**meta, "checksums": checksums, "verified": True}))
    return corrupted


def ensure_cache(root: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                 with_layers: bool = True, bf16: bool = False, shard_size: int = SHARD_SIZE, verify: bool = False,
                 **kwargs) -> tuple[Path, bool]:
    """The folder of a complete cache entry for ``images``, built where missing or torn, and whether this
    call built any of it; with ``verify`` (training) its shards are checked against their checksums once,
    a corrupted one rebuilt.

    Rank 0 holds the entry's lock while it is built or checked. Across processes every rank
    builds shards ``rank, rank + world, ...``; after a barrier rank 0 checks every shard
    (building any still missing) and writes meta.json; after another barrier every rank may
    read the entry.
    """
    path = cache_dir_for(root, backbone, images, preprocess, with_layers, bf16)
    rank, world = distributed.rank(), distributed.world_size()
    show_progress = kwargs.get("show_progress", True)
    meta = complete_meta(path)
    ready = meta is not None and (meta.get("verified", False) or not verify)
    if meta is not None and not ready and not os.access(path, os.W_OK):
        # a read-only cache (shared, a snapshot): nothing can be recorded or rebuilt, so checked on every open
        corrupted = verify_entry(path, show_progress, record=False)
        if corrupted:
            raise DataError(f"{corrupted[0]}: corrupted (its checksum differs) in a read-only feature cache; "
                            "build the cache in another --cache folder")
        return path, False
    built = False
    with entry_lock(path, show_progress) if rank == 0 and not ready else contextlib.nullcontext():
        distributed.barrier()  # no rank builds before rank 0 holds the entry
        if world > 1:
            num_shards = len(shard_rows(len(images.items), entry_shard_size(path, shard_size)))
            build_cache(root, backbone, images, preprocess, with_layers, bf16, shard_size=shard_size,
                        shards=range(rank, num_shards, world), **kwargs)
            distributed.barrier()
        if rank == 0:
            built = complete_meta(path) is None  # another process may have built it while this one waited
            build_cache(root, backbone, images, preprocess, with_layers, bf16, shard_size=shard_size, **kwargs)
            meta = read_meta(path)
            assert meta is not None  # built just now
            if verify and not meta.get("verified") and (corrupted := verify_entry(path, show_progress)):
                note(f"{', '.join(str(file) for file in corrupted)}: corrupted (checksum differs); rebuilding",
                     show_progress)
                for file in corrupted:
                    file.unlink()
                build_cache(root, backbone, images, preprocess, with_layers, bf16, shard_size=shard_size, **kwargs)
                verify_entry(path, show_progress)  # a second read of the entry, but only where one was corrupted
    distributed.barrier()
    return path, built


def cache_splits(root: Path, backbone: VisionTransformer, data: str | Path, splits: list[str], image_size: int,
                 bf16: bool = False, **kwargs: Any) -> list[tuple[ImageList, Path, bool]]:
    """Build (where missing or torn) the per-layer cache entries of a task's ``splits``, in order; return
    each split's images, entry folder and whether this call built it (on rank 0). What ``querytune cache``
    and the bench do before training."""
    preprocess = Preprocess.for_backbone(backbone, image_size)
    entries = []
    for images in (open_split(data, split) for split in splits):
        part = whole_split_entry(root, backbone, images, preprocess, bf16)
        if part is not None:  # read from the whole split's entry: nothing to build
            entries.append((images, cache_dir_for(root, backbone, part[0], preprocess, True, bf16), False))
        else:
            entries.append((images, *ensure_cache(root, backbone, images, preprocess, True, bf16, **kwargs)))
    return entries


def open_or_build_cache(root: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                        with_layers: bool, bf16: bool = False, **kwargs) -> FeatureCache:
    """The cache entry for ``images``, built where missing or torn and checked against its checksums once
    (opened for training); a full entry also serves class-token readers, and the entry of the split
    ``images`` are part of serves them where they have none of their own (:func:`whole_split_entry`);
    per-layer readers build it where missing, class-token readers use it only where it exists."""
    part = whole_split_entry(root, backbone, images, preprocess, bf16, complete_only=not with_layers)
    if part is not None:
        whole, rows = part
        path, _ = ensure_cache(root, backbone, whole, preprocess, True, bf16, verify=True, **kwargs)
        return FeatureCache.open(path).part(rows)
    if read_meta(cache_dir_for(root, backbone, images, preprocess, True, bf16)) is not None:
        with_layers = True
    path, _ = ensure_cache(root, backbone, images, preprocess, with_layers, bf16, verify=True, **kwargs)
    return FeatureCache.open(path)


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
    return path.is_dir() and any((path / name).exists() for name in ("meta.json", LOCK_FILE, "shard-00000.cls.npy"))


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
    with open(entry.path / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{entry.path}: another process is building it; try again once it is done") from None
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
