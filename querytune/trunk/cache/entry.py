"""A feature-cache entry: its key, its format and reading it.

The frozen trunk is run once per image; its :class:`~querytune.trunk.features.Features`
(per-block normalised tokens and the pooled final feature) are stored in float16 as
``.npy`` shards that later epochs memory-map, so data larger than RAM works.

Layout of one cache entry, ``<root>/<task>-<split>-<key16>/``:

    shard-00000.layers.npy   (n, L, N, D) float16   (absent in a class-token-only entry)
    shard-00000.cls.npy      (n, D) float16      (``Features.pooled``; the kind's name on disk is ``cls``)
    shard-00000.json         the shard's record: each of its files' sha256 and sampled-block hash, written
                             once the files are on disk (fsync) under their names
    ...
    meta.json                written once every shard exists: shard size, feature shapes, labels,
                             each shard's sha256; its modification time is when the entry was last used
    .lock                    held (flock) by the process building the entry, while it does

The key (:class:`CacheKey`) hashes everything the features depend on: the backbone's weights and
architecture, the preprocessing (image size, mean, std), the split's file list with
labels, sizes and modification times, the storage dtype and the format version, so a
stale entry is never reused. Methods that read only the pooled feature (linear
probe) use a class-token-only entry (``-cls``), or a full one where it exists.

What is checked when (:func:`untrusted_shards`, :func:`verify_entry`):

- every time an entry is built or opened, each shard's header (dtype, shape) and file size against what
  the entry must hold (a truncated, extended or foreign file), and whether the shard is still as its
  record says: not modified after its record was written (its mtime), and the same bytes in
  :data:`SAMPLED_BLOCKS` blocks at fixed offsets (a few KiB read per file);
- the full sha256 of a shard's data, against meta.json: where that cheap check fails (the shard is
  rebuilt if its data differs, recorded afresh if not, as after a copy that changed the mtimes), for
  every shard the first time the entry is opened for training (meta.json's ``verified``), and for
  entries written before records existed, once.

So what escapes the checks is a change of bytes outside the sampled blocks with the shard's
modification time put back. A shard without a valid record (written by a build killed before its
record, or changed since) is never adopted into a new meta.json: it is rebuilt, never hashed as found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...backbones.vit import VisionTransformer
from ...data import ImageList, Preprocess, open_split
from ...data.splits import WHOLE_SPLIT
from ...errors import DataError
from ...files import write_text
from ...progress import progress_bar
from ..features import Features, copy_converted
from ..precision import Precision

FORMAT_VERSION = 2
STORAGE_DTYPE = torch.float16
FINGERPRINT_ATTRIBUTE = "_querytune_fingerprint"  # where a backbone object keeps its fingerprint once computed
POOLED_KIND = "cls"  # the stored kind that holds ``Features.pooled``, as its shards are named on disk
SAMPLED_BLOCKS = 8  # blocks of a shard file hashed on every open: its first, its last and evenly between
SAMPLED_BLOCK_BYTES = 4096


def backbone_fingerprint(backbone: VisionTransformer) -> str:
    """sha256 of the architecture and every weight (computed once per model object)."""
    cached = getattr(backbone, FINGERPRINT_ATTRIBUTE, None)
    if cached is not None:
        return cached
    digest = hashlib.sha256(json.dumps(backbone.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    fingerprint = digest.hexdigest()
    setattr(backbone, FINGERPRINT_ATTRIBUTE, fingerprint)  # a plain attribute, not a tensor or a module
    return fingerprint


@dataclass(frozen=True)
class CacheKey:
    """A cache entry's identity, everything its features depend on: the backbone, the images, their
    preprocessing, whether the per-layer tokens are kept (else the class token only) and the precision
    of the run that reads them, of which only the trunk's (:attr:`Precision.trunk`) counts."""

    backbone: VisionTransformer
    images: ImageList
    preprocess: Preprocess
    with_layers: bool = True
    precision: Precision = Precision.FP32

    @property
    def trunk_bf16(self) -> bool:
        return self.precision.trunk is Precision.BF16

    def digest(self) -> str:
        """The sha256 of the key's parts, with the format version and the storage dtype."""
        parts = {
            "with_layers": self.with_layers,
            "trunk_bf16": self.trunk_bf16,
            "format": FORMAT_VERSION,
            "dtype": str(STORAGE_DTYPE),
            "backbone": backbone_fingerprint(self.backbone),
            "image_size": self.preprocess.image_size,
            "mean": list(self.preprocess.mean),
            "std": list(self.preprocess.std),
            "images": self.images.fingerprint(),
        }
        if self.preprocess.draft:  # keyed only when on, so that the entries built before it keep their keys
            parts["draft"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def folder(self, root: Path) -> Path:
        """The entry's folder under the cache ``root``: ``<task>-<split>[-cls][-bf16]-<digest16>``."""
        kind = ("" if self.with_layers else "-cls") + ("-bf16" if self.trunk_bf16 else "")
        return Path(root) / f"{self.images.task}-{self.images.split}{kind}-{self.digest()[:16]}"


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


def shard_rows(num_images: int, shard_size: int) -> list[int]:
    """The number of images in each shard."""
    return [min(shard_size, num_images - start) for start in range(0, num_images, shard_size)]


def feature_shapes(backbone: VisionTransformer, preprocess: Preprocess, with_layers: bool) -> dict[str, list[int]]:
    """The per-image shape of each stored kind: the pooled feature (D,) and, with layers, ``layers`` (L, N, D)."""
    config = backbone.config
    shapes = {POOLED_KIND: [config.embed_dim]}
    if with_layers:
        shapes["layers"] = [config.depth, config.num_tokens(preprocess.size), config.embed_dim]
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


def sampled_checksum(file: Path) -> str:
    """The sha256 of :data:`SAMPLED_BLOCKS` blocks of ``file`` at fixed offsets: its first, its last and evenly
    spaced between (what the check on every open reads)."""
    size = file.stat().st_size
    span = max(size - SAMPLED_BLOCK_BYTES, 0)
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in range(SAMPLED_BLOCKS):
            handle.seek(span * block // (SAMPLED_BLOCKS - 1))
            digest.update(handle.read(SAMPLED_BLOCK_BYTES))
    return digest.hexdigest()


def record_file(path: Path, shard: int) -> Path:
    return path / f"shard-{shard:05d}.json"


def file_record(file: Path, checksum: str) -> dict[str, str]:
    """What a shard's record holds for one of its files, whose data has sha256 ``checksum``."""
    return {"sha256": checksum, "sample": sampled_checksum(file)}


def write_record(path: Path, shard: int, records: dict[str, dict[str, str]]) -> None:
    """Write the record of ``shard`` (its files' :func:`file_record` by name) once its files are in place, so that
    they are not newer than it (files dated ahead of this host's clock, as on a server whose clock runs ahead,
    date it as the newest of them)."""
    record = record_file(path, shard)
    write_text(record, json.dumps(dict(sorted(records.items()))))
    newest = max((path / name).stat().st_mtime_ns for name in records)
    if newest > record.stat().st_mtime_ns:
        os.utime(record, ns=(newest, newest))


def whole_shards(path: Path, shapes: dict[str, list[int]], rows: list[int], shards: range | list[int]) -> list[int]:
    """Which of ``shards`` are whole: each kind's file there with the header and size it must have."""
    return [shard for shard in shards
            if all(open_shard(shard_file(path, shard, kind), (rows[shard], *shape)) is not None
                   for kind, shape in shapes.items())]


def trusted_record(path: Path, shard: int, kinds: Iterable[str]) -> dict[str, dict[str, str]] | None:
    """The record of ``shard`` where its files (of ``kinds``) are still as it says: none modified after the
    record was written, the same bytes in the sampled blocks; else None (no record, or a changed file).
    The files' headers and sizes are :func:`whole_shards`' to check."""
    record = record_file(path, shard)
    try:
        records = json.loads(record.read_text())
        recorded_at = record.stat().st_mtime_ns
        for kind in kinds:
            file = shard_file(path, shard, kind)
            if file.stat().st_mtime_ns > recorded_at or sampled_checksum(file) != records[file.name]["sample"]:
                return None
        return records
    except (OSError, ValueError, TypeError, KeyError):  # absent, torn by a power loss, or of another shard
        return None


def trusted_shards(path: Path, shapes: dict[str, list[int]], rows: list[int], shards: range | list[int]
                   ) -> dict[int, dict[str, dict[str, str]]]:
    """The records of those of ``shards`` that are whole and still as recorded, by shard."""
    records = {shard: trusted_record(path, shard, shapes) for shard in whole_shards(path, shapes, rows, shards)}
    return {shard: record for shard, record in records.items() if record is not None}


def complete_meta(path: Path) -> dict[str, Any] | None:
    """The meta.json of the entry at ``path`` where the entry is complete (every shard whole), else None."""
    meta = read_meta(path)
    if meta is None:
        return None
    rows = shard_rows(meta["num_images"], meta["shard_size"])
    return meta if len(whole_shards(path, meta["shapes"], rows, range(len(rows)))) == len(rows) else None


def untrusted_shards(path: Path, meta: dict[str, Any]) -> list[int]:
    """The shards of the complete entry at ``path`` (``meta``) that the check on every open cannot vouch for:
    without a record, changed since it was written (:func:`trusted_record`), or recording other checksums
    than meta.json."""
    untrusted = []
    for shard in range(len(shard_rows(meta["num_images"], meta["shard_size"]))):
        record = trusted_record(path, shard, meta["shapes"])
        if record is None or any(record[name]["sha256"] != meta["checksums"].get(name) for name in record):
            untrusted.append(shard)
    return untrusted


def verify_entry(path: Path, shards: Iterable[int] | None = None, show_progress: bool = True,
                 record: bool = True) -> list[Path]:
    """Check ``shards`` (default: all) of the complete entry at ``path`` against their checksums in meta.json;
    return the corrupted shards' files. With ``record``, each shard that held gets a fresh record, and where
    all of the entry's shards were checked and held, meta.json records that (``verified``)."""
    meta = read_meta(path)
    assert meta is not None  # a complete entry
    recorded = meta["checksums"]
    rows = shard_rows(meta["num_images"], meta["shard_size"])
    checked = list(range(len(rows)) if shards is None else shards)
    corrupted = []
    with progress_bar(f"checking {path.name}", total=len(checked), enabled=show_progress) as advance:
        for shard in checked:
            held = {}
            for kind, shape in meta["shapes"].items():
                file = shard_file(path, shard, kind)
                array = open_shard(file, (rows[shard], *shape))
                if array is None or data_checksum(array) != recorded.get(file.name):
                    corrupted.append(file)
                else:
                    held[file.name] = file_record(file, recorded[file.name])
            if record and len(held) == len(meta["shapes"]):
                write_record(path, shard, held)
            advance()
    if record and not corrupted and len(checked) == len(rows) and not meta.get("verified"):
        write_text(path / "meta.json", json.dumps({**meta, "verified": True}))
    return corrupted


@dataclass
class FeatureCache:
    """A complete cache entry, memory-mapped."""

    path: Path
    labels: np.ndarray
    shard_size: int
    layers: list[torch.Tensor] | None
    pooled: list[torch.Tensor]
    rows: np.ndarray | None = None  # a part of the entry (see :meth:`part`): its rows, in order

    def __len__(self) -> int:
        return len(self.labels)

    def part(self, rows: np.ndarray) -> FeatureCache:
        """The entry seen as holding only its ``rows`` (indices into the entry), in that order."""
        return FeatureCache(self.path, self.labels[rows], self.shard_size, self.layers, self.pooled, rows)

    @classmethod
    def open(cls, path: Path) -> FeatureCache:
        meta = read_meta(path)
        if meta is None:
            raise DataError(f"{path}: not a complete feature cache (meta.json missing, unreadable or of another "
                            "format); build the cache again")
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            os.utime(path / "meta.json")  # marks the entry used (``querytune cache ls``, ``prune``)
        layers, pooled = [], []
        for shard, rows in enumerate(shard_rows(meta["num_images"], meta["shard_size"])):
            arrays = {}
            for kind in meta["shapes"]:
                file = shard_file(path, shard, kind)
                # copy-on-write mappings: never written, but torch wants writable arrays
                arrays[kind] = open_shard(file, (rows, *meta["shapes"][kind]))
                if arrays[kind] is None:
                    raise DataError(f"{file}: missing or torn feature-cache shard; build the cache again to redo it")
            pooled.append(torch.from_numpy(arrays[POOLED_KIND]))
            if "layers" in arrays:
                layers.append(torch.from_numpy(arrays["layers"]))
        return cls(path, np.asarray(meta["labels"], dtype=np.int64), meta["shard_size"],
                   layers if "layers" in meta["shapes"] else None, pooled)

    def nbytes(self, with_layers: bool = True) -> int:
        """Bytes of the entry's pooled features, and per-layer tokens with ``with_layers``."""
        kinds = [self.pooled] + ([self.layers] if with_layers and self.layers is not None else [])
        whole = sum(shard.nbytes for shards in kinds for shard in shards)
        return whole if self.rows is None else whole * len(self) // sum(len(shard) for shard in self.pooled)

    def load(self, device: torch.device, with_layers: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole entry in ``device`` memory, float16: pooled features (n, D) and, with ``with_layers``,
        per-layer tokens stored layer-major (L, n, N, D), so that gathering a batch along dim 1 yields
        each layer's tokens contiguous."""
        if with_layers and self.layers is None:
            raise DataError(f"{self.path}: holds class tokens only, per-layer features were asked for")
        if self.rows is not None:  # a part: its rows gathered on the host, so the device holds only them
            part = self.features(np.arange(len(self)), with_layers)
            layers = part.layers.transpose(0, 1).contiguous().to(device) if part.layers is not None else None
            return part.pooled.to(device), layers
        pooled = torch.cat([shard.to(device) for shard in self.pooled])
        if not with_layers:
            return pooled, None
        assert self.layers is not None  # checked above
        first = self.layers[0]
        layers = torch.empty(first.shape[1], len(self), *first.shape[2:], dtype=first.dtype, device=device)
        start = 0
        for shard in self.layers:
            layers[:, start : start + len(shard)] = shard.to(device).transpose(0, 1)
            start += len(shard)
        return pooled, layers

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
            out = Features(torch.empty(count, *self.pooled[0].shape[1:], dtype=torch.float16),
                           torch.empty(count, *layers[0].shape[1:], dtype=torch.float16) if layers is not None
                           else None)
        if self.rows is not None:
            indices = self.rows[np.asarray(indices, dtype=np.int64)]
        for row, index in enumerate(indices):
            shard, offset = divmod(int(index), self.shard_size)
            out.pooled[row].copy_(self.pooled[shard][offset])
            if layers is not None:
                assert out.layers is not None  # buffers given in ``out`` hold per-layer rows too
                copy_converted(out.layers[row], layers[shard][offset])
        if layers is None:
            return Features(out.pooled[:count], None)
        assert out.layers is not None
        return Features(out.pooled[:count], out.layers[:count])


def whole_split_entry(root: Path, key: CacheKey, complete_only: bool = True) -> tuple[CacheKey, np.ndarray] | None:
    """Where ``key``'s images have no per-layer entry of their own but are all in the split they are part of
    (:data:`~querytune.data.splits.WHOLE_SPLIT`: VTAB-1k's train800 and val200 are the parts of its
    train800val200, so a search on train800 -> val200 and the final runs on train800val200 cost one trunk
    pass and one entry's disk), whose entry is complete (or, without ``complete_only``, may be built): the
    key of that split's per-layer entry, and the rows of the images in it."""
    images, full = key.images, replace(key, with_layers=True)
    whole_name = WHOLE_SPLIT.get(images.split)
    if whole_name is None or read_meta(full.folder(root)) is not None:
        return None
    try:
        whole = replace(full, images=open_split(images.root, whole_name))
    except DataError:  # the task has no such split
        return None
    if complete_only and read_meta(whole.folder(root)) is None:
        return None
    position = {item: row for row, item in enumerate(whole.images.items)}
    rows = [position.get(item) for item in images.items]
    if any(row is None for row in rows):
        return None
    return whole, np.asarray(rows, dtype=np.int64)
