"""``querytune bench``: every method on every task of a suite, side by side.

For each task (a VTAB-1k layout folder; a task folder given as the suite is a suite of one, whose
report puts accuracy and cost in one table) and method and seed, a run is trained on
``train800val200`` and tested on ``test`` (see :func:`querytune.run.train_run`); the
frozen-backbone methods share one feature cache. Each method's training cost
(saved-for-backward bytes, peak memory of a step) is measured once, in a fresh
process. The report folder gets ``results.csv``, ``results.json``, ``report.md`` and
``pareto.png``.

Unless ``--cache`` names a folder to keep, each task's feature cache is private
(``REPORT/feature-cache/<task>``) and deleted once the task is done (its entries are
large: L x N x D float16 values per image).

Every cell is a run folder under ``REPORT/runs/<task>/<method>/seed<k>``, so an
interrupted bench continues where it stopped: finished cells are read back, the
interrupted one resumes from its checkpoint. A cell that fails is reported with its
error and the others go on.

``tasks`` trains only those tasks of the suite, so one bench can be split over processes or
machines that share its folder and its ``--cache`` if any (disjoint tasks each); the report then
covers those tasks, and the same bench run once more without ``tasks`` reads every cell back and
reports them all.

Profiles: ``paper`` uses each method's published protocol; ``quick`` caps the epochs
(:data:`QUICK_EPOCHS`) and scales the warm-up with them. ``search`` first picks the
learning rate and weight decay from the method's grid by accuracy on ``val200`` after
training on ``train800``. A frozen-trunk method's grid, and its seeds, train as stacks
(:mod:`querytune.grid`): one pass over the features per epoch for all of them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import check_normalisation
from .errors import ConfigError, QuerytuneError
from .files import write_json, write_text
from .grid import member_name, search_grid, seed_settings, select_best, train_members
from .measure import measure_method_isolated
from .methods import method_class
from .progress import note
from .recipes import recipe_options
from .report import markdown_report, plot_pareto
from .run import train_run
from .suite import Task, discover_tasks
from .trunk.device import resolve_device, resolve_workers

if TYPE_CHECKING:
    from .backbones.vit import VisionTransformer

# quick profile: epochs for methods whose trunk runs without / with autograd
QUICK_EPOCHS = {True: 20, False: 5}
RESULT_FIELDS = ("task", "group", "method", "seed", "accuracy", "trainable_params", "saved_bytes",
                 "train_peak_bytes", "train_seconds", "lr", "weight_decay", "error", "cost_error")


def profile_settings(method: str, profile: str) -> dict[str, Any]:
    if profile == "paper":
        return {}
    if profile == "quick":
        cls = method_class(method)
        protocol_epochs = cls.train_defaults.get("epochs", 100)
        return {"epochs": min(protocol_epochs, QUICK_EPOCHS[cls.reads.frozen])}
    raise ConfigError(f"unknown profile {profile!r} (known: quick, paper)")


def select_tasks(tasks: list[Task], names: list[str] | None) -> list[Task]:
    """The suite's ``tasks`` named in ``names`` (all when None), in the suite's order."""
    if names is None:
        return tasks
    known = [task.name for task in tasks]
    unknown = [name for name in names if name not in known]
    if not names:
        raise ConfigError(f"--tasks: no task named (known: {', '.join(known)})")
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} not in the suite (known: {', '.join(known)})")
    return [task for task in tasks if task.name in names]


class Bench:
    def __init__(self, suite: Path, methods: list[str], backbone: str, out: Path, *, profile: str = "quick",
                 seeds: int = 1, search: bool = False, image_size: int = 224, bf16: bool = False,
                 groups: dict[str, str] | None = None, recipe: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, cache_dir: Path | None = None,
                 device: str | None = None, workers: int | None = None, show_progress: bool = True,
                 tasks: list[str] | None = None) -> None:
        for method in methods:
            method_class(method)  # unknown names fail before any work
            profile_settings(method, profile)
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
        resolve_device(device), resolve_workers(workers)  # a bad one fails before any work, not in every cell
        self.tasks = discover_tasks(suite, groups)
        self.selected = select_tasks(self.tasks, tasks)
        self.recipe = recipe
        self.normalisation = check_normalisation(mean, std) if mean is not None or std is not None else None
        if recipe:  # an unknown recipe, or a task it does not know, fails before any work
            for task in self.tasks:
                for method in methods:
                    recipe_options(recipe, method_class(method).name, task.name)
        self.methods, self.backbone, self.out = methods, backbone, Path(out)
        self.profile, self.seeds, self.search = profile, seeds, search
        self.image_size, self.bf16 = image_size, bf16
        # Without a cache folder to keep, each task's cache is private and removed once the task is done
        # (per task, so that parts of a bench sharing the folder never remove each other's).
        self.shared_cache = Path(cache_dir) if cache_dir else None
        self.device, self.workers, self.show_progress = device, workers, show_progress
        self.backbone_model: VisionTransformer | None = None
        self.chosen: dict[tuple[str, str], dict[str, float]] = {}  # (task, method) -> the searched lr, weight decay

    def settings(self, method: str) -> dict[str, Any]:
        return {**profile_settings(method, self.profile), "bf16": self.bf16}

    def run_arguments(self, task: Task) -> dict[str, Any]:
        """What every run of the task takes besides its method, folder, splits and training settings."""
        return dict(image_size=self.image_size, recipe=self.recipe, mean=self.normalisation and self.normalisation[0],
                    std=self.normalisation and self.normalisation[1], task_name=task.name,
                    cache_dir=self.cache_dir(task), device=self.device, workers=self.workers,
                    show_progress=self.show_progress)

    def train(self, method: str, task: Task, run: Path, train_split: str, eval_split: str,
              settings: dict[str, Any]) -> dict[str, Any]:
        if (run / "metrics.json").is_file():  # finished in an earlier, interrupted bench
            return json.loads((run / "metrics.json").read_text())
        return train_run(method, self.backbone, task.path, run, train_settings=settings, train_split=train_split,
                         eval_split=eval_split, **self.run_arguments(task))

    @staticmethod
    def stacks(method: str) -> bool:
        """Whether the method's search points and seeds train as stacks (:mod:`querytune.grid`)."""
        return method_class(method).reads.frozen

    def choose_hyperparameters(self, method: str, task: Task) -> dict[str, float]:
        """Grid search: train on train800, pick by val200 accuracy (ties: the smaller learning rate)."""
        base = self.settings(method)
        batch = base.get("batch_size", method_class(method).train_defaults.get("batch_size", 64))
        points = search_grid(method, batch)
        runs = {self.out / "search" / task.name / method / member_name(point): {**base, **point} for point in points}
        if self.stacks(method):
            metrics = train_members(method, self.backbone, task.path, runs, train_split="train800",
                                    eval_split="val200", **self.run_arguments(task))
        else:
            metrics = [self.train(method, task, run, "train800", "val200", settings) for run, settings in runs.items()]
        return select_best([(point, m["val200_accuracy"]) for point, m in zip(points, metrics)])

    def seed_runs(self, method: str, task: Task) -> dict[Path, dict[str, Any]]:
        """The final runs of ``method`` on ``task``, one per seed, with their training settings."""
        settings = self.settings(method)
        if self.search:
            if (task.name, method) not in self.chosen:
                self.chosen[task.name, method] = self.choose_hyperparameters(method, task)
            settings.update(self.chosen[task.name, method])
        runs = self.task_runs(task)[self.methods.index(method) * self.seeds:][:self.seeds]
        if not self.stacks(method):
            return {run: {**settings, "seed": seed} for seed, run in enumerate(runs)}
        return {run: {**settings, **own} for run, own in zip(runs, seed_settings(range(self.seeds)))}

    def train_seeds(self, method: str, task: Task) -> None:
        """Train a stacking method's seeds as one stack; where that fails, each cell retries alone and reports."""
        if not self.stacks(method) or all((run / "metrics.json").is_file() for run in self.seed_runs(method, task)):
            return
        try:
            train_members(method, self.backbone, task.path, self.seed_runs(method, task),
                          train_split="train800val200", eval_split="test", **self.run_arguments(task))
        except Exception:  # noqa: BLE001 - the cells meet the error again and report it
            with open(self.out / "errors.log", "a") as log:
                log.write(f"{task.name}/{method} (seeds stacked)\n{traceback.format_exc()}\n")

    def run(self) -> list[dict[str, Any]]:
        self.claim_folder()
        costs = {method: self.cost(method) for method in self.methods}
        results = []
        for task in self.selected:
            self.prepare_cache(task)
            for method in self.methods:
                self.train_seeds(method, task)
                for seed in range(self.seeds):
                    results.append(self.cell(task, method, seed, costs[method]))
                    self.write(results)
            if self.shared_cache is None:
                shutil.rmtree(self.cache_dir(task), ignore_errors=True)
                with contextlib.suppress(OSError):  # the last part of a bench to finish removes the folder
                    self.cache_dir(task).parent.rmdir()
        return results

    def prepare_cache(self, task: Task) -> None:
        """Build the per-layer feature cache of the task's splits once when any method reads it, so that
        class-token readers (run first or not) reuse it instead of running the trunk again."""
        readers = [m for m in self.methods if method_class(m).reads.with_layers]
        if not readers or all((r / "metrics.json").is_file() for r in self.task_runs(task)):
            return
        from .backbones import load_backbone
        from .trunk.cache import cache_splits

        if self.backbone_model is None:
            self.backbone_model = load_backbone(self.backbone)
            if self.normalisation is not None:
                self.backbone_model.config.mean, self.backbone_model.config.std = self.normalisation
        splits = ["train800val200", "test"] + (["train800", "val200"] if self.search else [])
        try:
            cache_splits(self.cache_dir(task), self.backbone_model, task.path, splits, self.image_size, self.bf16,
                         device=resolve_device(self.device), workers=resolve_workers(self.workers),
                         show_progress=self.show_progress)
        except QuerytuneError:
            pass  # the task's cells meet the same error and report it

    def cache_dir(self, task: Task) -> Path:
        return self.shared_cache or self.out / "feature-cache" / task.name

    def task_runs(self, task: Task) -> list[Path]:
        return [self.out / "runs" / task.name / m / f"seed{s}" for m in self.methods for s in range(self.seeds)]

    def cell(self, task: Task, method: str, seed: int, cost: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"task": task.name, "group": task.group, "method": method, "seed": seed,
                               "trainable_params": cost.get("trainable_params"), "saved_bytes": cost.get("saved_bytes"),
                               "train_peak_bytes": cost.get("train_peak_bytes"), "cost_error": cost.get("error")}
        try:
            run, settings = list(self.seed_runs(method, task).items())[seed]
            metrics = self.train(method, task, run, "train800val200", "test", settings)
            config = json.loads((run / "config.json").read_text())
            row.update(accuracy=metrics["test_accuracy"], train_seconds=metrics["train_seconds"],
                       trainable_params=metrics["trainable_params"], lr=config["train"]["lr"],
                       weight_decay=config["train"]["weight_decay"], recipe=config.get("recipe"))
        except QuerytuneError as error:
            row["error"] = str(error)
        except Exception as error:  # a crashed cell must not end the bench; its error goes into the table
            row["error"] = f"{type(error).__name__}: {error}"
            with open(self.out / "errors.log", "a") as log:
                log.write(f"{task.name}/{method}/seed{seed}\n{traceback.format_exc()}\n")
        return row

    def claim_folder(self) -> None:
        """Record this bench's settings; a folder holding another bench's results is refused, not mixed."""
        settings = {"suite": [str(t.path.resolve()) for t in self.tasks],
                    "groups": {t.name: t.group for t in self.tasks},
                    "backbone": str(self.backbone), "profile": self.profile, "search": self.search,
                    "image_size": self.image_size, "bf16": self.bf16}
        if self.recipe:  # only then: benches from before recipes keep their settings
            settings["recipe"] = self.recipe
        if self.normalisation:
            settings["normalisation"] = [list(self.normalisation[0]), list(self.normalisation[1])]
        path = self.out / "bench.json"
        if path.is_file():
            if json.loads(path.read_text()) != settings:
                raise ConfigError(f"{self.out}: holds a bench with other settings; choose another --out")
            return
        # (a temporary file may be another part of this bench writing bench.json at this moment)
        if self.out.exists() and any(not p.name.endswith(".tmp") for p in self.out.iterdir()):
            raise ConfigError(f"{self.out}: exists, is not empty and is not a querytune bench folder")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)

    def cost(self, method: str) -> dict[str, Any]:
        """Training-step cost at the bench's image size and batch 32, measured once per method."""
        path = self.out / "costs" / f"{method}.json"
        if path.is_file():
            return json.loads(path.read_text())
        note(f"measuring one training step of {method} (batch 32, a fresh process)", self.show_progress)
        result = measure_method_isolated(method, self.backbone, 32, self.image_size, self.bf16, self.device)
        if "error" not in result:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, result)
        return result

    def write(self, results: list[dict[str, Any]]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "results.json", {"profile": self.profile, "backbone": str(self.backbone),
                                               "image_size": self.image_size, "bf16": self.bf16,
                                               "search": self.search, "results": results})
        table = io.StringIO()
        writer = csv.DictWriter(table, RESULT_FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in RESULT_FIELDS} for row in results)
        write_text(self.out / "results.csv", table.getvalue())
        write_text(self.out / "report.md", markdown_report(results, self.selected, self.methods, self.describe()))
        plot_pareto(results, self.methods, self.out / "pareto.png")

    def describe(self) -> str:
        cut = ("quick profile: epochs capped at "
               f"{QUICK_EPOCHS[True]} (frozen-trunk methods) and {QUICK_EPOCHS[False]} (feature-adapting methods), "
               "warm-up a tenth of the run" if self.profile == "quick"
               else "paper profile: each method's published protocol")
        search = ("learning rate and weight decay chosen on train800 -> val200" if self.search
                  else "default hyperparameters")
        recipe = f"; per-task method settings from recipe `{self.recipe}`" if self.recipe else ""
        stacked = (" (frozen-trunk methods: as one stack, in seed 0's data order)" if self.seeds > 1 else "")
        return (f"backbone `{self.backbone}`, {self.image_size} px, {'bf16' if self.bf16 else 'fp32'}; {cut}; "
                f"{search}{recipe}; {self.seeds} seed(s){stacked}; accuracy on `test` after the last epoch.")
