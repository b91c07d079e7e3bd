"""``querytune train`` and ``querytune eval``: the run, runtime and training settings from the command line
and a ``--config`` file, built once into a :class:`~querytune.settings.RunSpec`, a
:class:`~querytune.settings.Runtime` and the training settings given, and handed to
:func:`querytune.run.train_run` (or :func:`querytune.grid.train_grid`) whole."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from .. import distributed
from ..data.splits import TEST
from ..errors import ConfigError
from ..options import option
from ..settings import RunSpec, Runtime
from ..train import TrainConfig
from .app import app, console
from .configfile import (
    PrintConfigOpt,
    check_file,
    config_option,
    from_run_config,
    read_settings_file,
    require,
    resolve,
)
from .flags import Flags, Given, parse_method_options, setting_help, settings_command, settings_of
from .printing import print_grid_summary, print_metrics


@dataclass
class TrainCommand:
    """What ``train`` takes besides the run, the runtime and the training settings (keys of its --config too)."""

    out: str | None = option(None, "run folder (resumed if it holds an unfinished run)", short="-o")
    no_cache: bool = option(False, "run the frozen trunk every epoch instead of caching its features")
    grid: bool = option(False, "search the method's lr x weight-decay grid on train800 -> val200 as one stack "
                               "(OUT/search), then retrain the best (OUT/seed<s>)")
    seeds: int | None = option(None, "train seeds --seed .. --seed+N-1 as one stack (OUT/seed<s>), sharing the first "
                                     "seed's data order", min=1)
    folds: int | None = option(None, "--grid: score each point on this many folds of train800val200 (1: train800 -> "
                                     "val200; default: 5 where val200 holds fewer than 100 images, else 1)", min=1)


TRAIN_GROUPS = (Flags(RunSpec, "Run"), Flags(TrainCommand, "Run"), Flags(Runtime, "Runtime"))
TRAINING = Flags(TrainConfig, "Training", method_defaults=True)
EVAL_RUNTIME = Flags(Runtime, "Runtime", ("device", "workers", "cache", "cache_placement", "progress"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@settings_command(*TRAIN_GROUPS, TRAINING)
def train(
    ctx: typer.Context,
    given: Given,
    config: Optional[Path] = config_option(" (a run's config.json replays the run)"),
    print_config: bool = PrintConfigOpt,
) -> None:
    """Train a method on a task and report its test accuracy. The method options (below) come from
    the method registry; each applies to the methods it names."""
    settings = train_settings(config, given, list(ctx.args))
    if print_config:
        print(json.dumps(with_recipe_options(settings), indent=1))
        return
    spec, runtime, command = train_objects(settings)
    start_training(spec, runtime, command, settings["train"])


def train_settings(config: Path | None, given: Given, method_args: list[str]) -> dict[str, Any]:
    """train's resolved settings, as a --config file holds them: the file's (if given) under the flags',
    the method's options under ``options`` and the training settings given under ``train``."""
    from_file: dict[str, Any] = {}
    if config is not None:
        from_file = check_file(config, from_run_config(read_settings_file(config)), TRAIN_GROUPS,
                               {"options": None, "train": TRAINING})
    options, train = from_file.pop("options", {}), from_file.pop("train", {})
    return {**resolve(TRAIN_GROUPS, from_file, given), "options": {**options, **parse_method_options(method_args)},
            "train": {**train, **given[TrainConfig]}}


def with_recipe_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with a --recipe's options for the task under the options given, as the run takes them."""
    if not (settings["recipe"] and settings["method"] and (settings["task_name"] or settings["data"])):
        return settings
    from ..methods import method_class
    from ..recipes import recipe_options

    task = settings["task_name"] or Path(os.path.abspath(Path(settings["data"]).expanduser())).name
    return {**settings, "options": {**recipe_options(settings["recipe"], method_class(settings["method"]).name, task),
                                    **settings["options"]}}


def train_objects(settings: dict[str, Any]) -> tuple[RunSpec, Runtime, TrainCommand]:
    """What the run is, where it runs and train's own settings, from the resolved settings."""
    from ..trunk.cache import default_cache_root

    require(settings, ("method", "backbone", "data", "out"))
    command = TrainCommand(**settings_of(TrainCommand, settings))
    if command.no_cache and (settings["cache"] is not None or settings["cache_splits"] is not None):
        raise ConfigError(f"{'--cache' if settings['cache'] is not None else '--cache-splits'} and --no-cache "
                          "exclude each other")
    spec = RunSpec(**{**settings_of(RunSpec, settings), "eval_split": settings["eval_split"] or None},
                   options=dict(settings["options"]))
    cache = None if command.no_cache else settings["cache"] or str(default_cache_root())
    return spec, Runtime(**{**settings_of(Runtime, settings), "cache": cache}), command


def start_training(spec: RunSpec, runtime: Runtime, command: TrainCommand, train: dict[str, Any]) -> None:
    """A lone run, or with --grid / --seeds a stack of them (:mod:`querytune.grid`); print the outcome."""
    out = Path(str(command.out))
    if command.grid or command.seeds is not None:
        from ..grid import train_grid

        first = train.get("seed") or 0
        summary = train_grid(spec, out, train, runtime, search=command.grid,
                             seeds=[first + i for i in range(command.seeds or 1)], folds=command.folds)
        print_grid_summary(summary, out)
        return
    from ..run import train_run

    metrics = train_run(spec, out, train, runtime)
    if distributed.is_main():
        print_metrics(metrics)


@app.command("eval")
@settings_command(EVAL_RUNTIME)
def eval_command(
    given: Given,
    runs: list[Path] = typer.Option(..., "--run", "-r", help="a finished run folder; repeat for several, evaluated "
                                                           "together (the frozen-trunk ones in one trunk pass)"),
    data: Path = typer.Option(..., "--data", "-d", help=setting_help(RunSpec, "data")),
    split: str = typer.Option(TEST, help="the split to report the accuracy on"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b",
                                           help=setting_help(RunSpec, "backbone", "; default: the run's own")),
) -> None:
    """Evaluate saved adapters on a split; prints each run's accuracy."""
    from ..run import eval_runs

    accuracies = eval_runs(runs, data, split, Runtime(**given[Runtime]), backbone=backbone)
    if distributed.is_main():
        for run, accuracy in zip(runs, accuracies):
            console.print(f"{split} accuracy: {accuracy:.4f}" + (f"  {run}" if len(runs) > 1 else ""), soft_wrap=True,
                          highlight=False)
