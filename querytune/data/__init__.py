"""Image tasks on disk: five folder layouts, images, the VTAB-1k transform.

A task folder holds its splits in one of five layouts, detected in this order:

1. Hugging Face ``datasets`` folder, written by ``save_to_disk`` (``dataset_dict.json`` and a
   folder per split, or one dataset, the split ``all``): an image column and a label column
   (its ``ClassLabel`` names the classes). Reading it needs the ``datasets`` extra.
2. JSON annotations, the FGVC layout of VPT and NOAH: ``<split>.json`` holding
   ``{"<relative image path>": label, ...}`` (or a list of such one-key objects), images
   under the folder itself, ``images/`` or ``Images/``. Labels (integers or names) are
   numbered in sorted order over all the splits.
3. VTAB-1k task folder: ``<split>.txt`` lists, one ``<relative image path> <int label>``
   per line, and an optional ``classes.txt`` (line i names label i).
4. CSV lists: ``<split>.csv`` with a header naming a ``path`` (or ``image``/``filename``)
   column and a ``label`` column; labels are integers or class names.
5. Class folders: ``<split>/<class name>/<image>`` (e.g. ``train/`` and ``test/``, or
   ``train/`` ``val/`` ``test/``), or ``<class name>/<image>`` directly in the task folder,
   which is then the split ``all``.

Training defaults to the split ``train800val200`` (VTAB-1k), else ``train``
(:func:`default_train_split`).

Problems with the folder, a list or an image raise :class:`DataError` naming the file
(and the line, for lists).

Modules: :mod:`.folder` (the layout and splits of a task folder, :func:`open_split`), one per
layout (:mod:`.hf_datasets`, :mod:`.fgvc_json`, :mod:`.lists` for VTAB-1k and CSV lists,
:mod:`.class_folders`), :mod:`.core` (:class:`ImageList`, images, :class:`Preprocess`), and
:mod:`.splits` (VTAB-1k's split names: what the final runs and a search train and evaluate on).
"""

from __future__ import annotations

from .core import (
    IMAGE_SUFFIXES,
    ImageDataset,
    ImageList,
    Preprocess,
    check_normalisation,
    iterate_loader,
    load_image,
    private_generator,
)
from .folder import check_outside_task, default_train_split, list_splits, open_split

__all__ = ["IMAGE_SUFFIXES", "ImageDataset", "ImageList", "Preprocess", "check_normalisation", "check_outside_task",
           "default_train_split", "iterate_loader", "list_splits", "load_image", "open_split", "private_generator"]
