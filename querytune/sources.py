"""Where a method's inputs come from: images, the live frozen trunk, or the feature cache.

Every source yields ``(inputs, labels)`` batches in an order it is given, so the same
seed gives the same batches whether features are computed live or read from the
cache (and whichever rank reads them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from .backbones.vit import VisionTransformer
from .data import ImageDataset, ImageList, Preprocess, iterate_loader
from .features import Features, empty_layer_major, extract_features

if TYPE_CHECKING:
    from .cache import FeatureCache


class BatchSource(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features | Tensor, Tensor]]: ...


def private_generator() -> torch.Generator:
    """For DataLoaders: each loader iterator draws a seed from its generator, and drawing it from
    the global RNG would shift the methods' dropout masks depending on where inputs come from."""
    return torch.Generator().manual_seed(0)


def _batch_indices(order: np.ndarray, batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


class ImageBatches:
    """Preprocessed images (for methods that run the trunk with autograd)."""

    def __init__(self, images: ImageList, preprocess: Preprocess, workers: int = 0) -> None:
        self.dataset = ImageDataset(images, preprocess)
        self.labels = np.asarray([label for _, label in images.items], dtype=np.int64)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_batch_indices(order, batch_size), num_workers=self.workers,
            generator=private_generator(),
        )
        yield from iterate_loader(loader)


class LiveFeatureBatches:
    """Frozen-trunk features computed on the fly (under no_grad)."""

    def __init__(self, images: ImageBatches, backbone: VisionTransformer, with_layers: bool, device: torch.device,
                 bf16: bool = False) -> None:
        self.images = images
        self.labels = images.labels
        self.backbone = backbone
        self.with_layers = with_layers
        self.device = device
        self.bf16 = bf16

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        for images, labels in self.images.batches(order, batch_size):
            yield extract_features(self.backbone, images.to(self.device), self.with_layers, bf16=self.bf16), labels


class CachedFeatureBatches:
    """Frozen-trunk features read from a feature cache, as float32 (per-layer tokens in bfloat16
    with ``bf16``: what the methods compute with under bf16 autocast).

    A batch's features are views of buffers reused for the next batch: consume a batch
    (forward and backward) before asking for the next one.
    """

    def __init__(self, cache: FeatureCache, with_layers: bool, bf16: bool = False) -> None:
        self.cache = cache
        self.labels = cache.labels
        self.with_layers = with_layers
        self.layers_dtype = torch.bfloat16 if bf16 else torch.float32

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Features, Tensor]]:
        cache = self.cache
        layers = None
        if self.with_layers:  # laid out as Features.to lays them out
            layers = empty_layer_major((batch_size, *cache.layers[0].shape[1:]), self.layers_dtype)
        buffers = Features(torch.empty(batch_size, *cache.cls[0].shape[1:]), layers)
        for indices in _batch_indices(order, batch_size):
            yield self.cache.features(indices, self.with_layers, buffers), torch.from_numpy(self.labels[indices])
