"""What every layout reads into and what reads it: :class:`ImageList`, images, the VTAB-1k transform
(:class:`Preprocess`) with the FGVC augmentation, and the helpers the list readers share."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError, QuerytuneError, one_line
from ..options import ImageSize

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# RandomResizedCrop's ranges, as torchvision's and timm's defaults (and the FGVC protocols) use them.
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ImageList:
    """The images of one split of a task, with their integer labels."""

    root: Path
    split: str
    items: tuple[tuple[Path, int], ...]
    classes: tuple[str, ...] | None
    # Largest label in any of the task's lists, set where the classes are unknown so
    # that every split of a task agrees on num_classes (a small split may lack the last class).
    max_label: int | None = None
    # The list file or class folder the split was read from (for messages).
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        if self.max_label is not None:
            return self.max_label + 1
        return max(label for _, label in self.items) + 1

    @property
    def task(self) -> str:
        return self.root.name

    def fingerprint(self) -> str:
        """sha256 of the split, the relative paths, labels, sizes and mtimes of its images."""
        digest = hashlib.sha256(json.dumps(self.split).encode())
        for path, label in self.items:
            try:
                stat = path.stat()
            except OSError as error:
                raise DataError(f"{path}: cannot read image ({error.strerror})") from error
            record = [path.relative_to(self.root).as_posix(), label, stat.st_size, stat.st_mtime_ns]
            digest.update(b"\n" + json.dumps(record).encode())
        return digest.hexdigest()

    def load(self, index: int, draft_size: int | None = None) -> Image.Image:
        """Image ``index``, fully decoded (a JPEG at a reduced scale where ``draft_size`` allows: :func:`load_image`),
        in RGB."""
        return load_image(self.items[index][0], draft_size=draft_size)


class Preprocess:
    """The VTAB-1k transform: RGB, bicubic resize to ``image_size`` (no crop), normalise.

    ``image_size`` is N (N x N) or (height, width) in any spelling :class:`ImageSize` reads; ``size`` is it as
    (height, width), ``image_size`` as a run's record and a cache key write it (N where square, else 'HxW').

    Called with a random generator, it augments as the FGVC protocols do: a random resized crop
    (scale 0.08-1, aspect ratio 3/4-4/3) and a horizontal flip with probability 1/2 come first.

    ``draft``: JPEGs at least twice ``image_size``'s longer side on both sides are decoded at a reduced scale (1/2, 1/4
    or 1/8, JPEG's draft mode, several times faster) that still covers ``image_size``, before the resize;
    un-augmented images only (:class:`ImageDataset`). The pixels differ slightly, so it is part of the
    preprocessing a feature-cache entry is keyed by.
    """

    def __init__(self, image_size: int | str | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 draft: bool = False) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
        self.size = ImageSize.of(image_size)
        self.image_size = self.size.recorded
        self.draft = draft
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    @classmethod
    def for_backbone(cls, backbone: Any, image_size: int | str | Sequence[int], draft: bool = False) -> Preprocess:
        """The transform at ``image_size`` with the backbone's normalisation (``backbone.config``), which
        must be known: a loader that cannot tell it leaves it None rather than guess."""
        config = backbone.config
        if config.mean is None or config.std is None:
            raise ConfigError(f"backbone {config.name}: its normalisation is unknown (its checkpoint names none); "
                              "give --mean and --std, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 "
                              "(ImageNet's)")
        return cls(image_size, config.mean, config.std, draft)

    def __call__(self, image: Image.Image, augment: np.random.Generator | None = None) -> torch.Tensor:
        size = (self.size.width, self.size.height)  # PIL's order
        image = to_rgb(image)
        if augment is not None:
            image = _random_resized_crop(image, augment)
            if augment.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
        return pixels.permute(2, 0, 1).float().div_(255).sub_(self._mean).div_(self._std)


def check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple[float, ...],
                                                                                             tuple[float, ...]]:
    """A user's ``--mean``/``--std``: both, three values each (R, G, B), std positive."""
    if mean is None or std is None:
        raise ConfigError("--mean and --std go together: give both")
    try:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--mean and --std need numbers, got {mean!r} and {std!r}") from error
    for name, values in (("--mean", mean), ("--std", std)):
        if len(values) != 3:
            raise ConfigError(f"{name} needs 3 values (R, G, B), got {len(values)}: {list(values)}")
    if min(std) <= 0:
        raise ConfigError(f"--std must be positive, got {list(std)}")
    return mean, std


def load_image(source: Path | str | bytes, name: str | None = None, max_pixels: int | None = None,
               draft_size: int | None = None) -> Image.Image:
    """The image in the file ``source`` (or in the bytes ``source``, called ``name`` in errors), fully decoded, in
    RGB. One of more than ``max_pixels`` (width x height) is refused before it is decoded. A JPEG at least twice
    ``draft_size`` on both sides is decoded at the smallest JPEG scale (1/2, 1/4, 1/8) that keeps both sides at
    least ``draft_size`` (PIL's ``Image.draft``)."""
    opened: io.BytesIO | Path
    if isinstance(source, bytes):
        name, empty, opened = name or "image", not source, io.BytesIO(source)
    else:
        opened = Path(source)
        name, empty = name or str(opened), opened.is_file() and opened.stat().st_size == 0
    with reading_image(name, empty), Image.open(opened) as image:
        check_pixels(image, name, max_pixels)
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, (draft_size, draft_size))
        image.load()  # PIL decodes lazily: truncation only shows here
        return to_rgb(image)


@contextmanager
def reading_image(name: str, empty: bool = False) -> Iterator[None]:
    """PIL's errors while opening or decoding the image ``name`` as one-line DataErrors naming it (``empty``: its
    source holds no bytes)."""
    try:
        yield
    except UnidentifiedImageError as error:
        reason = "empty file" if empty else "not a recognised image format"
        raise DataError(f"{name}: cannot read image ({reason})") from error
    except OSError as error:
        raise DataError(f"{name}: cannot read image ({error.strerror or one_line(error)})") from error
    # PIL's decoders also raise these for damaged files (and DecompressionBombError for huge ones).
    except (ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{name}: cannot read image ({one_line(error)})") from error


def check_pixels(image: Image.Image, name: str, max_pixels: int | None) -> None:
    """Refuses an opened (not yet decoded) image of more than ``max_pixels``, width x height."""
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise DataError(f"{name}: {image.width}x{image.height} pixels, more than the {max_pixels} allowed")


def private_generator() -> torch.Generator:
    """For DataLoaders: each loader iterator draws a seed from its generator, and drawing it from
    the global RNG would shift the methods' dropout masks depending on where inputs come from."""
    return torch.Generator().manual_seed(0)


def iterate_loader(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate ``loader``; a QuerytuneError raised in a worker process comes out with its own one-line message.

    PyTorch re-raises a worker's exception in the main process with the worker's whole
    traceback as the message; its last line is ``<module>.<class>: <the original message>``.
    """
    try:
        yield from loader
    except QuerytuneError as error:
        lines = str(error).strip().splitlines()
        if len(lines) < 2:
            raise
        prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
        raise type(error)(lines[-1].removeprefix(prefix)) from None


class ImageDataset(torch.utils.data.Dataset):
    """(preprocessed image, label) pairs of an :class:`ImageList`, which ``images`` holds.

    A key is an index, or (index, seed) for an augmented image whose crop and flip are drawn
    from ``(seed, index)`` alone: whichever worker loads it, and in a resumed run too.
    """

    def __init__(self, images: ImageList, preprocess: Preprocess) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        augment = None if seed is None else np.random.default_rng([seed, index])
        draft_size = max(self.preprocess.size) if self.preprocess.draft and augment is None else None
        return self.preprocess(self.images.load(index, draft_size), augment), self.images.items[index][1]


def _random_resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop region: up to 10 draws of an area fraction and a log-uniform
    aspect ratio, then the largest central crop within the ratio bounds."""
    width, height = image.size
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*_CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.crop((left, top, left + w, top + h))
    w, h = width, height
    if width / height < _CROP_RATIO[0]:
        h = round(width / _CROP_RATIO[0])
    elif width / height > _CROP_RATIO[1]:
        w = round(height * _CROP_RATIO[1])
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits as PNG decoders do; PIL's convert would clip at 255.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct conversion warns on every such image
    return image if image.mode == "RGB" else image.convert("RGB")


def read_text(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text") from error


def image_path(root: Path, where: str, text: str) -> Path:
    """The listed image ``text`` under ``root``; ``where`` names the list entry in messages."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise DataError(f"{where}: image path {text!r} contains control characters")
    if Path(text).is_absolute():
        raise DataError(f"{where}: image path {text!r} is absolute; list it relative to {root}")
    # Lexical, not resolved: symlinks inside the task folder may point elsewhere (shared image stores).
    path = Path(os.path.normpath(root / text))
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image path {text!r} leads outside the task folder {root}")
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return path
