"""Training and evaluation runs: what ``querytune train`` and ``querytune eval`` do, from the
command line's settings to a finished run folder (:mod:`querytune.runfolder`)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .backbones import load_backbone
from .backbones.vit import VisionTransformer
from .data import ImageList, Preprocess, check_normalisation, default_train_split, open_split
from .errors import CheckpointError, ConfigError, QuerytuneError
from .methods import build_method, options_dict, resolve_method
from .methods.base import Method
from .recipes import recipe_options
from .runfolder import (
    check_run_folder,
    discard_run_folder,
    finish_run_folder,
    load_adapter,
    read_metrics,
    read_run_config,
    save_adapter,
    start_run_folder,
)
from .runlog import EpochLog, check_loggers
from .train import FitResult, TrainConfig, evaluate, fit, seed_everything
from .trunk import TrunkInput
from .trunk.cache import backbone_fingerprint
from .trunk.device import check_compile_mode, resolve_device, resolve_workers
from .trunk.sources import BatchSource, check_augment, check_placement, make_source
from .version import __version__

DEFAULT_IMAGE_SIZE = 224


def _source_string(source: str | Path | VisionTransformer, backbone: VisionTransformer) -> str:
    """How config.json names the backbone: a resolved local path, a hub name, or (for an
    in-memory model, which must then be passed again at eval time) its name."""
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve()) if Path(source).exists() else str(source)
    return backbone.config.name


@dataclass
class RunSetup:
    """What every run of one method on one task shares (train_run's, or a grid's members'): the checked
    inputs, the loaded backbone and the preprocessing. :meth:`build` makes a run's method and config."""

    method_name: str
    options: dict[str, Any]
    backbone_source: str | Path | VisionTransformer
    backbone: VisionTransformer
    fingerprint: str
    data: Path
    task: str
    recipe: str | None
    recipe_settings: dict[str, Any]
    train_images: ImageList
    eval_images: ImageList | None
    train_split: str
    eval_split: str | None
    image_size: int
    preprocess: Preprocess
    device: torch.device
    val_images: ImageList | None = None
    eval_every: int | None = None
    loggers: tuple[str, ...] = ()
    cache_splits: tuple[str, ...] | None = None  # None: every split is cached (where a cache folder is given)

    def build(self, cfg: TrainConfig) -> tuple[Method, dict[str, Any]]:
        """The run's method, built from ``cfg.seed``'s random stream, and its config.json."""
        seed_everything(cfg.seed)
        method = build_method(self.method_name, self.backbone, self.train_images.num_classes, self.options)
        if cfg.checkpointing and method.reads.frozen:
            raise ConfigError(f"--checkpointing: method {method.name!r} does not backpropagate through the trunk")
        config = {
            "querytune_version": __version__,
            "method": method.name,
            "options": options_dict(method),
            "backbone": {
                "source": _source_string(self.backbone_source, self.backbone),
                "name": self.backbone.config.name,
                "fingerprint": self.fingerprint,
            },
            "data": str(self.data.resolve()),
            "task": self.task,
            "recipe": {"name": self.recipe, "settings": self.recipe_settings} if self.recipe else None,
            "train_split": self.train_split,
            "num_classes": self.train_images.num_classes,
            "classes": list(self.train_images.classes) if self.train_images.classes else None,
            "image_size": self.image_size,
            "normalisation": {"mean": list(self.preprocess.mean), "std": list(self.preprocess.std)},
            "train": asdict(cfg),
            "val_split": self.val_images.split if self.val_images is not None else None,
            "eval_every": self.eval_every,
            "log": list(self.loggers),
        }
        return method, config

    def cache_for(self, split: str | None, cache_dir: Path | None) -> Path | None:
        """Where ``split``'s features are cached: None where it runs the trunk live."""
        return cache_dir if self.cache_splits is None or split in self.cache_splits else None

    def sources(self, reads: TrunkInput, cache_dir: Path | None, workers: int, show_progress: bool, bf16: bool,
                cache_placement: str, augment: bool = False) -> tuple[BatchSource, BatchSource | None]:
        """The training split's batches and the evaluation split's (None without one)."""
        def source(images: ImageList, augment: bool = False) -> BatchSource:
            return make_source(reads, self.backbone, images, self.preprocess, self.device,
                               self.cache_for(images.split, cache_dir), workers, show_progress, bf16,
                               cache_placement, augment)

        return (source(self.train_images, augment),
                source(self.eval_images) if self.eval_images is not None else None)

    def epoch_log(self, run: Path, method: Method, cfg: TrainConfig, cache_dir: Path | None, workers: int,
                  show_progress: bool, cache_placement: str) -> EpochLog:
        """The run's per-epoch log, validating ``method`` on the held-out split where one is asked for."""
        validate: Callable[[], float] | None = None
        if self.val_images is not None:
            val_source = make_source(method.reads, self.backbone, self.val_images, self.preprocess, self.device,
                                     self.cache_for(self.val_images.split, cache_dir), workers, show_progress,
                                     cfg.bf16, cache_placement)
            validate = partial(evaluate, method, val_source, self.device, bf16=cfg.bf16, fp16=cfg.fp16)
        return EpochLog(run, self.loggers, validate, self.eval_every or 1, cfg.epochs)

    def metrics(self, method: Method, cfg: TrainConfig, result: FitResult, extra_metrics: dict[str, Any],
                accuracy: float | None, source: BatchSource, resuming: bool,
                compile_mode: str = "off") -> dict[str, Any]:
        """A finished run's metrics.json."""
        metrics: dict[str, Any] = {
            "method": method.name,
            "task": self.task,
            "backbone": self.backbone.config.name,
            "train_split": self.train_split,
            "eval_split": self.eval_split,
            "epochs": cfg.epochs,
            "trainable_params": method.num_trainable_params(),
            "train_seconds": result.train_seconds,
            "train_loss": result.final_loss,
            "train_accuracy": result.train_accuracy,
            "resumed": resuming,
            **extra_metrics,
            "device": str(self.device),
            "feature_placement": getattr(source, "placement", None),
            "compile": compile_mode,
            "processes": distributed.world_size(),
            "host": platform.node(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if accuracy is not None:
            metrics[f"{self.eval_split}_accuracy"] = accuracy
        return metrics


def prepare_run(
    method_name: str,
    backbone_source: str | Path | VisionTransformer,
    data: str | Path,
    options: dict[str, Any] | None,
    train_split: str | None,
    eval_split: str | None,
    image_size: int,
    recipe: str | None,
    task_name: str | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    device: torch.device,
    *,
    eval_every: int | None = None,
    val_split: str | None = None,
    loggers: Sequence[str] = (),
    cache_splits: Sequence[str] | None = None,
) -> RunSetup:
    """Check the inputs of a run and load what it reads (see :func:`train_run`)."""
    train_split = train_split or default_train_split(data)
    train_images = open_split(data, train_split)
    method_cls, _ = resolve_method(method_name, options)
    task = task_name or train_images.task
    recipe_settings = recipe_options(recipe, method_cls.name, task) if recipe else {}
    options = {**recipe_settings, **(options or {})}
    eval_images = open_split(data, eval_split) if eval_split else None
    val_images, eval_every = validation_split(data, train_images, val_split, eval_every)
    check_loggers(loggers)
    if cache_splits is not None:
        run_splits = {split for split in (train_split, eval_split, val_images and val_images.split) if split}
        unknown = sorted(set(cache_splits) - run_splits)
        if unknown:
            raise ConfigError(f"--cache-splits {unknown[0]!r}: not a split of this run "
                              f"({', '.join(sorted(run_splits))})")
    backbone = load_backbone(backbone_source)
    fingerprint = backbone_fingerprint(backbone)  # of the checkpoint as loaded, before a method adds adapters
    if mean is not None or std is not None:
        backbone.config.mean, backbone.config.std = check_normalisation(mean, std)
    patch = backbone.config.patch_size
    if image_size < patch or image_size % patch:
        raise ConfigError(f"--image-size {image_size}: must be a positive multiple of the backbone's patch size "
                          f"{patch}")
    return RunSetup(method_name, options, backbone_source, backbone, fingerprint, Path(data), task, recipe,
                    recipe_settings, train_images, eval_images, train_split, eval_split, image_size,
                    Preprocess.for_backbone(backbone, image_size), device, val_images, eval_every, tuple(loggers),
                    None if cache_splits is None else tuple(cache_splits))


def train_run(
    method_name: str,
    backbone_source: str | Path | VisionTransformer,
    data: str | Path,
    out: str | Path,
    *,
    options: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    train_split: str | None = None,
    eval_split: str | None = "test",
    eval_every: int | None = None,
    val_split: str | None = None,
    loggers: Sequence[str] = (),
    image_size: int = DEFAULT_IMAGE_SIZE,
    recipe: str | None = None,
    task_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    cache_splits: Sequence[str] | None = None,
    cache_placement: str = "auto",
    device: torch.device | str | None = None,
    workers: int | None = None,
    show_progress: bool = True,
    compile_mode: str = "off",
) -> dict[str, Any]:
    """Train a method on a task folder, save the adapter, evaluate, and return the metrics.

    With ``recipe`` (:mod:`querytune.recipes`) the method takes the recipe's settings for the task
    (``task_name``, else the data folder's name) as its options; ``options`` given override them.
    ``mean``/``std`` set the input normalisation (required where the backbone's is unknown); the
    run's config.json records the one used, and evaluation and serving use it. ``cache_splits``
    names the splits whose features are cached under ``cache_dir`` (default: both); the others
    run the frozen trunk live.
    ``compile_mode`` runs the training forward through ``torch.compile`` (:func:`trunk.device.compiled`);
    it is how the run computes, not what it computes, so a run may resume with another mode.

    ``train_split`` defaults to ``train800val200`` where the task has it, else ``train``. With
    ``train_settings={"augment": True}`` the training images are cropped and flipped at random
    (methods that run the trunk live: those that adapt it, or frozen ones with no cache).

    With ``eval_every`` (or ``val_split``) the accuracy on ``val_split`` (default ``val200`` when
    training on ``train800``; it must share no image with the training split) is logged every
    ``eval_every`` epochs (default 1) and after the last. ``log.jsonl`` and ``curves.png`` are
    always written; ``loggers`` adds ``csv`` and/or ``tensorboard`` (:mod:`querytune.runlog`).

    Every input is checked, and the features cached, before the run folder is made; a
    user error (:class:`QuerytuneError`) found later in a new run (an image that does not
    decode, met on the fly) removes the run folder again. Under torchrun the processes
    train data-parallel (:mod:`querytune.distributed`) and only rank 0 writes the run folder.
    """
    out = Path(out)
    device = distributed.init_from_env(resolve_device(device))
    workers = resolve_workers(workers)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    check_placement(cache_placement)
    check_compile_mode(compile_mode)
    method_cls, _ = resolve_method(method_name, options)
    cfg = TrainConfig.for_method(method_cls, train_settings or {})
    check_augment(cfg.augment, method_cls.reads, cache_dir)
    distributed.local_batch_size(cfg.batch_size)
    setup = prepare_run(method_name, backbone_source, data, options, train_split, eval_split, image_size, recipe,
                        task_name, mean, std, device, eval_every=eval_every, val_split=val_split, loggers=loggers,
                        cache_splits=cache_splits)
    method, config = setup.build(cfg)
    state = check_run_folder(out, config)
    if state == "finished":  # the very same run, done already (a retried job, a rerun cell): its results
        return read_metrics(out)
    resuming = state == "unfinished"
    source, eval_source = setup.sources(method.reads, cache_dir, workers, show_progress, cfg.bf16, cache_placement,
                                        cfg.augment)
    log = setup.epoch_log(out, method, cfg, cache_dir, workers, show_progress, cache_placement)
    distributed.barrier()  # every rank has looked at the folder before rank 0 changes it
    created = None  # whether this invocation made the folder (rank 0 of a new run only)
    if distributed.is_main() and not resuming:
        created = start_run_folder(out, config)
    distributed.barrier()  # the folder is ready before any rank looks for a checkpoint in it
    try:
        result = fit(method, source, cfg, device, checkpoint=out / "checkpoint.pt", log=log,
                     show_progress=show_progress, compile_mode=compile_mode)
        extra_metrics = method.post_train(source, cfg, device)  # alike on every rank: nothing to communicate
        if distributed.is_main():
            save_adapter(out, method)
        accuracy = (evaluate(method, eval_source, device, bf16=cfg.bf16, fp16=cfg.fp16)
                    if eval_source is not None else None)
    except QuerytuneError:
        if created is not None:
            discard_run_folder(out, created)
        raise

    metrics = setup.metrics(method, cfg, result, extra_metrics, accuracy, source, resuming, compile_mode)
    if distributed.is_main():
        finish_run_folder(out, metrics)
    distributed.barrier()  # every rank leaves once the run is written (and tears its process group down together)
    return metrics


def validation_split(data: str | Path, train_images: ImageList, val_split: str | None,
                     eval_every: int | None) -> tuple[ImageList | None, int | None]:
    """The held-out split to log the accuracy on during training, and how often (epochs); (None, None)
    when neither is asked for."""
    if eval_every is None and val_split is None:
        return None, None
    if eval_every is not None and eval_every < 1:
        raise ConfigError(f"--eval-every must be at least 1 (got {eval_every})")
    if val_split is None:
        if train_images.split != "train800":
            raise ConfigError(f"--eval-every: give --val-split, a split held out from {train_images.split!r} "
                              "(val200 is the default only when training on train800)")
        val_split = "val200"
    val_images = open_split(data, val_split)
    shared = {path for path, _ in train_images.items} & {path for path, _ in val_images.items}
    if shared:
        raise ConfigError(f"--val-split {val_split}: {len(shared)} of its images are in the training split "
                          f"{train_images.split!r} (e.g. {min(shared)}); choose a held-out split")
    return val_images, eval_every or 1


def load_run(run: str | Path, backbone: VisionTransformer | str | Path | None = None) -> tuple[Method, dict[str, Any]]:
    """Rebuild a finished run's method with its adapter loaded (eval mode)."""
    config = read_run_config(run)
    trained = config["backbone"]
    backbone = load_backbone(backbone if backbone is not None else trained["source"])
    if backbone_fingerprint(backbone) != trained["fingerprint"]:
        raise CheckpointError(f"{run}: was trained on backbone {trained['name']!r}, which differs from the one given")
    if "normalisation" in config:  # the run's own (runs from before it was recorded: the backbone's)
        backbone.config.mean = tuple(config["normalisation"]["mean"])
        backbone.config.std = tuple(config["normalisation"]["std"])
    method = build_method(config["method"], backbone, config["num_classes"], config["options"])
    load_adapter(run, method)
    return method.eval(), config


def eval_run(
    run: str | Path,
    data: str | Path,
    split: str = "test",
    *,
    backbone: str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache_placement: str = "auto",
    device: torch.device | str | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> float:
    """Accuracy of a finished run's adapter on a split."""
    check_placement(cache_placement)
    device = distributed.init_from_env(resolve_device(device))
    method, config = load_run(run, backbone)
    images = open_split(data, split)
    if images.num_classes > config["num_classes"]:
        raise CheckpointError(
            f"{images.source}: has {images.num_classes} classes, but the adapter in {run} has "
            f"{config['num_classes']} classes"
        )
    preprocess = Preprocess.for_backbone(method.backbone, config["image_size"])
    workers = resolve_workers(workers)
    bf16 = config["train"]["bf16"]
    source = make_source(method.reads, method.backbone, images, preprocess, device,
                         Path(cache_dir) if cache_dir else None, workers, show_progress, bf16, cache_placement)
    return evaluate(method, source, device, bf16=bf16, fp16=config["train"].get("fp16", False))
