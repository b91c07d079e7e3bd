"""``querytune bench``: the bench's settings (:class:`~querytune.settings.BenchSpec`) and its runtime from the
command line and a ``--config`` file, handed to :class:`querytune.bench.Bench` whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .. import distributed
from ..settings import BenchSpec, Runtime
from .app import app, console
from .configfile import PrintConfigOpt, check_file, config_option, read_settings_file, require, resolve
from .flags import Flags, Given, settings_command, settings_of

BENCH_GROUPS = (Flags(BenchSpec, "Bench"),
                Flags(Runtime, "Runtime", ("device", "workers", "cache", "cache_splits", "progress")))


@app.command()
@settings_command(*BENCH_GROUPS)
def bench(
    given: Given,
    config: Optional[Path] = config_option(),
    print_config: bool = PrintConfigOpt,
    plan: bool = typer.Option(False, "--plan", help="print, per task, the images of each split, the cache bytes to "
                                                   "write, the images through the trunk, the runs to train and the "
                                                   "free disk, and exit", rich_help_panel="Bench"),
) -> None:
    """Train every method on every task of a suite; write results.csv/json, report.md and pareto.png."""
    settings = bench_settings(config, given)
    if print_config:
        print(json.dumps(settings, indent=1))
        return
    from ..bench import Bench
    from ..trunk.cache import human_size

    require(settings, ("suite", "backbone", "out"))
    spec = BenchSpec(**settings_of(BenchSpec, settings))
    runner = Bench(spec, Runtime(**settings_of(Runtime, settings, BENCH_GROUPS[1].only)))
    if plan:
        plans = runner.plan()
        for task_plan in plans:
            console.print(task_plan.line(), soft_wrap=True, highlight=False)
        console.print(f"in all: {human_size(sum(p.cache_bytes for p in plans))} to cache, "
                      f"{sum(p.trunk_images for p in plans):,} images through the trunk, "
                      f"{sum(p.cells for p in plans):,} runs to train", highlight=False)
        return
    results = runner.run()
    if not distributed.is_main():  # under torchrun: rank 0 reports
        return
    failed = sum(1 for r in results if r.get("error"))
    out = Path(str(spec.out))
    console.print((out / "report.md").read_text(), soft_wrap=True)  # piped too: lines whole, not cut at 80
    console.print(f"{len(results) - failed} cells finished, {failed} failed; report in {out}")


def bench_settings(config: Path | None, given: Given) -> dict[str, Any]:
    """bench's resolved settings, as a --config file holds them: the file's (if given) under the flags'."""
    from_file = check_file(config, read_settings_file(config), BENCH_GROUPS) if config is not None else {}
    return resolve(BENCH_GROUPS, from_file, given)
