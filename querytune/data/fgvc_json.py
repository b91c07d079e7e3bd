"""JSON annotations, the FGVC layout of VPT and NOAH: ``<split>.json`` lists of image paths and labels."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .core import ImageList, image_path, read_text

JSON_LISTS = "JSON annotation folder"
# Where the image paths of JSON annotations start: VPT's FGVC folders use each of these.
_JSON_IMAGE_FOLDERS = ("", "images", "Images")


def open_json(root: Path, split: str, lists: dict[str, Path]) -> ImageList:
    file = lists[split]
    entries = _read_json_list(file)
    if not entries:
        raise DataError(f"{file}: split {split!r} lists no images ({JSON_LISTS})")
    all_labels = {label for other in lists.values() for _, label in _read_json_list(other)}
    if len({type(label) for label in all_labels}) > 1:
        raise DataError(f"{root}: the {JSON_LISTS}'s lists mix integer labels and class names")
    classes = sorted(all_labels)  # numbered in this order in every split, as VPT's JSONDataset does
    number = {label: i for i, label in enumerate(classes)}
    first = entries[0][0]
    images = next((root / name for name in _JSON_IMAGE_FOLDERS if (root / name / first).is_file()), None)
    if images is None:
        raise DataError(f"{file}: its first image {first!r} is not in {root}, {root}/images or {root}/Images")
    items = tuple((image_path(images, f"{file}, entry {n}", path), number[label])
                  for n, (path, label) in enumerate(entries, 1))
    return ImageList(root, split, items, tuple(str(label) for label in classes), source=file)


def _read_json_list(file: Path) -> list[tuple[str, int | str]]:
    """The (image path, label) entries of an FGVC annotation file."""
    try:
        data = json.loads(read_text(file))
    except json.JSONDecodeError as error:
        raise DataError(f"{file}:{error.lineno}: not JSON ({error.msg})") from error
    if isinstance(data, list) and all(isinstance(entry, dict) and len(entry) == 1 for entry in data):
        entries = [pair for entry in data for pair in entry.items()]
    elif isinstance(data, dict):
        entries = list(data.items())
    else:
        raise DataError(f'{file}: expected {{"<image path>": <label>, ...}} or a list of such one-key objects')
    for n, (path, label) in enumerate(entries, 1):
        if type(label) not in (int, str):  # type(): a JSON true is a bool, not a class
            raise DataError(f"{file}, entry {n}: label {label!r} of {path!r} is neither an integer nor a class name")
    return entries
