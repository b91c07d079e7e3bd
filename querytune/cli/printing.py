"""What the commands print: metrics, the grid's search and seeds, the methods, a backbone, cache entries."""

from __future__ import annotations

import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from ..data.splits import SEARCH_TRAIN, SEARCH_VAL
from ..options import ImageSize, flag
from .app import console

if TYPE_CHECKING:
    from ..backbones.vit import VisionTransformer
    from ..trunk.cache.housekeeping import CacheEntry


def print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(show_header=False)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def print_grid_summary(summary: dict[str, Any], out: Path) -> None:
    """``train --grid`` / ``--seeds``: the search's table (the chosen point marked), each seed, their mean."""
    if summary["search"]:
        table = Table("lr", "weight decay", f"{SEARCH_VAL} accuracy", "",
                      title=f"search ({SEARCH_TRAIN} -> {SEARCH_VAL})")
        for row in summary["search"]:
            chosen = row["lr"] == summary["chosen"]["lr"] and row["weight_decay"] == summary["chosen"]["weight_decay"]
            table.add_row(f"{row['lr']:g}", f"{row['weight_decay']:g}", f"{row[f'{SEARCH_VAL}_accuracy']:.4f}",
                          "chosen" if chosen else "")
        console.print(table)
    table = Table("seed", f"{summary['eval_split']} accuracy", "run", title="seeds")
    for row in summary["seeds"]:
        table.add_row(str(row["seed"]), "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}", row["run"])
    console.print(table)
    if summary["mean_accuracy"] is not None:
        spread = f" +- {summary['std_accuracy']:.4f}" if summary["std_accuracy"] is not None else ""
        console.print(f"mean {summary['eval_split']} accuracy {summary['mean_accuracy']:.4f}{spread} over "
                      f"{len(summary['seeds'])} seed(s); summary in {out / 'grid.json'}")


def print_methods() -> None:
    """Each method: what it reads from the trunk, its options and their defaults."""
    from ..methods import METHODS

    table = Table("method", "reads", "options (default)")
    for name, cls in sorted(METHODS.items()):
        options = [f"{flag(f.name)} ({f.default if f.default is not MISSING else ''}): {f.metadata.get('help', '')}"
                   for f in fields(cls.Options)]
        table.add_row(name, cls.reads.value, "\n".join(options) or "none")
    console.print(table)


def print_backbone(model: VisionTransformer, size: ImageSize = ImageSize(224, 224)) -> None:
    """A backbone's architecture, parameter count, input size, its tokens at ``size`` and normalisation."""
    cfg = model.config
    table = Table(title=cfg.name, show_header=False)
    rows = [
        ("width (D)", cfg.embed_dim), ("depth (L)", cfg.depth), ("heads", cfg.num_heads),
        ("patch size", cfg.patch_size), ("MLP ratio", cfg.mlp_ratio), ("LayerScale", cfg.layer_scale),
        ("register tokens", cfg.num_reg_tokens),
        ("native input size", f"{cfg.image_size} px ({cfg.grid_size}x{cfg.grid_size} patches)"),
        (f"tokens at {size.recorded} px", cfg.num_tokens((size.height, size.width))),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("normalisation", f"mean {cfg.mean}, std {cfg.std}" if cfg.mean is not None
         else "unknown: its checkpoint names none (runs give --mean and --std)"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def print_cache_entries(entries: list[CacheEntry], root: Path) -> None:
    """Plain aligned columns, never wrapped, easy to grep: task and split, backbone, images, size, last use."""
    from ..trunk.cache import human_size

    rows = [("entry", "task/split", "backbone", "images", "size", "last used")]
    for entry in entries:
        meta = entry.meta or {}
        rows.append((entry.name, f"{meta['task']}/{meta['split']}" if meta else "(incomplete)",
                     meta.get("backbone", ""), str(meta.get("num_images", "")), human_size(entry.nbytes),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, "
          f"{human_size(sum(e.nbytes for e in entries))} in {root}")
