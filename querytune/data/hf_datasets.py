"""Hugging Face ``datasets`` folders, written by ``save_to_disk`` (needs the ``datasets`` extra)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ConfigError, DataError, one_line
from .core import ImageList, read_text, to_rgb

HF_DATASETS = "Hugging Face datasets folder"


@dataclass(frozen=True)
class DatasetsImageList(ImageList):
    """A split of a Hugging Face ``datasets`` folder (``source``, the split's own folder): its images
    are rows of the split's Arrow files, so an item's path is only a name, ``<source>/row-<i>``."""

    image_column: str = "image"

    def fingerprint(self) -> str:
        """sha256 of the split, its image column, the names, sizes and mtimes of its files, and its labels."""
        assert self.source is not None
        digest = hashlib.sha256(json.dumps([self.split, self.image_column]).encode())
        for file in sorted(self.source.iterdir()):
            stat = file.stat()
            digest.update(b"\n" + json.dumps([file.name, stat.st_size, stat.st_mtime_ns]).encode())
        digest.update(json.dumps([label for _, label in self.items]).encode())
        return digest.hexdigest()

    def load(self, index: int, draft_size: int | None = None) -> Image.Image:
        """Image ``index`` in RGB; ``datasets`` decodes it whole itself, so ``draft_size`` has no effect."""
        assert self.source is not None
        try:
            image = _datasets_split(self.source)[index][self.image_column]
            if image is None:
                raise DataError(f"{self.source}: row {index} has no image")
            image.load()
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
            raise DataError(f"{self.source}: row {index}: cannot read image ({one_line(error)})") from error
        return to_rgb(image)


def datasets_splits(root: Path) -> dict[str, Path]:
    """The splits of a ``save_to_disk`` folder: a DatasetDict's (one folder each), or one Dataset's, ``all``."""
    index = root / "dataset_dict.json"
    if index.is_file():
        try:
            names = json.loads(read_text(index))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{index}: not a datasets split index ({one_line(error)})") from error
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise DataError(f"{index}: 'splits' must be a list of names, got {names!r}")
        return {name: root / name for name in names}
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        return {"all": root}
    return {}


@functools.lru_cache(maxsize=16)
def _datasets_split(folder: Path) -> Any:
    """The ``datasets.Dataset`` saved in ``folder``, opened once per process (memory-mapped)."""
    try:
        import datasets
    except ImportError as error:
        raise ConfigError(f"{folder}: a Hugging Face datasets folder; reading it needs the datasets extra: "
                          "pip install 'querytune[datasets]'") from error
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as error:  # a damaged folder raises anything from FileNotFoundError to Arrow's own errors
        raise DataError(f"{folder}: cannot open this datasets folder ({one_line(error)})") from error


def _datasets_columns(dataset: Any, folder: Path) -> tuple[str, str]:
    """The image column (the one of the Image feature) and the label column (``label``/``labels``, else
    the one ClassLabel column)."""
    import datasets

    features = dataset.features
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(images) != 1:
        raise DataError(f"{folder}: expected one image column, found {len(images)} (columns: {', '.join(features)})")
    labels = [name for name in ("label", "labels") if name in features]
    labels = labels or [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(labels) != 1:
        raise DataError(f"{folder}: expected a label column ('label', or one ClassLabel column), found "
                        f"{len(labels)} (columns: {', '.join(features)})")
    return images[0], labels[0]


def _datasets_labels(folder: Path) -> tuple[list[int], tuple[str, ...] | None]:
    """A split's labels and, where its label column is a ClassLabel, the class names."""
    dataset = _datasets_split(folder)
    _, column = _datasets_columns(dataset, folder)
    names = getattr(dataset.features[column], "names", None)
    labels = list(dataset[column])
    for row, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataError(f"{folder}: row {row}: label {label!r} is not a class number")
        if names is not None and label >= len(names):
            raise DataError(f"{folder}: row {row}: label {label} is out of range: the dataset names {len(names)} "
                            "classes")
    return labels, tuple(names) if names is not None else None


def open_datasets(root: Path, split: str, splits: dict[str, Path]) -> ImageList:
    folder = splits[split]
    image_column, _ = _datasets_columns(_datasets_split(folder), folder)
    labels, classes = _datasets_labels(folder)
    if not labels:
        raise DataError(f"{folder}: split {split!r} holds no images ({HF_DATASETS})")
    max_label = None
    if classes is None:  # numbered over every split, so that all agree on num_classes
        max_label = max(max(_datasets_labels(other)[0], default=0) for other in splits.values())
    items = tuple((folder / f"row-{row}", label) for row, label in enumerate(labels))
    return DatasetsImageList(root, split, items, classes, max_label, folder, image_column)
