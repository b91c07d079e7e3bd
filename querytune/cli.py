"""The ``querytune`` command line: train | eval | predict | cache | bench | measure | info.

Every user error (missing folder, bad split, unknown method or option, mismatched
checkpoint) is printed as one line on stderr and exits with code 2.

``torchrun --nproc-per-node N -m querytune train|eval|cache ...`` runs the command
data-parallel over N processes (see :mod:`querytune.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import distributed
from .errors import ConfigError, QuerytuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter- and memory-efficient transfer learning of Vision Transformers.")
console = Console()

BackboneOpt = typer.Option(..., "--backbone", "-b", help="HF model folder, timm checkpoint, hub name")
DataOpt = typer.Option(..., "--data", "-d", help="task folder (VTAB-1k layout, CSV lists or class folders)")


def _given(**values: Any) -> dict[str, Any]:
    """The options the user gave (None = not given, so the method's own default applies)."""
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def train(
    method: str = typer.Option(..., "--method", "-m", help="linear | full | vqt | synqt | memory | vpt | lora | "
                                                           "adaptformer | bitfit | vqt+lora | vqt+adaptformer | vqt+vpt"),
    backbone: str = BackboneOpt,
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", "-o", help="run folder (resumed if it holds an unfinished run)"),
    train_split: str = typer.Option("train800val200", help="split to train on"),
    eval_split: str = typer.Option("test", help="split to report accuracy on ('' for none)"),
    epochs: Optional[int] = typer.Option(None, help="default: the method's published protocol"),
    batch_size: Optional[int] = typer.Option(None, help="global batch, split evenly over torchrun's processes"),
    lr: Optional[float] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None),
    optimizer: Optional[str] = typer.Option(None, help="adamw | adam | sgd"),
    warmup_epochs: Optional[float] = typer.Option(None),
    grad_clip: Optional[float] = typer.Option(None),
    label_smoothing: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast for the trunk and the training step"),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing", help="gradient checkpointing: recompute "
                                                 "each block in backward (methods that backpropagate through the trunk)"),
    image_size: int = typer.Option(224, help="input size (images are resized to it)"),
    num_queries: Optional[int] = typer.Option(None, help="vqt, synqt: query tokens per layer (T)"),
    query_dropout: Optional[float] = typer.Option(None, help="vqt: dropout on the queries"),
    combine: Optional[str] = typer.Option(None, help="vqt: concat | mean | weighted (over the T queries)"),
    layers: Optional[str] = typer.Option(None, help="vqt: blocks with queries, e.g. '6-11' (default all)"),
    compress: Optional[float] = typer.Option(None, help="vqt: keep this fraction of head features (group lasso)"),
    attn_scale: Optional[float] = typer.Option(None, help="synqt: initial QSM attention scale"),
    ffn_scale: Optional[float] = typer.Option(None, help="synqt: initial QSM feed-forward scale"),
    feat_scale: Optional[float] = typer.Option(None, help="synqt: initial scale of the previous layer's query feature"),
    adapter_dim: Optional[int] = typer.Option(None, help="synqt, adaptformer: adapter bottleneck width"),
    qsm_dim: Optional[int] = typer.Option(None, help="synqt: QSM projection bottleneck width (paper: 8 for D = 768)"),
    prompts: Optional[int] = typer.Option(None, help="vpt: prompt tokens per layer (P)"),
    vpt_mode: Optional[str] = typer.Option(None, help="vpt: deep (fresh prompts at every block) | shallow"),
    prompt_dropout: Optional[float] = typer.Option(None, help="vpt: dropout on the prompts (default 0.1 deep, 0 shallow)"),
    lora_rank: Optional[int] = typer.Option(None, help="lora: rank r of the q and v updates"),
    lora_alpha: Optional[float] = typer.Option(None, help="lora: the updates are scaled by alpha / r"),
    lora_dropout: Optional[float] = typer.Option(None, help="lora: dropout on the low-rank path's input"),
    adapter_scale: Optional[float] = typer.Option(None, help="adaptformer: scale of the adapter's output"),
    adapter_dropout: Optional[float] = typer.Option(None, help="adaptformer: dropout inside the adapter"),
    memory_mode: Optional[str] = typer.Option(None, help="memory: masked (non-destructive, frozen trunk) | plain"),
    memory_tokens: Optional[int] = typer.Option(None, help="memory: memory tokens per layer (m; 0 for none)"),
    train_class_token: Optional[bool] = typer.Option(None, "--train-class-token/--no-train-class-token",
                                                     help="memory: train the (new) class token"),
    extend: Optional[Path] = typer.Option(None, help="memory: train a new task on top of this finished masked-memory "
                                                     "run, whose tasks stay frozen and may be read"),
    cache: Optional[Path] = typer.Option(None, help="feature-cache folder (default: $QUERYTUNE_CACHE or "
                                                    "~/.cache/querytune/features)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="run the frozen trunk every epoch instead"),
    cache_placement: str = typer.Option("auto", help="on a GPU, where cached features live: device (GPU memory), "
                                                     "host (streamed from disk) or auto (device when they fit)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when present)"),
    workers: Optional[int] = typer.Option(None, help="image-loading processes"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train a method on a task and report its test accuracy."""
    from .cache import default_cache_root
    from .run import train_run

    if no_cache and cache is not None:
        raise ConfigError("--cache and --no-cache exclude each other")
    metrics = train_run(
        method, backbone, data, out,
        options=_given(num_queries=num_queries, query_dropout=query_dropout, combine=combine, layers=layers,
                       compress=compress, attn_scale=attn_scale, ffn_scale=ffn_scale, feat_scale=feat_scale,
                       adapter_dim=adapter_dim, qsm_dim=qsm_dim, prompts=prompts, vpt_mode=vpt_mode,
                       prompt_dropout=prompt_dropout, lora_rank=lora_rank, lora_alpha=lora_alpha,
                       lora_dropout=lora_dropout, adapter_scale=adapter_scale, adapter_dropout=adapter_dropout,
                       memory_mode=memory_mode, memory_tokens=memory_tokens, train_class_token=train_class_token,
                       extend=extend),
        train_settings=_given(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              optimizer=optimizer, warmup_epochs=warmup_epochs, grad_clip=grad_clip,
                              label_smoothing=label_smoothing, seed=seed, bf16=bf16, checkpointing=checkpointing),
        train_split=train_split, eval_split=eval_split or None, image_size=image_size,
        cache_dir=None if no_cache else cache or default_cache_root(), cache_placement=cache_placement,
        device=device, workers=workers,
        show_progress=not quiet,
    )
    if distributed.is_main():
        _print_metrics(metrics)


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

    accuracy = eval_run(run, data, split, backbone=backbone, cache_dir=cache, cache_placement=cache_placement,
                        device=device, workers=workers, show_progress=not quiet)
    if distributed.is_main():
        console.print(f"{split} accuracy: {accuracy:.4f}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="image files and folders of images (searched recursively)"),
    run: list[Path] = typer.Option(..., "--run", "-r", help="a finished frozen-backbone run; repeat for more tasks"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="default: the first run's own"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON-lines file (default: standard output)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
    batch_size: int = typer.Option(32),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
) -> None:
    """Answer every run's task from one backbone pass per image batch: one JSON line per image."""
    from .run import default_workers
    from .serve import MultiTaskServer, collect_images

    if out is not None:
        if out.exists() and not overwrite:
            raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise ConfigError(f"{out}: its folder does not exist")
    paths = collect_images(images)
    server = MultiTaskServer.from_runs(backbone, run, device=device)
    records = server.predict_files(paths, batch_size, default_workers() if workers is None else workers)
    if out is None:
        for record in records:
            print(json.dumps(record), flush=True)
        return
    tmp = out.with_name(out.name + ".tmp")  # a failed run leaves no partial --out behind
    try:
        with open(tmp, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    console.print(f"{len(paths)} images x {len(server.tasks)} tasks -> {out}", highlight=False)


@app.command()
def cache(
    backbone: str = BackboneOpt,
    data: Path = DataOpt,
    cache: Path = typer.Option(..., "--cache", help="feature-cache folder"),
    splits: str = typer.Option("train800val200,test", help="comma-separated splits"),
    image_size: int = typer.Option(224),
    batch_size: int = typer.Option(64),
    shard_size: int = typer.Option(64, help="images per shard file (the unit of work split over processes)"),
    bf16: bool = typer.Option(False, "--bf16", help="run the trunk in bfloat16 autocast (a separate cache entry)"),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run the frozen trunk once per image and store its features for later epochs."""
    import torch

    from .backbones import load_backbone
    from .cache import ensure_cache
    from .data import Preprocess, open_split
    from .run import default_device, default_workers

    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive (got {shard_size})")
    where = distributed.init_from_env(torch.device(device) if device else default_device())
    model = load_backbone(backbone)
    preprocess = Preprocess(image_size, model.config.mean, model.config.std)
    for split in filter(None, splits.split(",")):
        images = open_split(data, split)
        path = ensure_cache(cache, model, images, preprocess, with_layers=True, bf16=bf16, shard_size=shard_size,
                            batch_size=batch_size, device=where,
                            workers=default_workers() if workers is None else workers, show_progress=not quiet)
        if distributed.is_main():
            console.print(f"{images.task}/{split}: {len(images.items)} images -> {path}")


@app.command()
def bench(
    suite: Path = typer.Option(..., "--suite", help="folder of VTAB-1k layout task folders"),
    methods: str = typer.Option("linear,vqt", help="comma-separated methods"),
    backbone: str = BackboneOpt,
    out: Path = typer.Option(..., "--out", "-o", help="report folder (resumed if it holds this bench)"),
    profile: str = typer.Option("quick", help="quick (capped epochs) | paper (published protocols)"),
    seeds: int = typer.Option(1, help="seeds per (task, method)"),
    search: bool = typer.Option(False, "--search", help="choose lr and weight decay on train800 -> val200 first"),
    groups: Optional[str] = typer.Option(None, help="task groups: a '<task> <group>' file or 'task=group,...' "
                                                    "(default: SUITE/groups.txt, then TASK/group.txt)"),
    image_size: int = typer.Option(224),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast for the trunk and the training steps"),
    cache: Optional[Path] = typer.Option(None, help="feature-cache folder (default: OUT/feature-cache)"),
    device: Optional[str] = typer.Option(None),
    workers: Optional[int] = typer.Option(None),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train every method on every task of a suite; write results.csv/json, report.md and pareto.png."""
    from .bench import Bench, read_groups_file

    group_map = None
    if groups:
        if Path(groups).is_file():
            group_map = read_groups_file(Path(groups))
        else:
            try:
                group_map = dict(item.split("=", 1) for item in groups.split(","))
            except ValueError as error:
                raise ConfigError(f"--groups {groups!r}: expected a file or 'task=group,...'") from error
    runner = Bench(suite, [m for m in methods.split(",") if m], backbone, out, profile=profile, seeds=seeds,
                   search=search, image_size=image_size, bf16=bf16, groups=group_map, cache_dir=cache,
                   device=device, workers=workers, show_progress=not quiet)
    results = runner.run()
    failed = sum(1 for r in results if r.get("error"))
    console.print((out / "report.md").read_text())
    console.print(f"{len(results) - failed} cells finished, {failed} failed; report in {out}")


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
    from .run import default_device

    result = measure_method(method, backbone, batch_size, image_size, bf16, device or default_device(), num_classes)
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
        ("register tokens", cfg.num_reg_tokens), ("native input size", f"{cfg.image_size} px ({cfg.grid_size}x{cfg.grid_size} patches)"),
        ("tokens at 224 px", cfg.num_tokens(224)),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("normalisation", f"mean {cfg.mean}, std {cfg.std}"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(show_header=False)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """The command line; ``argv`` defaults to ``sys.argv[1:]``."""
    try:
        app(args=argv, standalone_mode=False)
    except QuerytuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # click usage errors
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(2)
        raise
    finally:
        distributed.shutdown()
