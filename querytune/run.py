"""Training and evaluation runs: what ``querytune train`` and ``querytune eval`` do.

A run folder holds:

    config.json          everything needed to rebuild the method (written first)
    checkpoint.pt        resumable state while training (removed once finished)
    log.jsonl            one line per epoch
    adapter.safetensors  the trainable state, written when training ends
    metrics.json         the results, written last: its presence marks the run finished
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__, distributed
from .backbones import load_backbone
from .backbones.vit import VisionTransformer
from .cache import backbone_fingerprint, open_or_build_cache
from .data import ImageList, Preprocess, open_split
from .errors import CheckpointError, ConfigError, QuerytuneError, one_line
from .files import remove_stale_temporaries, write_atomic, write_json
from .methods import build_method, method_class, options_dict
from .methods.base import Method
from .progress import note
from .sources import BatchSource, CachedFeatureBatches, ImageBatches, LiveFeatureBatches, check_placement
from .train import TrainConfig, evaluate, fit, seed_everything

DEFAULT_IMAGE_SIZE = 224


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def make_source(
    method: Method,
    images: ImageList,
    preprocess: Preprocess,
    device: torch.device,
    cache_dir: Path | None = None,
    workers: int = 0,
    show_progress: bool = True,
    bf16: bool = False,
    cache_placement: str = "auto",
) -> BatchSource:
    """The input pipeline a method needs: cached or live frozen features, or images.

    ``cache_placement`` (auto | device | host) says where cached features live on a GPU
    (:class:`~querytune.sources.CachedFeatureBatches`); the choice is printed.
    """
    pin_memory = device.type == "cuda"
    if not method.frozen_trunk:
        return ImageBatches(images, preprocess, workers, pin_memory)
    if cache_dir is not None:
        cache = open_or_build_cache(cache_dir, method.backbone, images, preprocess, method.reads_layers, bf16,
                                    device=device, workers=workers, show_progress=show_progress)
        source = CachedFeatureBatches(cache, method.reads_layers, bf16, device, cache_placement)
        if device.type == "cuda":
            where = "loaded into GPU memory" if source.placement == "device" else "streamed from the memory map"
            note(f"cached features of {images.task}/{images.split} "
                 f"({cache.nbytes(method.reads_layers) / 2**30:.2f} GiB): {where} (--cache-placement {cache_placement})",
                 show_progress)
        return source
    return LiveFeatureBatches(ImageBatches(images, preprocess, workers, pin_memory), method.backbone,
                              method.reads_layers, device, bf16)


def _source_string(source: str | Path | VisionTransformer, backbone: VisionTransformer) -> str:
    """How config.json names the backbone: a resolved local path, a hub name, or (for an
    in-memory model, which must then be passed again at eval time) its name."""
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve()) if Path(source).exists() else str(source)
    return backbone.config.name


def _run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of config.json that must match for a run to be resumed."""
    return {k: config[k] for k in ("method", "options", "backbone", "data", "train_split", "image_size", "train")}


def _check_run_folder(out: Path, config: dict[str, Any]) -> bool:
    """True when ``out`` holds an unfinished run of these settings (to resume), False when it is
    absent or empty; an error for anything else. Writes nothing (it only removes what killed
    writers left)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file, not a run folder")
    if out.is_dir():
        remove_stale_temporaries(out)  # e.g. a config.json whose writer was killed
    if (out / "metrics.json").exists():
        raise CheckpointError(f"{out}: already holds a finished run; choose another --out")
    config_path = out / "config.json"
    if config_path.exists():
        try:
            saved = json.loads(config_path.read_text())
            same = _run_settings(saved) == _run_settings(config)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"{config_path}: not a querytune run config ({one_line(error)})") from error
        if not same:
            raise CheckpointError(f"{out}: holds an unfinished run with other settings; choose another --out")
        return True
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists, is not empty and is not a querytune run folder")
    return False


def _start_run_folder(out: Path, config: dict[str, Any]) -> bool:
    """Create the run folder with its config.json; return whether the folder itself was created."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)
    except OSError as error:
        raise CheckpointError(f"{out}: cannot write the run folder ({error.strerror or one_line(error)})") from error
    return created


def _discard_run_folder(out: Path, created: bool) -> None:
    """Undo :func:`_start_run_folder` and what followed: the folder was absent or empty before."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def train_run(
    method_name: str,
    backbone_source: str | Path | VisionTransformer,
    data: str | Path,
    out: str | Path,
    *,
    options: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    train_split: str = "train800val200",
    eval_split: str | None = "test",
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: str | Path | None = None,
    cache_placement: str = "auto",
    device: torch.device | str | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a method on a task folder, save the adapter, evaluate, and return the metrics.

    Every input is checked, and the features cached, before the run folder is made; a
    user error (:class:`QuerytuneError`) found later in a new run (an image that does not
    decode, met on the fly) removes the run folder again. Under torchrun the processes
    train data-parallel (:mod:`querytune.distributed`) and only rank 0 writes the run folder.
    """
    out = Path(out)
    device = distributed.init_from_env(torch.device(device) if device is not None else default_device())
    workers = default_workers() if workers is None else workers
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    check_placement(cache_placement)
    method_cls = method_class(method_name)
    cfg = TrainConfig.for_method(method_cls, train_settings or {})
    distributed.local_batch_size(cfg.batch_size)
    train_images = open_split(data, train_split)
    eval_images = open_split(data, eval_split) if eval_split else None
    backbone = load_backbone(backbone_source)
    preprocess = Preprocess(image_size, backbone.config.mean, backbone.config.std)

    fingerprint = backbone_fingerprint(backbone)  # of the pretrained weights, before a method adds adapters
    seed_everything(cfg.seed)
    method = build_method(method_name, backbone, train_images.num_classes, options)
    if cfg.checkpointing and method.frozen_trunk:
        raise ConfigError(f"--checkpointing: method {method_name!r} does not backpropagate through the trunk")
    config = {
        "querytune_version": __version__,
        "method": method_name,
        "options": options_dict(method),
        "backbone": {
            "source": _source_string(backbone_source, backbone),
            "name": backbone.config.name,
            "fingerprint": fingerprint,
        },
        "data": str(Path(data).resolve()),
        "task": train_images.task,
        "train_split": train_split,
        "num_classes": train_images.num_classes,
        "classes": list(train_images.classes) if train_images.classes else None,
        "image_size": image_size,
        "train": asdict(cfg),
    }
    resuming = _check_run_folder(out, config)
    source = make_source(method, train_images, preprocess, device, cache_dir, workers, show_progress, cfg.bf16,
                         cache_placement)
    eval_source = None
    if eval_images is not None:
        eval_source = make_source(method, eval_images, preprocess, device, cache_dir, workers, show_progress,
                                  cfg.bf16, cache_placement)
    distributed.barrier()  # every rank has looked at the folder before rank 0 changes it
    created = None  # whether this invocation made the folder (rank 0 of a new run only)
    if distributed.is_main() and not resuming:
        created = _start_run_folder(out, config)
    distributed.barrier()  # the folder is ready before any rank looks for a checkpoint in it
    try:
        result = fit(method, source, cfg, device, checkpoint=out / "checkpoint.pt", log=out / "log.jsonl",
                     show_progress=show_progress)
        extra_metrics = method.post_train(source, cfg, device)  # alike on every rank: nothing to communicate
        if distributed.is_main():
            state = {k: v.contiguous().cpu() for k, v in method.trainable_state_dict().items()}
            write_atomic(out / "adapter.safetensors", lambda tmp: save_file(state, str(tmp)))
        accuracy = evaluate(method, eval_source, device, bf16=cfg.bf16) if eval_source is not None else None
    except QuerytuneError:
        if created is not None:
            _discard_run_folder(out, created)
        raise

    metrics: dict[str, Any] = {
        "method": method_name,
        "task": train_images.task,
        "backbone": backbone.config.name,
        "train_split": train_split,
        "eval_split": eval_split,
        "epochs": cfg.epochs,
        "trainable_params": method.num_trainable_params(),
        "train_seconds": result.train_seconds,
        "train_loss": result.final_loss,
        "train_accuracy": result.train_accuracy,
        "resumed": resuming,
        **extra_metrics,
        "device": str(device),
        "feature_placement": getattr(source, "placement", None),
        "processes": distributed.world_size(),
        "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if accuracy is not None:
        metrics[f"{eval_split}_accuracy"] = accuracy
    if distributed.is_main():
        write_json(out / "metrics.json", metrics)
        (out / "checkpoint.pt").unlink(missing_ok=True)
    return metrics


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The config.json of a finished run (one with its adapter written)."""
    run = Path(run)
    config_path = run / "config.json"
    for path in (config_path, run / "adapter.safetensors"):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; is {run} a finished querytune run?")
    try:
        config = json.loads(config_path.read_text())
        missing = [k for k in ("method", "options", "num_classes", "image_size", "backbone") if k not in config]
        missing += [f"backbone.{k}" for k in ("source", "fingerprint", "name") if k not in config.get("backbone", {})]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
        config["num_classes"] = int(config["num_classes"])
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{config_path}: not a querytune run config ({type(error).__name__}: "
                              f"{one_line(error)})") from error
    return config


def load_run(run: str | Path, backbone: VisionTransformer | str | Path | None = None) -> tuple[Method, dict[str, Any]]:
    """Rebuild a finished run's method with its adapter loaded (eval mode)."""
    run = Path(run)
    adapter_path = run / "adapter.safetensors"
    config = read_run_config(run)
    trained = config["backbone"]
    backbone = load_backbone(backbone if backbone is not None else trained["source"])
    if backbone_fingerprint(backbone) != trained["fingerprint"]:
        raise CheckpointError(f"{run}: was trained on backbone {trained['name']!r}, which differs from the one given")
    method = build_method(config["method"], backbone, config["num_classes"], config["options"])
    try:
        state = load_file(str(adapter_path))
    except Exception as error:  # safetensors raises its own error types for torn files
        raise CheckpointError(f"{adapter_path}: not a readable adapter ({one_line(error)})") from error
    method.load_trainable_state_dict(state, source=str(adapter_path))
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
    device = distributed.init_from_env(torch.device(device) if device is not None else default_device())
    method, config = load_run(run, backbone)
    images = open_split(data, split)
    if images.num_classes > config["num_classes"]:
        raise CheckpointError(
            f"{images.source}: has {images.num_classes} classes, but the adapter in {run} has "
            f"{config['num_classes']} classes"
        )
    preprocess = Preprocess(config["image_size"], method.backbone.config.mean, method.backbone.config.std)
    workers = default_workers() if workers is None else workers
    bf16 = config["train"]["bf16"]
    source = make_source(method, images, preprocess, device, Path(cache_dir) if cache_dir else None, workers,
                         show_progress, bf16, cache_placement)
    return evaluate(method, source, device, bf16=bf16)
