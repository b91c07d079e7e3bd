"""On-disk feature cache for the frozen-backbone methods.

The frozen trunk is run once per image; its :class:`~querytune.features.Features`
(per-block normalised tokens and the final class token) are stored in float16 as
``.npy`` shards that later epochs memory-map, so data larger than RAM works.

Layout of one cache entry, ``<root>/<task>-<split>-<key16>/``:

    shard-00000.layers.npy   (n, L, N, D) float16   (absent in a class-token-only entry)
    shard-00000.cls.npy      (n, D) float16
    ...
    meta.json                written once every shard exists: shard size, feature shapes, labels

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

Across processes (torchrun) every rank builds every ``world``-th shard, then rank 0
checks them all and writes meta.json (:func:`ensure_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..backbones.vit import VisionTransformer
from ..data import ImageDataset, ImageList, Preprocess, iterate_loader, open_split, private_generator
from ..errors import DataError
from ..files import remove_stale_temporaries, temporary_path, write_text
from ..progress import progress_bar
from .features import Features, copy_converted, extract_features

FORMAT_VERSION = 2
STORAGE_DTYPE = torch.float16
SHARD_SIZE = 64  # images per shard: also the unit of work split across ranks and redone after a kill
FINGERPRINT_ATTRIBUTE = "_querytune_fingerprint"  # where a backbone object keeps its fingerprint once computed


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


@dataclass
class FeatureCache:
    """A complete cache entry, memory-mapped."""

    path: Path
    labels: np.ndarray
    shard_size: int
    layers: list[torch.Tensor] | None
    cls: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def open(cls, path: Path) -> FeatureCache:
        meta = read_meta(path)
        if meta is None:
            raise DataError(f"{path}: not a complete feature cache (meta.json missing, unreadable or of another "
                            "format); build the cache again")
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
        return sum(shard.nbytes for shards in kinds for shard in shards)

    def load(self, device: torch.device, with_layers: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole entry in ``device`` memory, float16: class tokens (n, D) and, with ``with_layers``,
        per-layer tokens stored layer-major (L, n, N, D), so that gathering a batch along dim 1 yields
        each layer's tokens contiguous."""
        cls = torch.cat([shard.to(device) for shard in self.cls])
        if not with_layers:
            return cls, None
        if self.layers is None:
            raise DataError(f"{self.path}: holds class tokens only, per-layer features were asked for")
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
    another shard size keeps its own.
    """
    path = cache_dir_for(root, backbone, images, preprocess, with_layers, bf16)
    shard_size = entry_shard_size(path, shard_size)
    shapes = feature_shapes(backbone, preprocess, with_layers)
    rows = shard_rows(len(images.items), shard_size)

    def whole(shard: int) -> bool:
        return all(open_shard(shard_file(path, shard, kind), (rows[shard], *shape)) is not None
                   for kind, shape in shapes.items())

    todo = [s for s in (shards if shards is not None else range(len(rows))) if not whole(s)]
    if not todo and (shards is not None or read_meta(path) is not None):
        return path
    path.mkdir(parents=True, exist_ok=True)
    backbone = backbone.to(device).eval()
    # One loader for every shard to do (workers start once); no batch spans two shards.
    plan = [(shard, list(range(first, min(first + batch_size, shard * shard_size + rows[shard]))))
            for shard in todo for first in range(shard * shard_size, shard * shard_size + rows[shard], batch_size)]
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, preprocess), batch_sampler=[indices for _, indices in plan], num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", generator=private_generator(),
    )
    files: dict[str, np.memmap] = {}
    with progress_bar(f"caching {images.task}/{images.split}", total=sum(rows[s] for s in todo),
                      enabled=show_progress) as advance:
        try:
            for (shard, indices), (batch, _) in zip(plan, iterate_loader(loader)):
                if not files:  # a shard begins: written in place into temporary files, renamed once whole
                    files = {kind: np.lib.format.open_memmap(temporary_path(shard_file(path, shard, kind)), mode="w+",
                                                              dtype=np.float16, shape=(rows[shard], *shape))
                             for kind, shape in shapes.items()}
                row = indices[0] - shard * shard_size
                feats = extract_features(backbone, batch.to(device, non_blocking=True), with_layers, STORAGE_DTYPE,
                                         bf16)
                files["cls"][row : row + len(batch)] = feats.cls.cpu().numpy()
                if feats.layers is not None:  # with_layers
                    files["layers"][row : row + len(batch)] = feats.layers.cpu().numpy()
                advance(len(batch))
                if row + len(batch) == rows[shard]:
                    for kind, array in files.items():
                        array.flush()
                        assert array.filename is not None  # a memmap opened on a file
                        os.replace(array.filename, shard_file(path, shard, kind))
                    files = {}
        finally:
            for array in files.values():  # a shard left unfinished
                assert array.filename is not None
                Path(array.filename).unlink(missing_ok=True)
    if shards is None:
        remove_stale_temporaries(path)
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
        }
        write_text(path / "meta.json", json.dumps(meta))
    return path


def ensure_cache(root: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                 with_layers: bool = True, bf16: bool = False, shard_size: int = SHARD_SIZE, **kwargs) -> Path:
    """The folder of a complete cache entry for ``images``, built where missing or torn.

    Across processes every rank builds shards ``rank, rank + world, ...``; after a barrier
    rank 0 checks every shard (building any still missing) and writes meta.json; after
    another barrier every rank may read the entry.
    """
    path = cache_dir_for(root, backbone, images, preprocess, with_layers, bf16)
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:
        num_shards = len(shard_rows(len(images.items), entry_shard_size(path, shard_size)))
        build_cache(root, backbone, images, preprocess, with_layers, bf16, shard_size=shard_size,
                    shards=range(rank, num_shards, world), **kwargs)
        distributed.barrier()
    if rank == 0:
        build_cache(root, backbone, images, preprocess, with_layers, bf16, shard_size=shard_size, **kwargs)
    distributed.barrier()
    return path


def cache_splits(root: Path, backbone: VisionTransformer, data: str | Path, splits: list[str], image_size: int,
                 bf16: bool = False, **kwargs: Any) -> list[tuple[ImageList, Path]]:
    """Build (where missing or torn) the per-layer cache entries of a task's ``splits``, in order; return
    each split's images and entry folder. What ``querytune cache`` and the bench do before training."""
    preprocess = Preprocess.for_backbone(backbone, image_size)
    entries = []
    for split in splits:
        images = open_split(data, split)
        entries.append((images, ensure_cache(root, backbone, images, preprocess, True, bf16, **kwargs)))
    return entries


def open_or_build_cache(root: Path, backbone: VisionTransformer, images: ImageList, preprocess: Preprocess,
                        with_layers: bool, bf16: bool = False, **kwargs) -> FeatureCache:
    """The cache entry for ``images``, built where missing or torn; a full entry also serves class-token readers."""
    if read_meta(cache_dir_for(root, backbone, images, preprocess, True, bf16)) is not None:
        with_layers = True
    return FeatureCache.open(ensure_cache(root, backbone, images, preprocess, with_layers, bf16, **kwargs))


def default_cache_root() -> Path:
    """``$QUERYTUNE_CACHE``, else ``~/.cache/querytune/features``."""
    return Path(os.environ.get("QUERYTUNE_CACHE", Path.home() / ".cache" / "querytune" / "features"))
