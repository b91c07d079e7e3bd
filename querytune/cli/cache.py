"""``querytune cache build | ls | rm | prune``: the feature cache's entries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from .. import distributed
from ..data.splits import FINAL
from ..errors import ConfigError
from ..options import ImageSize
from ..settings import RunSpec, Runtime
from ..trunk.precision import Precision
from .app import app, console
from .flags import image_size_option, setting_help
from .printing import print_cache_entries

cache_app = typer.Typer(no_args_is_help=True, help="Feature-cache entries: build, ls, rm, prune.")
app.add_typer(cache_app, name="cache")
CacheRootOpt = typer.Option(None, "--cache", help="feature-cache folder (default: $QUERYTUNE_CACHE, else "
                                                  "~/.cache/querytune/features)")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@cache_app.command("build")
def cache_build(
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=setting_help(RunSpec, "backbone")),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=setting_help(RunSpec, "data")),
    cache: Optional[Path] = CacheRootOpt,
    splits: str = typer.Option(",".join(FINAL), help="comma-separated splits"),
    image_size: str = image_size_option(),
    batch_size: int = typer.Option(64),
    shard_size: int = typer.Option(64, help="images per shard file (the unit of work split over processes)"),
    precision: Precision = typer.Option(Precision.FP32, "--precision", help="the precision of the runs that "
                                        "will read the entries: bf16 runs the trunk in bfloat16 autocast (a separate "
                                        "entry); fp16 runs read the fp32 one"),
    device: Optional[str] = typer.Option(None, help=setting_help(Runtime, "device")),
    workers: Optional[int] = typer.Option(None, help=setting_help(Runtime, "workers")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Run the frozen trunk once per image and store its features for later epochs; an entry that exists
    already is left as it is."""
    from ..backbones import load_backbone
    from ..trunk.cache import Building, cache_splits, default_cache_root, human_size
    from ..trunk.device import resolve_device

    if backbone is None or data is None:
        raise ConfigError(f"querytune cache build: {'--backbone' if backbone is None else '--data'} missing")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive (got {shard_size})")
    where = distributed.init_from_env(resolve_device(device))
    entries = cache_splits(cache or default_cache_root(), load_backbone(backbone), data,
                           [s for s in splits.split(",") if s], ImageSize.of(image_size), precision,
                           Building(batch_size=batch_size, shard_size=shard_size, device=where,
                                    workers=Runtime(workers=workers).num_workers, show_progress=not quiet))
    if distributed.is_main():
        for images, path, built in entries:
            size = human_size(sum(file.stat().st_size for file in path.iterdir()))
            state = "built" if built else "exists already, nothing to do"
            console.print(f"{images.task}/{images.split}: {len(images.items)} images, {size}, {state} -> {path}",
                          highlight=False, soft_wrap=True)


@cache_app.command("ls")
def cache_ls(cache: Optional[Path] = CacheRootOpt) -> None:
    """List the entries: task and split, backbone, images, size on disk, when last used."""
    from ..trunk.cache import default_cache_root, list_entries

    root = cache or default_cache_root()
    print_cache_entries(list_entries(root), root)


@cache_app.command("rm")
def cache_rm(entries: list[str] = typer.Argument(..., help="entry names as `cache ls` shows them"),
             cache: Optional[Path] = CacheRootOpt) -> None:
    """Delete cache entries."""
    from ..trunk.cache import default_cache_root, human_size, remove_entry

    root = cache or default_cache_root()
    for name in entries:
        entry = remove_entry(root, name)
        console.print(f"removed {entry.name} ({human_size(entry.nbytes)})", highlight=False)


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
    from ..trunk.cache import default_cache_root, human_size, list_entries, prune_entries

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
