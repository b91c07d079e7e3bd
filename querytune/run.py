"""Training and evaluation runs: what ``querytune train`` and ``querytune eval`` do, from the
command line's settings (a :class:`~querytune.settings.RunSpec` and a
:class:`~querytune.settings.Runtime`) to finished run folders (:mod:`querytune.runfolder`).

One path serves a lone run and a stack of runs (a grid's members, a task's seeds:
:mod:`querytune.grid`): :func:`train_runs` checks the inputs once (:func:`prepare_run`), builds each
run's method, trains them together (:func:`querytune.train.fit`) and finishes each run folder.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .backbones import check_input_size, load_backbone
from .backbones.vit import VisionTransformer
from .data import ImageList, Preprocess, check_normalisation, check_outside_task, default_train_split, open_split
from .data.splits import SEARCH_TRAIN, SEARCH_VAL, TEST, WHOLE_SPLIT
from .errors import CheckpointError, ConfigError, QuerytuneError
from .methods import build_method, method_class, options_dict
from .methods.base import Method
from .options import ImageSize
from .progress import note
from .recipes import recipe_options
from .runfolder import (
    check_run_folder,
    discard_run_folder,
    finish_run_folder,
    load_adapter,
    lock_run_folder,
    read_metrics,
    read_run_config,
    save_adapter,
    start_run_folder,
)
from .runlog import EpochLog, check_loggers
from .settings import ModelSpec, RunSpec, Runtime
from .train import FitResult, Member, TrainConfig, evaluate, fit, random_stream, rng_state, seed_everything
from .trunk import TrunkInput
from .trunk.cache import CacheKey, backbone_fingerprint
from .trunk.precision import Precision, resolve_precision
from .trunk.sources import BatchSource, check_augment, make_source
from .version import __version__

# What the runs of a stack may differ in; everything else of their training settings is shared. A run's
# settings may also hold "options": method options over the spec's, of those the method searches
# (``Method.search_options``), which its stacked members may differ in.
MEMBER_SETTINGS = ("lr", "weight_decay", "seed", "data_seed")
OPTIONS = "options"


def _source_string(spec: RunSpec, backbone: VisionTransformer) -> str:
    """How config.json names the backbone: a resolved local path, a hub name, or (for an
    in-memory model, which must then be passed again at eval time) its name."""
    if spec.backbone_model is not None:
        return backbone.config.name
    source = str(spec.backbone)
    return str(Path(source).resolve()) if Path(source).exists() else source


@dataclass
class RunSetup:
    """What every run of one method on one task shares (a lone run's, or a stack's): the checked
    inputs, the loaded backbone and the preprocessing. :meth:`build` makes a run's method and config."""

    spec: RunSpec
    runtime: Runtime
    device: torch.device
    workers: int
    method_cls: type[Method]
    options: dict[str, Any]  # the recipe's for the task, then the spec's
    recipe_settings: dict[str, Any]
    task: str
    backbone: VisionTransformer
    fingerprint: str
    preprocess: Preprocess
    train_images: ImageList
    eval_images: ImageList | None
    val_images: ImageList | None
    eval_every: int | None

    def build(self, cfg: TrainConfig, options: dict[str, Any]) -> tuple[Method, dict[str, Any]]:
        """The run's method with its own ``options`` over the setup's, built from ``cfg.seed``'s random
        stream, and its config.json."""
        seed_everything(cfg.seed)
        method = build_method(self.method_cls.name, self.backbone, self.train_images.num_classes,
                              {**self.options, **options})
        if cfg.checkpointing and method.reads.frozen:
            raise ConfigError(f"--checkpointing: method {method.name!r} does not backpropagate through the trunk")
        spec = self.spec
        config = {
            "querytune_version": __version__,
            "method": method.name,
            "options": options_dict(method),
            "backbone": {
                "source": _source_string(spec, self.backbone),
                "name": self.backbone.config.name,
                "model_name": spec.model_name,
                "fingerprint": self.fingerprint,
            },
            "data": str(Path(required(spec)[1]).resolve()),
            "task": self.task,
            "recipe": {"name": spec.recipe, "settings": self.recipe_settings} if spec.recipe else None,
            "train_split": self.train_images.split,
            "num_classes": self.train_images.num_classes,
            "classes": list(self.train_images.classes) if self.train_images.classes else None,
            "image_size": spec.image_hw.recorded,
            "input_size": input_size_line(spec.image_hw, self.backbone.config.image_size),
            "normalisation": {"mean": list(self.preprocess.mean), "std": list(self.preprocess.std)},
            "train": asdict(cfg),
            "schedule": cfg.schedule_record(len(self.train_images)),
            "val_split": self.val_images.split if self.val_images is not None else None,
            "eval_every": self.eval_every,
            "log": list(spec.log),
        }
        return method, config

    def source(self, reads: TrunkInput, images: ImageList, precision: Precision, augment: bool = False
               ) -> BatchSource:
        """The batches of ``images``, read from the feature cache where the runtime caches their split
        (:func:`cached_splits`: by default the splits read more than once, the training split and the
        validation split of ``eval_every``; the evaluation split, read once, runs the trunk live)."""
        read_again = [self.train_images.split] + ([self.val_images.split] if self.val_images is not None else [])
        cached = images.split in cached_splits(self.runtime.cache_splits, read_again)
        cache_dir = self.runtime.cache_dir if cached else None
        return make_source(reads, CacheKey(self.backbone, images, self.preprocess, precision=precision), self.device,
                           cache_dir, self.workers, self.runtime.progress, self.runtime.cache_placement, augment)

    def epoch_log(self, run: Path, method: Method, cfg: TrainConfig) -> EpochLog:
        """The run's per-epoch log, validating ``method`` on the held-out split where one is asked for."""
        validate = None
        if self.val_images is not None:
            val_source = self.source(method.reads, self.val_images, cfg.resolved_precision)
            validate = partial(evaluate_one, method, val_source, self.device, precision=cfg.resolved_precision)
        return EpochLog(run, self.spec.log, validate, self.eval_every or 1, cfg.epochs)

    def metrics(self, method: Method, cfg: TrainConfig, result: FitResult, extra_metrics: dict[str, Any],
                accuracy: float | None, source: BatchSource, resuming: bool) -> dict[str, Any]:
        """A finished run's metrics.json."""
        metrics: dict[str, Any] = {
            "method": method.name,
            "task": self.task,
            "backbone": self.backbone.config.name,
            "train_split": self.train_images.split,
            "eval_split": self.spec.eval_split or None,
            "epochs": cfg.epochs,
            "trainable_params": method.num_trainable_params(),
            "train_seconds": result.train_seconds,
            "train_loss": result.final_loss,
            "train_accuracy": result.train_accuracy,
            "resumed": resuming,
            **extra_metrics,
            "device": str(self.device),
            "feature_placement": getattr(source, "placement", None),
            "compile": self.runtime.compile,
            "processes": distributed.world_size(),
            "host": platform.node(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if accuracy is not None:
            metrics[f"{self.spec.eval_split}_accuracy"] = accuracy
        return metrics


def prepare_run(spec: RunSpec, runtime: Runtime, device: torch.device) -> RunSetup:
    """Check the inputs of a run and load what it reads (see :func:`train_runs`)."""
    method_name, data, backbone_source = required(spec)
    method_cls = method_class(method_name)
    train_images = open_split(data, spec.train_split or default_train_split(data))
    task = spec.task_name or train_images.task
    recipe_settings = recipe_options(spec.recipe, method_cls.name, task) if spec.recipe else {}
    eval_images = open_split(data, spec.eval_split) if spec.eval_split else None
    val_images, eval_every = validation_split(data, train_images, spec.val_split, spec.eval_every)
    check_loggers(spec.log)
    if runtime.cache_splits is not None:
        run_splits = {images.split for images in (train_images, eval_images, val_images) if images is not None}
        unknown = sorted(set(runtime.cache_splits) - run_splits)
        if unknown:
            raise ConfigError(f"--cache-splits {unknown[0]!r}: not a split of this run "
                              f"({', '.join(sorted(run_splits))})")
    backbone = load_backbone(backbone_source, model_name=spec.model_name)
    fingerprint = backbone_fingerprint(backbone)  # of the checkpoint as loaded, before a method adds adapters
    if spec.mean is not None or spec.std is not None:
        backbone.config.mean, backbone.config.std = check_normalisation(spec.mean, spec.std)
    check_input_size(backbone, spec.image_hw)
    backbone.set_input_size(*spec.image_hw)
    return RunSetup(spec, runtime, device, runtime.num_workers, method_cls, {**recipe_settings, **spec.options},
                    recipe_settings, task, backbone, fingerprint, Preprocess.for_backbone(backbone, spec.image_hw),
                    train_images, eval_images, val_images, eval_every)


def input_size_line(size: ImageSize, native: int) -> str:
    """The input size a run uses and where it came from, as its first line and config.json say it."""
    given = "its default" if size == ImageSize.of(ModelSpec.image_size) else "given"
    return f"{size} px (--image-size, {given}; the backbone's native {native}x{native})"


def required(spec: RunSpec) -> tuple[str, str, str | VisionTransformer]:
    """The spec's method, data folder and backbone (its source, or the loaded model); one line naming
    each that is missing."""
    backbone = spec.backbone if spec.backbone_model is None else spec.backbone_model
    missing = [flag for flag, value in (("--method", spec.method), ("--backbone", backbone), ("--data", spec.data))
               if value is None]
    if missing or spec.method is None or spec.data is None or backbone is None:
        raise ConfigError(f"missing {', '.join(missing)}")
    return spec.method, spec.data, backbone


def train_run(spec: RunSpec, out: str | Path, train: dict[str, Any] | None = None,
              runtime: Runtime | None = None) -> dict[str, Any]:
    """Train ``spec``'s method on its task, save the adapter in the run folder ``out``, evaluate, and
    return the metrics. ``train``: the training settings given (:class:`~querytune.train.TrainConfig`
    fields), over the method's protocol. See :func:`train_runs`."""
    return train_runs(spec, {Path(out): train or {}}, runtime)[0]


@dataclass
class StackRun:
    """A run of :func:`train_runs`: its folder, its config.json and its state in :func:`fit`."""

    folder: Path
    config: dict[str, Any]
    member: Member
    state: str = "new"  # of the folder, as check_run_folder says
    created: bool | None = None  # whether this invocation made the folder (rank 0 of a new run only)
    finished: bool = False


def train_runs(spec: RunSpec, runs: dict[Path, dict[str, Any]], runtime: Runtime | None = None) -> list[dict[str, Any]]:
    """Train the runs ``runs`` (run folder -> its training settings) of ``spec`` together and return their
    metrics, in order. Several runs form a stack: they must use a frozen-trunk method and may differ only
    in :data:`MEMBER_SETTINGS` and must share the epochs' order; each is still an ordinary run folder,
    equal to its settings trained alone. Finished runs are read back; unfinished ones resume.

    With ``spec.recipe`` (:mod:`querytune.recipes`) the method takes the recipe's settings for the task
    (``spec.task_name``, else the data folder's name) as its options; ``spec.options`` override them.
    ``spec.mean``/``spec.std`` set the input normalisation (required where the backbone's is unknown);
    config.json records the one used, and evaluation and serving use it. ``runtime.cache_splits`` names
    the splits whose features are cached under ``runtime.cache`` (default: those read more than once,
    the training split and the validation split; :func:`cached_splits`); the others run the frozen
    trunk live.
    ``runtime.compile`` runs a lone run's training forward through ``torch.compile``; it is how the
    run computes, not what it computes, so a run may resume under another runtime.

    ``spec.train_split`` defaults to ``train800val200`` where the task has it, else ``train``. With
    ``{"augment": True}`` the training images are cropped and flipped at random (methods that run the
    trunk live: those that adapt it, or frozen ones with no cache).

    With ``spec.eval_every`` (or ``spec.val_split``) the accuracy on the validation split (default
    ``val200`` when training on ``train800``; it must share no image with the training split) is
    logged every ``eval_every`` epochs (default 1) and after the last. ``log.jsonl`` and ``curves.png``
    are always written; ``spec.log`` adds ``csv`` and/or ``tensorboard`` (:mod:`querytune.runlog`).

    Every input is checked, and the features cached, before a run is started in its folder; a user error
    (:class:`QuerytuneError`) found later in a new run (an image that does not decode, met on the fly)
    removes its run folder again. Each run folder is locked meanwhile: another process training in it
    is refused (:func:`~querytune.runfolder.lock_run_folder`). Under torchrun the processes train a lone
    run data-parallel (:mod:`querytune.distributed`) and only rank 0 writes (and locks) the run folder.
    """
    method_cls = method_class(required(spec)[0])
    runtime = runtime or Runtime()
    device = distributed.init_from_env(runtime.torch_device)
    configs = [TrainConfig.for_method(method_cls, {k: v for k, v in own.items() if k != OPTIONS})
               for own in runs.values()]
    run_options = [own.get(OPTIONS, {}) for own in runs.values()]
    resolved = [resolve_precision(cfg.precision, device) for cfg in configs]
    configs = [replace(cfg, precision=precision.value) for cfg, (precision, _) in zip(configs, resolved)]
    precision, why = resolved[0]  # a stack's runs share it (check_stack)
    if len(configs) > 1:
        check_stack(method_cls, configs, runtime, run_options)
    check_augment(configs[0].augment, method_cls.reads, runtime.cache_dir)
    distributed.local_batch_size(configs[0].batch_size)
    setup = prepare_run(spec, runtime, device)
    configs = [cfg.floored(len(setup.train_images)) for cfg in configs]  # alike for every run of the stack
    for folder in runs:
        check_outside_task(required(spec)[1], folder, "--out")
    note(f"input {input_size_line(spec.image_hw, setup.backbone.config.image_size)}", runtime.progress)
    if why != "as given":
        note(f"precision {precision} ({why})", runtime.progress)
    stack = []
    with ExitStack() as locks:  # on rank 0, which writes the folders
        for folder, cfg, options in zip(runs, configs, run_options):
            if distributed.is_main():
                locks.enter_context(lock_run_folder(Path(folder)))
            method, config = setup.build(cfg, options)
            member = Member(cfg, method, Path(folder) / "checkpoint.pt", stream=rng_state(device))
            stack.append(StackRun(Path(folder), config, member, check_run_folder(Path(folder), config)))
        # a finished run is the very same run, done already (a retried job, a rerun cell): its results
        metrics = {run.folder: read_metrics(run.folder) for run in stack if run.state == "finished"}
        training = [run for run in stack if run.state != "finished"]
        if training:
            metrics.update(train_stack(setup, training))
    return [metrics[run.folder] for run in stack]


def check_stack(method_cls: type[Method], configs: list[TrainConfig], runtime: Runtime,
                run_options: list[dict[str, Any]]) -> None:
    """Runs trained as a stack share a frozen trunk, one process, and every setting but
    :data:`MEMBER_SETTINGS` and the options the method searches, and the epochs' order."""
    if distributed.world_size() > 1:
        raise ConfigError("a grid or several seeds train in one process (not under torchrun)")
    if runtime.compile != "off":
        raise ConfigError(f"--compile {runtime.compile}: --compile applies to single runs, not to a grid or "
                          "several seeds")
    if not method_cls.reads.frozen:
        raise ConfigError(f"method {method_cls.name!r} adapts the trunk, so its runs cannot share one: a grid or "
                          "several seeds need a frozen-trunk method")
    first = {k: v for k, v in vars(configs[0]).items() if k not in MEMBER_SETTINGS}
    for cfg in configs[1:]:
        differing = [k for k, v in vars(cfg).items() if k not in MEMBER_SETTINGS and first[k] != v]
        if differing:
            raise ConfigError(f"members of a grid may differ only in {', '.join(MEMBER_SETTINGS)} "
                              f"(not {', '.join(differing)})")
    unsearched = sorted({name for options in run_options for name in options} - set(method_cls.search_options))
    if unsearched:
        raise ConfigError(f"members of a grid may differ only in the options {method_cls.name!r} searches "
                          f"({', '.join(method_cls.search_options) or 'none'}; not {', '.join(unsearched)})")
    orders = {cfg.order_seed for cfg in configs}
    if len(orders) > 1:
        raise ConfigError(f"members of a grid share one epoch order (data seeds {sorted(orders)} differ)")


def train_stack(setup: RunSetup, stack: list[StackRun]) -> dict[Path, dict[str, Any]]:
    """Train the unfinished runs ``stack`` together and finish each run folder; their metrics."""
    cfg = stack[0].member.cfg
    source = setup.source(setup.method_cls.reads, setup.train_images, cfg.resolved_precision, cfg.augment)
    eval_source = (setup.source(setup.method_cls.reads, setup.eval_images, cfg.resolved_precision)
                   if setup.eval_images is not None else None)
    for run in stack:
        run.member.log = setup.epoch_log(run.folder, run.member.method, run.member.cfg)
    distributed.barrier()  # every rank has looked at the folders before rank 0 changes them
    for run in stack:
        if distributed.is_main() and run.state == "new":
            run.created = start_run_folder(run.folder, run.config)
    distributed.barrier()  # the folders are ready before any rank looks for a checkpoint in them
    try:
        results = fit([run.member for run in stack], source, setup.device, setup.runtime.progress,
                      setup.runtime.compile)
        metrics = finish_runs(setup, stack, results, source, eval_source)
    except QuerytuneError:
        for run in stack:
            if run.created is not None and not run.finished:
                discard_run_folder(run.folder, run.created)
        raise
    distributed.barrier()  # every rank leaves once the runs are written (and tears its process group down together)
    return metrics


def finish_runs(setup: RunSetup, stack: list[StackRun], results: list[FitResult], source: BatchSource,
                eval_source: BatchSource | None) -> dict[Path, dict[str, Any]]:
    """After training: post-training (alike on every rank), adapters, the evaluation of every run in one
    pass over the evaluation split, metrics.json; the runs' metrics."""
    device = setup.device
    extra_metrics = []
    for run in stack:
        member = run.member
        with random_stream(member.stream, device):  # head compression draws dropout masks
            extra_metrics.append(member.method.post_train(source, member.cfg, device))
        if distributed.is_main():
            save_adapter(run.folder, member.method)
    cfg = stack[0].member.cfg  # the precision, shared
    accuracies: list[float | None] = [None] * len(stack)
    if eval_source is not None:
        accuracies = [*evaluate([run.member.method for run in stack], eval_source, device,
                                precision=cfg.resolved_precision)]
    metrics = {}
    for run, result, extra, accuracy in zip(stack, results, extra_metrics, accuracies):
        metrics[run.folder] = setup.metrics(run.member.method, run.member.cfg, result, extra, accuracy, source,
                                            run.state == "unfinished")
        if distributed.is_main():
            finish_run_folder(run.folder, metrics[run.folder])
        run.finished = True
    return metrics


def cached_splits(given: Sequence[str] | None, read_again: Sequence[str]) -> list[str]:
    """The splits whose features are read from the feature cache: those ``given`` (``--cache-splits``),
    by default those read more than once (``read_again``), each with its parts (VTAB-1k's
    train800val200 with train800 and val200: :data:`~querytune.data.splits.WHOLE_SPLIT`), which are
    read from its entry."""
    splits = list(read_again if given is None else given)
    return splits + [part for part, whole in WHOLE_SPLIT.items() if whole in splits and part not in splits]


def entry_splits(cached: Sequence[str]) -> list[str]:
    """The splits of ``cached`` that have feature-cache entries of their own: all but the parts of a
    cached split (read from its entry)."""
    return [split for split in cached if WHOLE_SPLIT.get(split) not in cached]


def validation_split(data: str | Path, train_images: ImageList, val_split: str | None,
                     eval_every: int | None) -> tuple[ImageList | None, int | None]:
    """The held-out split to log the accuracy on during training, and how often (epochs); (None, None)
    when neither is asked for."""
    if eval_every is None and val_split is None:
        return None, None
    if val_split is None:
        if train_images.split != SEARCH_TRAIN:
            raise ConfigError(f"--eval-every: give --val-split, a split held out from {train_images.split!r} "
                              f"({SEARCH_VAL} is the default only when training on {SEARCH_TRAIN})")
        val_split = SEARCH_VAL
    val_images = open_split(data, val_split)
    shared = {path for path, _ in train_images.items} & {path for path, _ in val_images.items}
    if shared:
        raise ConfigError(f"--val-split {val_split}: {len(shared)} of its images are in the training split "
                          f"{train_images.split!r} (e.g. {min(shared)}); choose a held-out split")
    return val_images, eval_every or 1


def load_run(run: str | Path, backbone: VisionTransformer | str | Path | None = None) -> tuple[Method, dict[str, Any]]:
    """Rebuild a finished run's method with its adapter loaded (eval mode), on ``backbone`` (a loaded
    model is used as it is; default: the run's own backbone source)."""
    config = read_run_config(run)
    trained = config["backbone"]
    if not isinstance(backbone, VisionTransformer):
        backbone = load_backbone(backbone if backbone is not None else trained["source"],
                                 model_name=trained.get("model_name") if backbone is None else None)
    if backbone_fingerprint(backbone) != trained["fingerprint"]:
        raise CheckpointError(f"{run}: was trained on backbone {trained['name']!r}, which differs from the one given")
    backbone.config.mean = tuple(config["normalisation"]["mean"])
    backbone.config.std = tuple(config["normalisation"]["std"])
    backbone.set_input_size(*ImageSize.of(config["image_size"], f"{run}: image_size"))
    method = build_method(config["method"], backbone, config["num_classes"], config["options"])
    load_adapter(run, method)
    with method.apart_from_backbone():  # a loaded model is used as it is
        return method.eval(), config


def eval_run(run: str | Path, data: str | Path, split: str = TEST, runtime: Runtime | None = None,
             backbone: str | Path | None = None) -> float:
    """Accuracy of a finished run's adapter on a split (:func:`eval_runs` of one)."""
    return eval_runs([run], data, split, runtime, backbone)[0]


def eval_runs(runs: Sequence[str | Path], data: str | Path, split: str = TEST, runtime: Runtime | None = None,
              backbone: str | Path | None = None) -> list[float]:
    """Accuracy of each finished run on a split of ``data``. The frozen-trunk runs that share a backbone,
    input size, normalisation and precision are evaluated together: the split passes the trunk once
    for all of them; a backbone-adapting run has its own pass. With ``runtime.cache`` the split's
    features are read from (or written to) the feature cache, unless ``runtime.cache_splits`` leaves
    the split out (:func:`cached_splits`). A run is refused on a task whose classes are not those it was
    trained on (by name where both name them, else by count)."""
    runtime = runtime or Runtime()
    device = distributed.init_from_env(runtime.torch_device)
    images = open_split(data, split)
    groups: dict[Any, list[int]] = {}
    for index, run in enumerate(runs):
        config = read_run_config(run)
        if images.num_classes > config["num_classes"]:
            raise CheckpointError(f"{images.source}: has {images.num_classes} classes, but the adapter in {run} "
                                  f"has {config['num_classes']} classes")
        if images.classes and config.get("classes") and list(images.classes) != config["classes"]:
            raise CheckpointError(f"{run}: was trained on the classes of {config.get('task')!r} "
                                  f"({class_names(config['classes'])}), not those of {images.task!r} "
                                  f"({class_names(images.classes)}); evaluate it on its own task")
        shared = (config["backbone"]["fingerprint"], json.dumps(config["normalisation"]), config["image_size"],
                  config["train"]["precision"])
        groups.setdefault(shared if method_class(config["method"]).reads.frozen else index, []).append(index)
    accuracies = [0.0] * len(runs)
    for indices in groups.values():
        method, config = load_run(runs[indices[0]], backbone)
        methods = [method] + [load_run(runs[i], method.backbone)[0] for i in indices[1:]]
        reads = TrunkInput.LAYERS if any(m.reads.with_layers for m in methods) else method.reads
        precision = Precision(config["train"]["precision"])
        key = CacheKey(method.backbone, images, Preprocess.for_backbone(method.backbone, config["image_size"]),
                       precision=precision)
        cached = split in cached_splits(runtime.cache_splits, [split])
        source = make_source(reads, key, device, runtime.cache_dir if cached else None, runtime.num_workers,
                             runtime.progress, runtime.cache_placement)
        for index, accuracy in zip(indices, evaluate(methods, source, device, precision=precision)):
            accuracies[index] = accuracy
    return accuracies


def class_names(classes: Sequence[str], shown: int = 3) -> str:
    """'banded, blotchy, braided, ... (10)': the first few of a task's classes, and how many."""
    return ", ".join(classes[:shown]) + (f", ... ({len(classes)})" if len(classes) > shown else "")


def evaluate_one(method: Method, source: BatchSource, device: torch.device, **kwargs: Any) -> float:
    return evaluate([method], source, device, **kwargs)[0]
