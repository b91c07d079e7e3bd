"""A learning-rate x weight-decay grid, or several seeds, of one method on one task, trained as
stacks (:func:`querytune.run.train_runs`): one pass over the features per epoch for all members.

Each **member** is an ordinary run folder, exactly what ``querytune train`` with the member's
settings writes (config.json, checkpoint.pt, log.jsonl, adapter, metrics.json), so it can be
evaluated, served, resumed or rerun on its own. Members differ only in learning rate, weight
decay and seed; they share the epochs' order (``TrainConfig.data_seed``: stacked seeds take the
first seed's order), so every step reads one batch for all of them. Each member keeps its own
optimiser, schedule, gradient scaler, random stream (initialisation and dropout), checkpoint, log
and metrics: a member equals its settings trained alone (``train --seed S --data-seed D``).

How the members compute on the shared batch is the method's (``Method.forward_members``): VQT
puts every member's query rows through each block in one ``Block.forward_rows`` call, reading the
layer's tokens once; masked memory does the same with its members' class tokens (each row reading
its own memory only), SynQT with its members' synthesized rows (each member's side network and head
run on their own); linear runs one forward per member on the shared batch.
Methods that adapt the trunk cannot share a backbone and are refused.

The search protocol is VQT's (its ``head2toe_train.py``, ``find_best_lrwd``): train the grid
on train800, score val200 top-1 after the last epoch, take the best (ties to the smaller learning
rate; equal learning rates: the first in the grid's order), then retrain the chosen setting on
train800val200 for each seed and report test top-1 after the last epoch. Its one statement is here:
the stages' splits (:func:`protocol`), the grid's runs (:func:`search_runs`), the choice
(:func:`choose`) and the seeds' runs (:func:`seed_runs`); :func:`train_grid` and the bench
(:mod:`querytune.bench`, which lays the runs out in its own folders) both follow it.

Two rules for small tasks (docs/small-data.md): a method's ``search_options`` cross the grid (its members
may differ in them), and where val200 holds fewer than :data:`FOLDS_BELOW` images ``train_grid`` scores
each point on :data:`FOLDS` folds of train800val200 (:func:`cross_validate`), and so does the bench's search.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .data import open_split
from .data.cuts import fold_lists, write_task
from .data.splits import FINAL, SEARCH, SEARCH_TRAIN, SEARCH_VAL, TRAIN
from .files import write_json
from .methods import method_class
from .run import OPTIONS, train_runs
from .settings import RunSpec, Runtime
from .train import TrainConfig

# A search validates on FOLDS folds of train800val200 where val200 holds fewer than FOLDS_BELOW images: a
# few dozen images score a point too coarsely (one image of 20 is 5 points). Head2Toe's official search
# validates on 5 folds too (its eval_mode='valid').
FOLDS = 5
FOLDS_BELOW = 100


def search_grid(method: str, batch_size: int) -> list[dict[str, Any]]:
    """The method's learning-rate x weight-decay grid (learning rates scaled by batch/256 where the paper does),
    in the official order: learning rates, then weight decays, from the largest; crossed, where the method
    searches options too (``Method.search_options``), with those (a point's ``options``), the default first."""
    cls = method_class(method)
    grid = cls.search_grid
    lrs = [lr * batch_size / 256 for lr in grid["lr"]] if grid.get("scale_lr_by_batch") else list(grid["lr"])
    points: list[dict[str, Any]] = [{"lr": lr, "weight_decay": wd} for lr in lrs for wd in grid["weight_decay"]]
    for name, values in cls.search_options.items():
        points = [{**point, OPTIONS: {**point.get(OPTIONS, {}), name: value}} for value in values for point in points]
    return points


def member_name(point: dict[str, Any]) -> str:
    """A grid point's folder name."""
    options = "".join(f"_{name}{value:g}" for name, value in point.get(OPTIONS, {}).items())
    return f"lr{point['lr']:g}_wd{point['weight_decay']:g}{options}"


def select_best(scored: Sequence[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    """The grid point with the best validation accuracy; ties go to the smaller learning rate (as
    ``find_best_lrwd`` does), then to the earlier point in the grid (the protocol's options first)."""
    best = max(range(len(scored)), key=lambda i: (scored[i][1], -scored[i][0]["lr"], -i))
    return scored[best][0]


def protocol(search: bool) -> list[tuple[str, str]]:
    """The (training split, evaluation split) of each stage on a VTAB-1k task: with ``search``, the grid
    on train800 scored on val200; then the final runs on train800val200, tested on test."""
    return [SEARCH, FINAL] if search else [FINAL]


def search_runs(method: str, settings: dict[str, Any], folder: Path) -> dict[Path, dict[str, Any]]:
    """The search's runs: one member ``folder/lr<lr>_wd<wd>`` per point of the method's grid, with
    ``settings`` under the point (their batch size, or the method's, scales the grid's learning rates
    where its paper does)."""
    batch_size = TrainConfig.for_method(method_class(method), settings).batch_size
    return {folder / member_name(point): {**settings, **point} for point in search_grid(method, batch_size)}


def choose(runs: dict[Path, dict[str, Any]], accuracies: Sequence[float]) -> tuple[dict[str, Any],
                                                                                  list[dict[str, Any]]]:
    """The search's choice from each of its ``runs``' accuracy on val200 (:func:`select_best`), and its
    table: each point with that accuracy."""
    scored = [({key: settings[key] for key in ("lr", "weight_decay", OPTIONS) if key in settings}, accuracy)
              for settings, accuracy in zip(runs.values(), accuracies)]
    return select_best(scored), [{**point, f"{SEARCH_VAL}_accuracy": accuracy} for point, accuracy in scored]


def selection(folds: int) -> str:
    """How a search of ``folds`` folds (:func:`search_folds`) scored its points, as grid.json and the bench's
    search.json state it."""
    return f"{SEARCH_TRAIN} -> {SEARCH_VAL}" if folds == 1 else f"{folds}-fold cross-validation over {TRAIN}"


def search_folds(spec: RunSpec) -> int:
    """How many folds the search validates on: 1 (train800 -> val200) where val200 holds at least
    :data:`FOLDS_BELOW` images or the task is not a VTAB-1k list folder; else :data:`FOLDS`, the folds of
    train800val200 (:func:`cross_validate`)."""
    data = Path(str(spec.data))
    if len(open_split(data, SEARCH_VAL)) >= FOLDS_BELOW or not (data / f"{TRAIN}.txt").is_file():
        return 1
    return FOLDS


def fold_runs(method: str, settings: dict[str, Any], folder: Path, folds: int) -> list[dict[Path, dict[str, Any]]]:
    """The k-fold search's runs, per fold: the grid's members (:func:`search_runs`) under ``folder/fold<i>``."""
    return [search_runs(method, settings, folder / f"fold{fold}") for fold in range(folds)]


def cross_validate(spec: RunSpec, settings: dict[str, Any], folder: Path, folds: int, runtime: Runtime | None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The search on ``folds`` folds of the task's train800val200: each fold a task folder of links
    (``folder/folds/fold<i>/<task>``, :func:`querytune.data.cuts.fold_lists`: its train800 the other folds, its
    val200 this one, no test list) and its grid as one stack (``folder/fold<i>/<point>``); each point scored
    by its mean val200 accuracy over the folds (:func:`choose`). The choice and the table, each point with
    its accuracy on every fold."""
    task = Path(str(spec.data))
    per_fold = []
    for fold, runs in enumerate(fold_runs(str(spec.method), settings, folder, folds)):
        data = write_task(task, folder / "folds" / f"fold{fold}", fold_lists(task, folds, fold))
        metrics = train_runs(replace(spec, data=str(data), train_split=SEARCH_TRAIN, eval_split=SEARCH_VAL),
                             runs, runtime)
        per_fold.append([m[f"{SEARCH_VAL}_accuracy"] for m in metrics])
    by_point = list(zip(*per_fold))
    chosen, table = choose(runs, [statistics.mean(accuracies) for accuracies in by_point])
    return chosen, [{**row, "fold_accuracies": list(accuracies)} for row, accuracies in zip(table, by_point)]


def seed_runs(folders: Sequence[Path], settings: dict[str, Any], seeds: Sequence[int],
              stacked: bool = True) -> dict[Path, dict[str, Any]]:
    """The final runs, one per seed in its folder, with ``settings`` (the search's choice among them):
    stacked, every seed reads the first seed's order (which is its own); alone, each its own."""
    return {folder: {**settings, "seed": seed, "data_seed": seeds[0] if stacked and seed != seeds[0] else None}
            for folder, seed in zip(folders, seeds)}


def train_grid(spec: RunSpec, out: str | Path, train: dict[str, Any] | None = None, runtime: Runtime | None = None,
               *, search: bool, seeds: Sequence[int], folds: int | None = None) -> dict[str, Any]:
    """``querytune train --grid`` / ``--seeds N``: with ``search``, the method's grid as one stack on
    train800 -> val200 (``OUT/search/lr<lr>_wd<wd>``) and the best point chosen (:func:`choose`);
    then the chosen (or given) settings for every seed as one stack on the spec's splits
    (``OUT/seed<s>``). Writes and returns ``OUT/grid.json``: the search's table, the choice, each
    seed's accuracy, their mean and spread. ``folds``: the search's folds (default: :func:`search_folds`)."""
    out = Path(out)
    settings = dict(train or {})
    chosen: dict[str, Any] = {}
    searched: list[dict[str, Any]] = []
    folds = (folds or search_folds(spec)) if search else 0
    if folds == 1:
        runs = search_runs(str(spec.method), settings, out / "search")
        metrics = train_runs(replace(spec, train_split=SEARCH_TRAIN, eval_split=SEARCH_VAL), runs, runtime)
        chosen, searched = choose(runs, [m[f"{SEARCH_VAL}_accuracy"] for m in metrics])
    elif folds:
        chosen, searched = cross_validate(spec, settings, out / "search", folds, runtime)
    runs = seed_runs([out / f"seed{seed}" for seed in seeds], {**settings, **chosen}, seeds)
    metrics = train_runs(spec, runs, runtime)
    accuracies = [m.get(f"{spec.eval_split}_accuracy") for m in metrics]
    known = [a for a in accuracies if a is not None]
    summary = {"method": metrics[0]["method"], "task": metrics[0]["task"],
               "selection": selection(folds) if search else None,
               "search": searched, "chosen": chosen,
               "seeds": [{"seed": seed, "run": str(run), "accuracy": accuracy}
                         for seed, run, accuracy in zip(seeds, runs, accuracies)],
               "eval_split": spec.eval_split,
               "mean_accuracy": statistics.mean(known) if known else None,
               "std_accuracy": statistics.stdev(known) if len(known) > 1 else None}
    write_json(out / "grid.json", summary)
    return summary
