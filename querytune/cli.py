"""The ``querytune`` command line: train | eval | predict | export | serve | cache | bench | measure | info.

Every user error (missing folder, bad split, unknown method or option, mismatched
checkpoint) is printed as one line on stderr and exits with code 2.

``torchrun --nproc-per-node N -m querytune train|eval|cache ...`` runs the command
data-parallel over N processes (see :mod:`querytune.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import distributed
from .errors import ConfigError, QuerytuneError, one_line
from .settings import BenchSpec, RunSpec, Runtime

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter- and memory-efficient transfer learning of Vision Transformers.")
console = Console()

BackboneOpt = typer.Option(..., "--backbone", "-b", help="HF model folder, timm checkpoint, .npz, hub name")
DataOpt = typer.Option(..., "--data", "-d", help="task folder (VTAB-1k lists, CSV lists, FGVC JSON, class folders "
                                                  "or a datasets save_to_disk folder)")


def _given(**values: Any) -> dict[str, Any]:
    """The options the user gave (None = not given, so the method's own default applies)."""
    return {k: v for k, v in values.items() if v is not None}


@dataclass
class TrainCommand:
    """What ``train`` takes besides the method's options and the training settings: the keys of a
    ``--config`` file next to ``options`` and ``train``, with their defaults (None: required, or the
    default named in the flag's help)."""

    method: str | None = None
    backbone: str | None = None
    data: str | None = None
    out: str | None = None
    train_split: str | None = None  # train800val200 where the task has it, else train
    eval_split: str = "test"
    eval_every: int | None = None
    val_split: str | None = None
    log: list[str] | None = None  # 'csv', 'tensorboard' (repeated or comma-separated on the command line)
    image_size: int = 224
    recipe: str | None = None
    task_name: str | None = None
    mean: list[float] | None = None  # 'R,G,B' on the command line
    std: list[float] | None = None
    cache: str | None = None
    no_cache: bool = False
    cache_splits: str | None = None  # comma-separated; None: every split of the run
    cache_placement: str = "auto"
    device: str | None = None
    workers: int | None = None
    grid: bool = False
    seeds: int | None = None
    compile: str = "off"


TRAIN_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs", "grad_clip",
                  "label_smoothing", "seed", "data_seed", "precision", "checkpointing", "augment")
RUN_RECORD = ("querytune_version", "num_classes", "classes")  # what a run's config.json holds beside its settings


def triple(value: str | list[float] | None, flag: str) -> list[float] | None:
    """An 'R,G,B' flag or a list from a file as numbers (the count is checked where they are used)."""
    if value is None or isinstance(value, list):
        return value
    try:
        return [float(part) for part in value.split(",")]
    except ValueError as error:
        raise ConfigError(f"{flag} {value!r}: expected numbers separated by commas, e.g. 0.485,0.456,0.406") \
            from error


def command_line_over(settings: dict[str, Any], ctx: typer.Context, command: type,
                      sections: dict[str, str] | None = None) -> dict[str, Any]:
    """``settings`` (from a file) with what the command line gave on top, and ``command``'s defaults for
    what neither gave; ``sections`` names the mapping a flag belongs in (train's training settings)."""
    for name, value in ctx.params.items():
        not_given = value is None or value == () or value == []  # a list flag not given comes as an empty one
        if not_given or name in ("config", "print_config", "quiet"):
            continue
        if name in ("mean", "std"):
            value = triple(value, f"--{name}")
        elif isinstance(value, Path):
            value = str(value)
        section = (sections or {}).get(name)
        (settings[section] if section else settings)[name] = value
    for field in fields(command):
        settings.setdefault(field.name, field.default)
    return settings


def logger_names(value: str | list[str] | None) -> list[str]:
    """``--log`` given once per logger or as 'csv,tensorboard' (a config file's one name, or a list)."""
    items = [value] if isinstance(value, str) else value or []
    return [name for item in items for name in str(item).split(",") if name]


def require(settings: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [f"--{key}" for key in keys if not settings[key]]
    if missing:
        raise ConfigError(f"{', '.join(missing)} missing: give it on the command line or in --config")


def read_settings_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON file's mapping of settings."""
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.2's floats: 1e-3 is a number (PyYAML reads YAML 1.1, where it is a string)."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
        r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))
    try:
        data = yaml.load(path.read_text(), Loader=Loader)  # JSON is YAML too
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or one_line(error)})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: neither YAML nor JSON ({one_line(error)})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def check_settings(path: Path, data: dict[str, Any], command: type, sections: tuple[str, ...] = ()) -> None:
    """Every key of ``data`` is a field of the ``command`` dataclass, or one of the ``sections`` (mappings),
    and takes its value."""
    from .options import check_value

    known = {field.name: field for field in fields(command)}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} must be a mapping of settings, got {value!r}")
        elif key not in known:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join([*known, *sections])})")
        else:
            check_value(command, known[key], value)


def read_train_config(path: Path) -> dict[str, Any]:
    """The settings of a YAML or JSON file for ``train`` (a run's config.json replays that run), checked."""
    data = read_settings_file(path)
    if isinstance(data.get("backbone"), dict):  # a run's config.json: source, name, fingerprint
        data["backbone"] = data["backbone"].get("source")
    if isinstance(data.get("normalisation"), dict):  # a run's config.json: the normalisation it used
        data["mean"], data["std"] = data["normalisation"].get("mean"), data["normalisation"].get("std")
    data.pop("normalisation", None)
    if isinstance(data.get("recipe"), dict):  # a run's config.json: the recipe and the task it was read for
        data["recipe"], data["task_name"] = data["recipe"].get("name"), data.get("task")
    data.pop("task", None)
    for key in RUN_RECORD:
        data.pop(key, None)
    check_settings(path, data, TrainCommand, ("options", "train"))
    return {"options": {}, "train": {}, **data}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON file of these settings (a run's "
                                                                  "config.json replays the run); flags override it"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved settings and exit"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="the method (see `querytune methods`)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="HF model folder, timm checkpoint, "
                                                                          ".npz, hub name"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="task folder (VTAB-1k lists, CSV lists, "
                                                                   "FGVC JSON, class folders or a datasets "
                                                                   "save_to_disk folder)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (resumed if it holds an unfinished "
                                                                 "run)"),
    train_split: Optional[str] = typer.Option(None, help="split to train on (default train800val200, else train)"),
    eval_split: Optional[str] = typer.Option(None, help="split to report accuracy on (default test; '' for none)"),
    eval_every: Optional[int] = typer.Option(None, help="log the accuracy on --val-split every N epochs (and "
                                                        "after the last)"),
    val_split: Optional[str] = typer.Option(None, help="held-out split for --eval-every (default val200 when "
                                                       "training on train800)"),
    log: Optional[list[str]] = typer.Option(None, "--log", help="also log each epoch to: csv (RUN/log.csv) | "
                                            "tensorboard (RUN/tensorboard/); repeat for both"),
    epochs: Optional[int] = typer.Option(None, help="default: the method's published protocol"),
    batch_size: Optional[int] = typer.Option(None, help="global batch, split evenly over torchrun's processes"),
    lr: Optional[float] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None),
    optimizer: Optional[str] = typer.Option(None, help="adamw | adam | sgd"),
    warmup_epochs: Optional[float] = typer.Option(None),
    grad_clip: Optional[float] = typer.Option(None),
    label_smoothing: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    data_seed: Optional[int] = typer.Option(None, help="seed of the epochs' order (default: --seed)"),
    precision: Optional[str] = typer.Option(None, help="auto (the default: bf16 where the device computes it "
                                            "natively, else fp32) | fp32 | bf16 | fp16"),
    bf16: bool = typer.Option(False, "--bf16", help="--precision bf16"),
    fp16: bool = typer.Option(False, "--fp16", help="--precision fp16"),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing", help="gradient checkpointing: recompute "
                                                 "each block in backward (methods that backpropagate through the "
                                                 "trunk)"),
    augment: Optional[bool] = typer.Option(None, "--augment", help="random resized crop and flip of the training "
                                           "images (the FGVC protocols); needs the trunk run live: methods that adapt "
                                           "it, or --no-cache"),
    image_size: Optional[int] = typer.Option(None, help="input size, images are resized to it (default 224)"),
    recipe: Optional[str] = typer.Option(None, help="take the method's per-task settings from this recipe "
                                                    "(vtab1k: the official VQT and SynQT settings; vtab1k-mini: "
                                                    "the same read for vtab1k-mini's tasks); flags override"),
    task_name: Optional[str] = typer.Option(None, help="the task's name in the recipe (default: the data folder's)"),
    mean: Optional[str] = typer.Option(None, help="input normalisation mean 'R,G,B' (needed where the backbone's "
                                                  "is unknown; default: the backbone's)"),
    std: Optional[str] = typer.Option(None, help="input normalisation std 'R,G,B'"),
    cache: Optional[Path] = typer.Option(None, help="feature-cache folder (default: $QUERYTUNE_CACHE or "
                                                    "~/.cache/querytune/features)"),
    no_cache: Optional[bool] = typer.Option(None, "--no-cache", help="run the frozen trunk every epoch instead"),
    cache_splits: Optional[str] = typer.Option(None, help="comma-separated splits whose features are cached "
                                                          "(default: all); the others run the trunk live, e.g. "
                                                          "the test split, which is read once"),
    cache_placement: Optional[str] = typer.Option(None, help="on a GPU, where cached features live: device (GPU "
                                                             "memory), host (streamed from disk) or auto (the "
                                                             "default: device when they fit)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when present)"),
    workers: Optional[int] = typer.Option(None, help="image-loading processes"),
    grid: Optional[bool] = typer.Option(None, "--grid", help="search the method's lr x weight-decay grid on "
                                        "train800 -> val200 as one stack (OUT/search), then retrain the best "
                                        "(OUT/seed<s>)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="train seeds --seed .. --seed+N-1 as one stack "
                                        "(OUT/seed<s>), sharing the first seed's data order"),
    compile: Optional[str] = typer.Option(None, "--compile", help="torch.compile the training step: off (the "
                                          "default), default, reduce-overhead (CUDA graphs) or max-autotune; "
                                          "single runs only"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train a method on a task and report its test accuracy. The method options (below) come from
    the method registry; each applies to the methods it names."""
    from .run import train_run
    from .trunk.cache import default_cache_root

    settings = read_train_config(config) if config is not None else {"options": {}, "train": {}}
    sections = dict.fromkeys(TRAIN_SETTINGS, "train")
    spelled = [kind for kind, given in (("bf16", bf16), ("fp16", fp16)) if given]
    if spelled:
        if len(spelled) > 1 or precision not in (None, spelled[0]):
            raise ConfigError(f"--{spelled[0]} and --{spelled[-1] if len(spelled) > 1 else 'precision'} "
                              "exclude each other")
        ctx.params["precision"] = spelled[0]
    ctx.params.pop("bf16"), ctx.params.pop("fp16")
    settings = command_line_over(settings, ctx, TrainCommand, sections)
    settings["options"].update(parse_method_options(ctx.args))
    settings["log"] = logger_names(settings["log"])
    if print_config:
        print(json.dumps(settings, indent=1))
        return
    require(settings, ("method", "backbone", "data", "out"))
    if settings["no_cache"] and (settings["cache"] is not None or settings["cache_splits"] is not None):
        raise ConfigError(f"{'--cache' if settings['cache'] is not None else '--cache-splits'} and --no-cache "
                          "exclude each other")
    spec = RunSpec(method=settings["method"], backbone=settings["backbone"], data=str(settings["data"]),
                   train_split=settings["train_split"], eval_split=settings["eval_split"],
                   eval_every=settings["eval_every"], val_split=settings["val_split"], log=settings["log"],
                   image_size=settings["image_size"], recipe=settings["recipe"], task_name=settings["task_name"],
                   mean=triple(settings["mean"], "--mean"), std=triple(settings["std"], "--std"),
                   options=settings["options"])
    runtime = Runtime(device=settings["device"], workers=settings["workers"],
                      cache=None if settings["no_cache"] else str(settings["cache"] or default_cache_root()),
                      cache_splits=None if settings["cache_splits"] is None else settings["cache_splits"].split(","),
                      cache_placement=settings["cache_placement"], compile=settings["compile"], progress=not quiet)
    if settings["grid"] or settings["seeds"] is not None:
        _train_grid(settings, spec, runtime)
        return
    metrics = train_run(spec, settings["out"], settings["train"], runtime)
    if distributed.is_main():
        _print_metrics(metrics)


def _train_grid(settings: dict[str, Any], spec: RunSpec, runtime: Runtime) -> None:
    """``train --grid`` / ``--seeds N`` (:mod:`querytune.grid`): print the search and the seeds."""
    from .grid import train_grid

    count = 1 if settings["seeds"] is None else settings["seeds"]
    if count < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {count})")
    first = settings["train"].get("seed") or 0
    summary = train_grid(spec, settings["out"], settings["train"], runtime, search=bool(settings["grid"]),
                         seeds=[first + i for i in range(count)])
    if summary["search"]:
        table = Table("lr", "weight decay", "val200 accuracy", "", title="search (train800 -> val200)")
        for row in summary["search"]:
            chosen = row["lr"] == summary["chosen"]["lr"] and row["weight_decay"] == summary["chosen"]["weight_decay"]
            table.add_row(f"{row['lr']:g}", f"{row['weight_decay']:g}", f"{row['val200_accuracy']:.4f}",
                          "chosen" if chosen else "")
        console.print(table)
    table = Table("seed", f"{summary['eval_split']} accuracy", "run", title="seeds")
    for row in summary["seeds"]:
        table.add_row(str(row["seed"]), "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}", row["run"])
    console.print(table)
    if summary["mean_accuracy"] is not None:
        spread = f" +- {summary['std_accuracy']:.4f}" if summary["std_accuracy"] is not None else ""
        console.print(f"mean {summary['eval_split']} accuracy {summary['mean_accuracy']:.4f}{spread} over "
                      f"{len(summary['seeds'])} seed(s); summary in {Path(settings['out']) / 'grid.json'}")


@app.command("eval")
def eval_command(
    run: Path = typer.Option(..., "--run", "-r", help="a finished run folder"),
    data: Path = DataOpt,
    split: str = typer.Option("test"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="default: the run's own"),
    cache: Optional[Path] = typer.Option(None, help="feature-cache folder"),
    cache_placement: str = typer.Option("auto", help="on a GPU, where cached features live: device (GPU memory), "
                                                     "host (streamed from disk) or auto (device when they fit)"),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate a saved adapter on a split; prints the accuracy."""
    from .run import eval_run

    runtime = Runtime(device=device, workers=workers, cache=None if cache is None else str(cache),
                      cache_placement=cache_placement, progress=not quiet)
    accuracy = eval_run(run, data, split, runtime, backbone)
    if distributed.is_main():
        console.print(f"{split} accuracy: {accuracy:.4f}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="image files and folders of images (searched recursively)"),
    run: list[Path] = typer.Option(..., "--run", "-r", help="a finished run of any method; repeat for more tasks"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="default: the first run's own"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON-lines file (default: standard output)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
    topk: int = typer.Option(1, "--topk", help="also list each task's k most probable classes (under 'top')"),
    logits: bool = typer.Option(False, "--logits", help="also write each task's logits"),
    batch_size: int = typer.Option(32),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
) -> None:
    """Answer every run's task, the frozen-backbone runs from one shared backbone pass per image batch and each
    run that adapts the backbone from its own: one JSON line per image."""
    from .files import write_atomic
    from .serve import MultiTaskServer, collect_images
    from .trunk.device import resolve_workers

    if out is not None:
        if out.exists() and not overwrite:
            raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise ConfigError(f"{out}: its folder does not exist")
    if topk < 1:
        raise ConfigError(f"--topk must be at least 1 (got {topk})")
    paths = collect_images(images)
    server = MultiTaskServer.from_runs(backbone, run, device=device)
    records = server.predict_files(paths, batch_size, resolve_workers(workers), topk, logits)
    if out is None:
        for record in records:
            print(json.dumps(record), flush=True)
        return
    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")

    write_atomic(out, write)  # a failed run leaves no partial --out behind
    console.print(f"{len(paths)} images x {len(server.tasks)} tasks -> {out}", highlight=False)


def _limit_help(name: str) -> str:
    """A ``serve`` limit's help and default, from :class:`querytune.service.ServiceLimits` (no web stack needed)."""
    from .service import ServiceLimits

    field = next(f for f in fields(ServiceLimits) if f.name == name)
    return f"{field.metadata['help']} (default {field.default})"
@app.command("export")
def export_command(
    runs: list[Path] = typer.Argument(..., help="a finished run folder; several frozen-backbone runs for onnx"),
    format: str = typer.Option(..., "--format", "-f", help="peft (LoRA runs), merged (linear, full, LoRA, "
                                                             "BitFit) or onnx (any run)"),
    out: Path = typer.Option(..., "--out", "-o", help="the export folder (absent or empty)"),
) -> None:
    """Export runs for other tools, with a model card: PEFT adapter, merged ViT weights, or an ONNX graph."""
    from .export import export_runs

    done = export_runs(runs, format, out)
    state = "already holds this export; nothing to do" if done.unchanged else "written"
    console.print(f"{out}: {state} ({', '.join(done.files)})", highlight=False, soft_wrap=True)


@app.command()
def serve(
    run: list[Path] = typer.Option(..., "--run", "-r", help="a finished run of any method; repeat for more tasks"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="default: the first run's own"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    max_batch: Optional[int] = typer.Option(None, help=_limit_help("max_batch")),
    max_wait_ms: Optional[float] = typer.Option(None, help=_limit_help("max_wait_ms")),
    max_images: Optional[int] = typer.Option(None, help=_limit_help("max_images")),
    max_body_mb: Optional[float] = typer.Option(None, help=_limit_help("max_body_mb")),
    max_pixels: Optional[int] = typer.Option(None, help=_limit_help("max_pixels")),
    read_timeout: Optional[float] = typer.Option(None, help=_limit_help("read_timeout")),
    max_inflight_per_client: Optional[int] = typer.Option(None, help=_limit_help("max_inflight_per_client")),
    token_file: Optional[Path] = typer.Option(None, help="file holding the token that every request but GET /health "
                                              "must send as 'Authorization: Bearer <token>' (or env QUERYTUNE_TOKEN)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="answer anyone on a non-loopback --host, without a token"),
    access_log: str = typer.Option("-", help="append one JSON line per request to this file (-: stderr)"),
    device: Optional[str] = typer.Option(None),
) -> None:
    r"""Answer every run's task over HTTP: POST /predict (images), GET /tasks, GET /health, GET /metrics, and a page
    at /. Needs the extra querytune\[serve]; docs/serving.md."""
    from .serve import MultiTaskServer
    from .service import ServiceAccess, ServiceLimits
    from .service import serve as run_service

    limits = ServiceLimits(**_given(max_batch=max_batch, max_wait_ms=max_wait_ms, max_images=max_images,
                                    max_body_mb=max_body_mb, max_pixels=max_pixels, read_timeout=read_timeout,
                                    max_inflight_per_client=max_inflight_per_client))
    access = ServiceAccess.from_options(host, token_file, no_auth, access_log)  # before the model loads
    server = MultiTaskServer.from_runs(backbone, run, device=device)
    console.print(f"serving {', '.join(task.name for task in server.tasks)} on http://{host}:{port} "
                  f"({'token required' if access.token else 'no token'})", highlight=False)
    run_service(server, host, port, limits, access)


cache_app = typer.Typer(no_args_is_help=False, help="Feature-cache entries: build (with the options below, or "
                                                    "`cache build`), ls, rm, prune.")
app.add_typer(cache_app, name="cache")
CacheRootOpt = typer.Option(None, "--cache", help="feature-cache folder (default: $QUERYTUNE_CACHE, else "
                                                  "~/.cache/querytune/features)")


@cache_app.command("build")
def cache_build(
    ctx: typer.Context,
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="HF model folder, timm checkpoint, "
                                                                          ".npz, hub name"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="task folder (datasets folder, FGVC JSON, "
                                                                   "VTAB-1k or CSV lists, class folders)"),
    cache: Optional[Path] = CacheRootOpt,
    splits: str = typer.Option("train800val200,test", help="comma-separated splits"),
    image_size: int = typer.Option(224),
    batch_size: int = typer.Option(64),
    shard_size: int = typer.Option(64, help="images per shard file (the unit of work split over processes)"),
    bf16: bool = typer.Option(False, "--bf16", help="run the trunk in bfloat16 autocast (a separate cache entry)"),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run the frozen trunk once per image and store its features for later epochs; an entry that exists
    already is left as it is."""
    if ctx.invoked_subcommand is not None:  # run as the group's callback, before ls, rm or prune
        return
    from .backbones import load_backbone
    from .trunk.cache import cache_splits, default_cache_root, human_size
    from .trunk.device import resolve_device, resolve_workers

    if backbone is None or data is None:
        raise ConfigError(f"querytune cache build: {'--backbone' if backbone is None else '--data'} missing")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive (got {shard_size})")
    where = distributed.init_from_env(resolve_device(device))
    entries = cache_splits(cache or default_cache_root(), load_backbone(backbone), data,
                           [s for s in splits.split(",") if s], image_size, bf16, shard_size=shard_size,
                           batch_size=batch_size, device=where,
                           workers=resolve_workers(workers), show_progress=not quiet)
    if distributed.is_main():
        for images, path, built in entries:
            size = human_size(sum(file.stat().st_size for file in path.iterdir()))
            state = "built" if built else "exists already, nothing to do"
            console.print(f"{images.task}/{images.split}: {len(images.items)} images, {size}, {state} -> {path}",
                          highlight=False, soft_wrap=True)


cache_app.callback(invoke_without_command=True)(cache_build)  # the old form: querytune cache --backbone ...


@cache_app.command("ls")
def cache_ls(cache: Optional[Path] = CacheRootOpt) -> None:
    """List the entries: task and split, backbone, images, size on disk, when last used."""
    import time

    from .trunk.cache import default_cache_root, human_size, list_entries

    root = cache or default_cache_root()
    entries = list_entries(root)
    rows = [("entry", "task/split", "backbone", "images", "size", "last used")]
    for entry in entries:
        meta = entry.meta or {}
        rows.append((entry.name, f"{meta['task']}/{meta['split']}" if meta else "(incomplete)",
                     meta.get("backbone", ""), str(meta.get("num_images", "")), human_size(entry.nbytes),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:  # plain aligned columns: never wrapped, easy to grep
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, "
          f"{human_size(sum(e.nbytes for e in entries))} in {root}")


@cache_app.command("rm")
def cache_rm(entries: list[str] = typer.Argument(..., help="entry names as `cache ls` shows them"),
             cache: Optional[Path] = CacheRootOpt) -> None:
    """Delete cache entries."""
    from .trunk.cache import default_cache_root, human_size, remove_entry

    root = cache or default_cache_root()
    for name in entries:
        entry = remove_entry(root, name)
        console.print(f"removed {entry.name} ({human_size(entry.nbytes)})", highlight=False)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_duration(text: str, flag: str) -> float:
    """'90m', '12h', '7d', '2w' (or plain seconds) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", text.strip().lower())
    if match is None:
        raise ConfigError(f"{flag} {text!r}: expected a duration such as 45s, 90m, 12h, 7d or 2w")
    return float(match[1]) * DURATION_UNITS[match[2] or "s"]


def parse_size(text: str, flag: str) -> int:
    """'500M', '10G', '1.5GiB', '2TB' (binary units) or plain bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if match is None:
        raise ConfigError(f"{flag} {text!r}: expected a size such as 500M, 10G or 1.5GiB")
    return int(float(match[1]) * SIZE_UNITS[match[2]])


@cache_app.command("prune")
def cache_prune(
    older_than: Optional[str] = typer.Option(None, "--older-than", help="remove entries last used longer ago, "
                                                                        "e.g. 7d, 12h, 2w"),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="then remove the least recently used entries "
                                                                    "until the rest fit, e.g. 20G, 500M"),
    cache: Optional[Path] = CacheRootOpt,
) -> None:
    """Remove entries not used for a while, or the least recently used ones over a size."""
    from .trunk.cache import default_cache_root, human_size, list_entries, prune_entries

    if older_than is None and max_size is None:
        raise ConfigError("querytune cache prune: give --older-than, --max-size or both")
    root = cache or default_cache_root()
    removed = prune_entries(root, parse_duration(older_than, "--older-than") if older_than else None,
                            parse_size(max_size, "--max-size") if max_size else None)
    for entry in removed:
        console.print(f"removed {entry.name} ({human_size(entry.nbytes)})", highlight=False)
    left = list_entries(root)
    console.print(f"{len(removed)} removed, {len(left)} left ({human_size(sum(e.nbytes for e in left))})",
                  highlight=False)


@dataclass
class BenchCommand:
    """The settings of ``bench``, the keys of its ``--config`` file, with their defaults."""

    suite: str | None = None
    methods: str = "linear,vqt"
    backbone: str | None = None
    out: str | None = None
    profile: str = "quick"
    seeds: int = 1
    search: bool = False
    groups: str | None = None
    tasks: str | None = None
    image_size: int = 224
    precision: str = "auto"
    recipe: str | None = None
    mean: list[float] | None = None  # 'R,G,B' on the command line
    std: list[float] | None = None
    cache: str | None = None
    device: str | None = None
    workers: int | None = None


@app.command()
def bench(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON file of these settings; flags "
                                                                  "override it"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved settings and exit"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="folder of VTAB-1k layout task folders, "
                                                                  "or one task folder"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods (default linear,vqt)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="HF model folder, timm checkpoint, "
                                                                          ".npz, hub name"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder (resumed if it holds this bench)"),
    profile: Optional[str] = typer.Option(None, help="quick (capped epochs, the default) | paper (published "
                                                     "protocols)"),
    seeds: Optional[int] = typer.Option(None, help="seeds per (task, method), default 1"),
    search: Optional[bool] = typer.Option(None, "--search", help="choose lr and weight decay on train800 -> val200 "
                                                                 "first"),
    groups: Optional[str] = typer.Option(None, help="task groups: a '<task> <group>' file or 'task=group,...' "
                                                    "(default: SUITE/groups.txt, then TASK/group.txt)"),
    tasks: Optional[str] = typer.Option(None, help="train only these tasks of the suite now, 'a,b' (a bench "
                                                   "split over processes sharing --out and --cache; run it "
                                                   "again without --tasks for the whole report)"),
    image_size: Optional[int] = typer.Option(None, help="input size (default 224)"),
    precision: Optional[str] = typer.Option(None, help="auto (the default: bf16 where the device computes it "
                                            "natively, else fp32) | fp32 | bf16 | fp16"),
    bf16: bool = typer.Option(False, "--bf16", help="--precision bf16"),
    recipe: Optional[str] = typer.Option(None, help="per-task method settings from this recipe (vtab1k, "
                                                    "vtab1k-mini); task names are the suite's folder names"),
    mean: Optional[str] = typer.Option(None, help="input normalisation mean 'R,G,B' (needed where the backbone's "
                                                  "is unknown; default: the backbone's)"),
    std: Optional[str] = typer.Option(None, help="input normalisation std 'R,G,B'"),
    cache: Optional[Path] = typer.Option(None, help="feature-cache folder (default: OUT/feature-cache)"),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train every method on every task of a suite; write results.csv/json, report.md and pareto.png."""
    from .bench import Bench

    settings: dict[str, Any] = {}
    if config is not None:
        settings = read_settings_file(config)
        check_settings(config, settings, BenchCommand)
    if bf16:
        ctx.params["precision"] = "bf16"
    ctx.params.pop("bf16")
    settings = command_line_over(settings, ctx, BenchCommand)
    if print_config:
        print(json.dumps(settings, indent=1))
        return
    require(settings, ("suite", "backbone", "out"))
    spec = BenchSpec(suite=str(settings["suite"]), methods=[m for m in settings["methods"].split(",") if m],
                     backbone=settings["backbone"], out=str(settings["out"]), profile=settings["profile"],
                     seeds=settings["seeds"], search=settings["search"], image_size=settings["image_size"],
                     precision=settings["precision"], groups=settings["groups"], recipe=settings["recipe"],
                     mean=triple(settings["mean"], "--mean"), std=triple(settings["std"], "--std"),
                     tasks=[t.strip() for t in settings["tasks"].split(",") if t.strip()]
                     if settings["tasks"] is not None else None)
    runtime = Runtime(device=settings["device"], workers=settings["workers"],
                      cache=str(settings["cache"]) if settings["cache"] else None, progress=not quiet)
    out_dir = Path(settings["out"])
    runner = Bench(spec, runtime)
    results = runner.run()
    failed = sum(1 for r in results if r.get("error"))
    console.print((out_dir / "report.md").read_text(), soft_wrap=True)  # piped too: lines whole, not cut at 80
    console.print(f"{len(results) - failed} cells finished, {failed} failed; report in {out_dir}")


@app.command()
def measure(
    method: str = typer.Option(..., "--method", "-m", help="a method, or vqt-naive (VQT the published way)"),
    backbone: str = BackboneOpt,
    batch_size: int = typer.Option(32),
    image_size: int = typer.Option(224),
    num_classes: int = typer.Option(10),
    bf16: bool = typer.Option(False, "--bf16"),
    device: Optional[str] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="one JSON line instead of a table"),
) -> None:
    """Measure one training step: trainable parameters, adapter bytes, activation bytes saved for
    backward, peak memory of training versus inference, step time."""
    from .measure import measure_method
    from .trunk.device import resolve_device

    result = measure_method(method, backbone, batch_size, image_size, bf16, resolve_device(device), num_classes)
    if as_json:
        print(json.dumps(result))
    else:
        _print_metrics(result)


@app.command()
def info(backbone: str = BackboneOpt) -> None:
    """Print a backbone's architecture, parameter count and input size."""
    from .backbones import load_backbone

    model = load_backbone(backbone)
    cfg = model.config
    table = Table(title=cfg.name, show_header=False)
    rows = [
        ("width (D)", cfg.embed_dim), ("depth (L)", cfg.depth), ("heads", cfg.num_heads),
        ("patch size", cfg.patch_size), ("MLP ratio", cfg.mlp_ratio), ("LayerScale", cfg.layer_scale),
        ("register tokens", cfg.num_reg_tokens),
        ("native input size", f"{cfg.image_size} px ({cfg.grid_size}x{cfg.grid_size} patches)"),
        ("tokens at 224 px", cfg.num_tokens(224)),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("normalisation", f"mean {cfg.mean}, std {cfg.std}" if cfg.mean is not None
         else "unknown: its checkpoint names none (runs give --mean and --std)"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def methods() -> None:
    """List the methods: what each reads from the trunk, its options and their defaults."""
    from dataclasses import MISSING, fields

    from .methods import METHODS
    from .options import flag

    table = Table("method", "reads", "options (default)")
    for name, cls in sorted(METHODS.items()):
        options = [f"{flag(f.name)} ({f.default if f.default is not MISSING else ''}): {f.metadata.get('help', '')}"
                   for f in fields(cls.Options)]
        table.add_row(name, cls.reads.value, "\n".join(options) or "none")
    console.print(table)


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(show_header=False)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _option_users() -> dict[str, list[tuple[str, Any, type]]]:
    """Each option name of the registered methods with the methods that take it (name, field, Options)."""
    from dataclasses import fields

    from .methods import METHODS

    users: dict[str, list[tuple[str, Any, type]]] = {}
    for name, cls in sorted(METHODS.items()):
        for field in fields(cls.Options):
            users.setdefault(field.name, []).append((name, field, cls.Options))
    return users


def method_options_parser() -> argparse.ArgumentParser:
    """A parser for the method options of ``train``, one flag per option name of the registered methods
    (an option several methods share is one flag), typed from the options dataclasses."""
    from .options import flag, value_type

    parser = argparse.ArgumentParser(prog="querytune train", add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    for option_name, uses in _option_users().items():
        kind, _ = value_type(uses[0][2], option_name)
        if kind is bool:
            parser.add_argument(flag(option_name), action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag(option_name), type={int: int, float: float}.get(kind, str), default=None)
    return parser


def parse_method_options(args: list[str]) -> dict[str, Any]:
    """The method options given on ``train``'s command line (what typer's own options left over)."""
    parser = method_options_parser()
    try:
        parsed, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as error:
        raise ConfigError(str(error)) from None
    if unknown:
        raise ConfigError(f"unknown option or extra argument {unknown[0]!r} (see querytune train --help)")
    return {key: value for key, value in vars(parsed).items() if value is not None}


def method_options_help() -> str:
    """The method options for ``train --help``, from the registry."""
    from .options import flag

    lines = ["Method options (each for the methods named):", ""]
    for option_name, uses in _option_users().items():
        field = uses[0][1]
        names = ", ".join(name for name, _, _ in uses)
        shown = (f"{flag(option_name)}/--no-{flag(option_name)[2:]}" if isinstance(field.default, bool)
                 else flag(option_name))
        defaults = {name: used.default for name, used, _ in uses}
        if len(set(map(str, defaults.values()))) > 1:
            default = "; defaults " + ", ".join(f"{name} {value}" for name, value in defaults.items())
        else:
            default = "" if field.default is None else f"; default {field.default}"
        lines.append(f"{shown}  {names}: {field.metadata.get('help', '')}{default}")
    return "\n\n".join(lines)


def build_cli() -> typer.Typer:
    """The command line, with the method list and options of ``train`` taken from the registry as it is now."""
    from .methods import METHODS

    for command in app.registered_commands:
        if command.callback is train:
            command.epilog = method_options_help()
            command.help = (train.__doc__ or "") + f"\n\nMethods: {', '.join(sorted(METHODS))}."
    return app


def main(argv: list[str] | None = None) -> None:
    """The command line; ``argv`` defaults to ``sys.argv[1:]``."""
    try:
        build_cli()(args=argv, standalone_mode=False)
    except QuerytuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        usage: Any = error  # click's UsageError (typer bundles click, so it is not importable by that name)
        if type(usage).__name__ == "NoArgsIsHelpError":  # a bare `querytune`: the help
            usage.show()
        else:  # a value typer cannot convert, an unknown flag: one line, as every user error
            see = f" (see {usage.ctx.command_path} --help)" if getattr(usage, "ctx", None) is not None else ""
            print(f"error: {' '.join(usage.format_message().split())}{see}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()
