"""Where a method's inputs come from: images, the live frozen trunk, or the feature cache.

Every source yields ``(inputs, labels)`` batches in an order it is given, so the same
seed gives the same batches whether features are computed live or read from the
cache (and whichever rank reads them).

On a GPU a cache entry is either loaded into GPU memory once (``device`` placement:
batches are gathered there) or streamed from the memory-mapped shards (``host``
placement: a background thread gathers the next batch into pinned buffers while the
GPU computes, and a side stream copies it over). ``auto`` takes ``device`` when the
entry fits in :data:`DEVICE_CACHE_FRACTION` of the free GPU memory. On a CPU ``auto``
is ``host`` (the memory map); ``device`` loads the entry into RAM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..backbones.vit import VisionTransformer
from ..data import ImageDataset, ImageList, Preprocess, iterate_loader, private_generator
from ..errors import ConfigError
from ..progress import note
from . import TrunkInput
from .cache import Building, CacheKey, FeatureCache, open_or_build_cache
from .features import Features, empty_layer_major, extract_features
from .precision import Precision

PLACEMENTS = ("auto", "device", "host")
DEVICE_CACHE_FRACTION = 0.5  # of the GPU memory free when the entry is opened


class BatchSource(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features | Tensor, Tensor]]: ...


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of one epoch, a function of (seed, epoch) only: resuming reproduces it."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def _batch_indices(order: np.ndarray, batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


class _EpochBatches:
    """A batch sampler whose batches are set before each pass, so that one DataLoader (and its
    persistent workers) serves every epoch and evaluation."""

    def __init__(self) -> None:
        self.batches: list[list] = []  # of indices, or of (index, seed) keys (augmenting)

    def __iter__(self) -> Iterator[list]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageBatches:
    """Preprocessed images (for methods that run the trunk with autograd).

    With workers, one DataLoader keeps them alive across epochs and prefetches; with
    ``pin_memory`` (a GPU run) batches arrive in pinned memory for non-blocking copies.
    With ``augment`` each pass crops and flips every image at random, drawn from the pass's
    order and the image's index (see :class:`querytune.data.ImageDataset`), so a resumed run
    sees the same images as an uninterrupted one.
    """

    def __init__(self, images: ImageList, preprocess: Preprocess, workers: int = 0, pin_memory: bool = False,
                 augment: bool = False) -> None:
        self.dataset = ImageDataset(images, preprocess)
        self.labels = np.asarray([label for _, label in images.items], dtype=np.int64)
        self.workers = workers
        self.augment = augment
        self._sampler = _EpochBatches()
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._sampler, num_workers=workers, pin_memory=pin_memory,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            generator=private_generator(),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        batches: list[list] = _batch_indices(order, batch_size)
        if self.augment:  # the order is a function of (seed, epoch): so is each image's draw
            seed = int.from_bytes(hashlib.sha256(order.tobytes()).digest()[:8], "little")
            batches = [[(index, seed) for index in batch] for batch in batches]
        self._sampler.batches = batches
        yield from iterate_loader(self._loader)


class LiveFeatureBatches:
    """Frozen-trunk features computed on the fly (under no_grad)."""

    def __init__(self, images: ImageBatches, backbone: VisionTransformer, with_layers: bool, device: torch.device,
                 precision: Precision = Precision.FP32) -> None:
        self.images = images
        self.labels = images.labels
        self.backbone = backbone
        self.with_layers = with_layers
        self.device = device
        self.precision = precision

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        for images, labels in self.images.batches(order, batch_size):
            images = images.to(self.device, non_blocking=True)
            yield extract_features(self.backbone, images, self.with_layers, precision=self.precision), labels


class CachedFeatureBatches:
    """Frozen-trunk features read from a feature cache, as float32 (per-layer tokens in ``precision``'s
    :attr:`~Precision.features_dtype`: bfloat16 in a bf16 run, what the methods compute with under its autocast).

    ``placement``: see the module docstring; :attr:`placement` holds the one chosen. On the CPU and
    when streaming, a batch's features are views of buffers reused for later batches: consume a batch
    (forward and backward) before asking for the next one.
    """

    def __init__(self, cache: FeatureCache, with_layers: bool, precision: Precision = Precision.FP32,
                 device: torch.device | str = "cpu", placement: str = "auto") -> None:
        self.cache = cache
        self.labels = cache.labels
        self.with_layers = with_layers
        self.layers_dtype = precision.features_dtype
        self.device = torch.device(device)
        self.placement = choose_placement(cache, with_layers, self.device, placement)
        self.resident = cache.load(self.device, with_layers) if self.placement == "device" else None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        if self.resident is not None:
            return self._gather_on_device(order, batch_size)
        if self.device.type == "cuda":
            return self._stream(order, batch_size)
        return self._gather_on_host(order, batch_size)

    def _gather_on_host(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        buffers = self._host_buffers(batch_size, torch.float32, self.layers_dtype)
        for indices in _batch_indices(order, batch_size):
            yield self.cache.features(indices, self.with_layers, buffers), torch.from_numpy(self.labels[indices])

    def _gather_on_device(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        assert self.resident is not None
        pooled, layers = self.resident  # (n, D) and layer-major (L, n, N, D), float16
        for indices in _batch_indices(order, batch_size):
            index = torch.tensor(indices, device=self.device)
            batch_layers = None
            if layers is not None:  # (L, B, N, D) in the compute dtype, seen as a layer-major (B, L, N, D)
                batch_layers = layers.index_select(1, index).to(self.layers_dtype).transpose(0, 1)
            yield Features(pooled.index_select(0, index).float(), batch_layers), torch.from_numpy(self.labels[indices])

    def _stream(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        """Two pinned float16 buffers: a thread gathers batch i + 1 into one while batch i, copied out of
        the other on a side stream, is computed on; a buffer is refilled once its copy has finished."""
        batches = _batch_indices(order, batch_size)
        buffers = [self._host_buffers(batch_size, torch.float16, torch.float16, pin=True) for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]
        copy_stream = torch.cuda.Stream(self.device)

        def gather(i: int) -> Features:
            event = copied[i % 2]
            if event is not None:
                event.synchronize()
            return self.cache.features(batches[i], self.with_layers, buffers[i % 2])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(gather, 0) if batches else None
            for i, indices in enumerate(batches):
                assert pending is not None  # submitted before each batch
                host = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(gather, i + 1)
                with torch.cuda.stream(copy_stream):
                    features = host.to(self.device, self.layers_dtype)
                    event = torch.cuda.Event()
                    copied[i % 2] = event
                    event.record(copy_stream)
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(copy_stream)
                for tensor in (features.pooled, features.layers):
                    if tensor is not None:
                        tensor.record_stream(compute)  # made on the side stream, used and freed on this one
                yield features, torch.from_numpy(self.labels[indices])

    def _host_buffers(self, batch_size: int, pooled_dtype: torch.dtype, layers_dtype: torch.dtype,
                      pin: bool = False) -> Features:
        cache = self.cache
        layers = None
        if self.with_layers:  # laid out as Features.to lays them out
            assert cache.layers is not None
            layers = empty_layer_major((batch_size, *cache.layers[0].shape[1:]), layers_dtype, pin_memory=pin)
        return Features(torch.empty(batch_size, *cache.pooled[0].shape[1:], dtype=pooled_dtype, pin_memory=pin), layers)


def choose_placement(cache: FeatureCache, with_layers: bool, device: torch.device, placement: str) -> str:
    """Where a cache entry's features live while training: ``device`` (GPU memory) or ``host``."""
    if placement == "auto" and device.type != "cuda":
        return "host"
    if placement == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if cache.nbytes(with_layers) <= DEVICE_CACHE_FRACTION * free else "host"
    return placement


def check_augment(augment: bool, reads: TrunkInput, cache_dir: Path | None) -> None:
    if augment and reads.frozen and cache_dir is not None:
        raise ConfigError("--augment: cached features hold one view of each image, computed once; augmenting "
                          "needs the frozen trunk run live every epoch: add --no-cache")


def make_source(
    reads: TrunkInput,
    key: CacheKey,
    device: torch.device,
    cache_dir: Path | None = None,
    workers: int = 0,
    show_progress: bool = True,
    cache_placement: str = "auto",
    augment: bool = False,
) -> BatchSource:
    """The batches a method that ``reads`` this needs from ``key``'s images: the images, or frozen-trunk
    features of ``key``'s backbone, in its precision, read from the cache entry ``key`` under ``cache_dir``
    (built where missing; per-layer or class token as ``reads`` says) or computed live. ``augment`` (random
    crops and flips) needs the trunk run live: cached features are refused.

    ``cache_placement`` (auto | device | host) says where cached features live on a GPU
    (:class:`CachedFeatureBatches`); the choice is printed.
    """
    pin_memory = device.type == "cuda"
    check_augment(augment, reads, cache_dir)
    images = key.images
    if not reads.frozen:
        return ImageBatches(images, key.preprocess, workers, pin_memory, augment)
    if cache_dir is None:
        return LiveFeatureBatches(ImageBatches(images, key.preprocess, workers, pin_memory, augment), key.backbone,
                                  reads.with_layers, device, key.precision)
    key = replace(key, with_layers=reads.with_layers)
    cache = open_or_build_cache(cache_dir, key, Building(device=device, workers=workers, show_progress=show_progress))
    source = CachedFeatureBatches(cache, reads.with_layers, key.precision, device, cache_placement)
    if device.type == "cuda":
        where = "loaded into GPU memory" if source.placement == "device" else "streamed from the memory map"
        note(f"cached features of {images.task}/{images.split} ({cache.nbytes(reads.with_layers) / 2**30:.2f} GiB): "
             f"{where} (--cache-placement {cache_placement})", show_progress)
    return source
