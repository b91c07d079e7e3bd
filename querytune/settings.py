"""The settings of a run and of a bench, declared once with :func:`~querytune.options.option`.

Two objects, resolved once by the command line (or built by a Python caller) and handed down whole:

- :class:`RunSpec`, **what the run is**: method and its options, backbone, data, splits, recipe,
  input size and normalisation. Part of what config.json records.
- :class:`Runtime`, **where it runs**: device, image-loading workers, feature cache, compile mode,
  progress bars. How a run computes, never what it computes: a run may resume under another one.

The training settings (:class:`querytune.train.TrainConfig`) and the bench's own
(:class:`BenchSpec`) are declared the same way; the command line's flags, their help and their
checks are generated from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.splits import TEST
from .options import ImageSize, check_fields, image_size_setting, option
from .runlog import LOGGERS
from .trunk.device import COMPILE_MODES, resolve_device, resolve_workers
from .trunk.precision import PRECISIONS
from .trunk.sources import PLACEMENTS


@dataclass
class ModelSpec:
    """The backbone and how images reach it: shared by a run and a bench."""

    backbone: str | None = option(None, "HF model folder, timm checkpoint, .npz, hub name", short="-b")
    image_size: int | str = option(224, "input size, images are resized to it: N (square) or HxW (height x "
                                        "width, e.g. 224x320)", min=1, parse=image_size_setting)
    mean: list[float] | None = option(None, "input normalisation mean 'R,G,B' (needed where the backbone's is "
                                            "unknown; default: the backbone's)")
    std: list[float] | None = option(None, "input normalisation std 'R,G,B'")
    recipe: str | None = option(None, "take the method's per-task settings from this recipe (vtab1k: the official "
                                      "VQT and SynQT settings; vtab1k-mini: the same read for vtab1k-mini's tasks); "
                                      "flags override")

    @property
    def image_hw(self) -> ImageSize:
        """``image_size`` as (height, width)."""
        return ImageSize.of(self.image_size)


@dataclass
class RunSpec(ModelSpec):
    """What a run is. ``options`` holds the method's own options (checked by the method's ``Options``);
    ``backbone_model`` lets a Python caller pass a loaded :class:`VisionTransformer` instead of ``backbone``."""

    method: str | None = option(None, "the method (see `querytune methods`)", short="-m")
    model_name: str | None = option(None, "the timm architecture of a bare timm checkpoint (e.g. "
                                          "vit_base_patch16_224), whose head count its weights do not tell")
    data: str | None = option(None, "task folder (VTAB-1k lists, CSV lists, FGVC JSON, class folders or a "
                                    "datasets save_to_disk folder)", short="-d")
    train_split: str | None = option(None, "split to train on (default train800val200 where the task has it, "
                                           "else train)")
    eval_split: str | None = option(TEST, "split to report accuracy on ('' for none)")
    eval_every: int | None = option(None, "log the accuracy on --val-split every N epochs (and after the last)",
                                    min=1)
    val_split: str | None = option(None, "held-out split for --eval-every (default val200 when training on "
                                         "train800)")
    log: list[str] = option([], "also log each epoch to: csv (RUN/log.csv) | tensorboard (RUN/tensorboard/)",
                            choices=LOGGERS)
    task_name: str | None = option(None, "the task's name in the recipe (default: the data folder's)")
    options: dict[str, Any] = field(default_factory=dict)
    backbone_model: Any = None  # a loaded VisionTransformer, for Python callers

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Runtime:
    """Where and how a run computes. ``cache`` None runs the frozen trunk live every epoch."""

    device: str | None = option(None, "cpu | cuda | cuda:N (default: cuda when present)")
    workers: int | None = option(None, "image-loading processes (default: from the CPU count)", min=0)
    cache: str | None = option(None, "feature-cache folder (default: $QUERYTUNE_CACHE or "
                                     "~/.cache/querytune/features; bench: a private one under OUT; eval: none, "
                                     "the trunk runs live)")
    cache_splits: list[str] | None = option(None, "splits whose features are cached (default: those read more "
                                                  "than once: the training split, and the validation split of "
                                                  "--eval-every); the others, such as the test split, which is "
                                                  "read once, run the trunk live")
    cache_placement: str = option("auto", "on a GPU, where cached features live: device (GPU memory), host "
                                          "(streamed from disk) or auto (device when they fit)", choices=PLACEMENTS)
    compile: str = option("off", "torch.compile the training step: off, default, reduce-overhead (CUDA graphs) "
                                 "or max-autotune; single runs only", choices=COMPILE_MODES)
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def num_workers(self) -> int:
        return resolve_workers(self.workers)

    @property
    def cache_dir(self) -> Path | None:
        return Path(self.cache) if self.cache is not None else None


@dataclass
class BenchSpec(ModelSpec):
    """What a bench is: methods x tasks x seeds of one suite (:mod:`querytune.bench`)."""

    suite: str | None = option(None, "folder of VTAB-1k layout task folders, or one task folder")
    methods: list[str] = option(["linear", "vqt"], "the methods, comma-separated")
    out: str | None = option(None, "report folder (resumed if it holds this bench)", short="-o")
    profile: str = option("quick", "quick (capped epochs) | paper (published protocols)", choices=("quick", "paper"))
    seeds: int = option(1, "seeds per (task, method)", min=1)
    search: bool = option(False, "choose lr and weight decay on train800 -> val200 first")
    groups: str | None = option(None, "task groups: a '<task> <group>' file or 'task=group,...' (default: "
                                      "SUITE/groups.txt, then TASK/group.txt)")
    tasks: list[str] | None = option(None, "train only these tasks of the suite now (a bench split over processes "
                                           "sharing --out and --cache; run it again without --tasks for the whole "
                                           "report)")
    precision: str = option("auto", "the trunk's and the training steps' precision: auto (bf16 where the device "
                                    "computes it natively, else fp32) | fp32 | bf16 | fp16",
                            choices=PRECISIONS)
    min_steps: int | None = option(None, "the fewest optimiser steps of every run (default: each protocol's floor, "
                                         "in the quick profile its capped epochs' steps on 800 images; 0: none)", min=0)

    def __post_init__(self) -> None:
        check_fields(self)
