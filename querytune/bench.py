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
(:data:`QUICK_EPOCHS`), scales the warm-up with them and floors a small training split at the steps they take
on 800 images, as the protocols' epochs are floored (:meth:`TrainConfig.floored`). ``search`` first picks the
learning rate and weight decay from the method's grid by accuracy on ``val200`` after
training on ``train800``, or, where val200 is tiny, by the mean accuracy over the folds of ``train800val200``
(:func:`querytune.grid.search_folds`, as ``train --grid``). A frozen-trunk method's grid, and its seeds, train as stacks
(:mod:`querytune.grid`): one pass over the features per epoch for all of them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed, grid
from .backbones import load_backbone
from .data import Preprocess, check_normalisation, open_split
from .data.splits import FINAL, SEARCH
from .errors import ConfigError, DataError, QuerytuneError, StorageError
from .files import LOCK_FILE, folder_lock, write_json, write_text
from .measure import measure_method_isolated
from .methods import method_class
from .progress import note
from .recipes import recipe_options
from .report import markdown_report, plot_pareto
from .run import cached_splits, entry_splits, eval_runs, train_runs
from .runfolder import read_metrics, read_run_config, record_accuracy, setting_differences
from .settings import BenchSpec, RunSpec, Runtime
from .suite import SuiteTask, discover_tasks, read_groups_file
from .train import FLOOR_IMAGES, TrainConfig, floor_steps
from .trunk.cache import Building, CacheKey, cache_splits, human_size, read_meta
from .trunk.cache.build import SHARD_SIZE, entry_nbytes
from .trunk.cache.entry import feature_shapes, shard_rows
from .trunk.precision import resolve_precision

if TYPE_CHECKING:
    from .backbones.vit import VisionTransformer

BENCH_SPLITS = tuple(split for stage in grid.protocol(search=True) for split in stage)  # what --cache-splits may name
RANKS_WAIT = timedelta(days=7)  # how long a bench's rank done with its tasks waits for the others
# quick profile: epochs for methods whose trunk runs without / with autograd
QUICK_EPOCHS = {True: 20, False: 5}
RESULT_FIELDS = ("task", "group", "method", "seed", "accuracy", "trainable_params", "saved_bytes",
                 "train_peak_bytes", "train_seconds", "lr", "weight_decay", "options", "error", "cost_error")


def searched_options(method: str, options: dict[str, Any]) -> str | None:
    """A run's values of the options its method's search chooses (``Method.search_options``), as
    ``name=value;...`` for the results table; None where the method searches none."""
    return ";".join(f"{name}={options[name]:g}" for name in method_class(method).search_options) or None


def profile_settings(method: str, profile: str) -> dict[str, Any]:
    if profile == "paper":
        return {}
    cls = method_class(method)  # quick, the only other profile (BenchSpec.profile's choices)
    protocol = TrainConfig.for_method(cls, {})
    epochs = min(protocol.epochs, QUICK_EPOCHS[cls.reads.frozen])
    # the capped epochs keep a floor, as the protocol's do: the steps they take on a VTAB-1k search split
    return {"epochs": epochs, "min_steps": floor_steps(epochs, protocol.batch_size)}


def select_tasks(tasks: list[SuiteTask], names: list[str] | None) -> list[SuiteTask]:
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


def parse_groups(text: str | None) -> dict[str, str] | None:
    """``--groups``: a '<task> <group>' file, or 'task=group,...'."""
    if not text:
        return None
    if Path(text).is_file():
        return read_groups_file(Path(text))
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError as error:
        raise ConfigError(f"--groups {text!r}: expected a file or 'task=group,...'") from error


@dataclass
class TaskPlan:
    """What a bench will do for one task, before any work: the images of each split, the feature-cache
    bytes it will write, the images it will put through the trunk, the runs it will train, and the
    free disk where its cache goes."""

    task: str
    images: dict[str, int]
    cache_bytes: int
    trunk_images: int
    cells: int
    cache_dir: Path
    free_bytes: int
    search_folds: int = 0  # 0: no search; 1: train800 -> val200; k: k folds of train800val200

    def line(self) -> str:
        splits = ", ".join(f"{split} {count:,}" for split, count in self.images.items())
        folds = (f"; the search on {self.search_folds} folds of {FINAL[0]} ({SEARCH[1]} under "
                 f"{grid.FOLDS_BELOW} images)" if self.search_folds > 1 else "")
        return (f"{self.task}: {splits} images; cache {human_size(self.cache_bytes)} to write "
                f"({human_size(self.free_bytes)} free in {self.cache_dir}); {self.trunk_images:,} images through "
                f"the trunk; {self.cells} runs to train{folds}")


def trained(run: Path) -> bool:
    """Whether the run folder holds a finished run (its metrics.json)."""
    return (run / "metrics.json").is_file()


def evaluated(run: Path, split: str) -> bool:
    """Whether the finished run's metrics.json holds its accuracy on ``split``."""
    return trained(run) and f"{split}_accuracy" in read_metrics(run)


def describe_error(error: Exception) -> str:
    return str(error) if isinstance(error, QuerytuneError) else f"{type(error).__name__}: {error}"


class Bench:
    """The bench ``spec`` computed under ``runtime`` (whose ``cache``, where given, is a feature cache
    to keep; ``cache_splits``, where given, the splits to cache: :meth:`cached_splits`)."""

    def __init__(self, spec: BenchSpec, runtime: Runtime | None = None) -> None:
        missing = [flag for flag, value in (("--suite", spec.suite), ("--backbone", spec.backbone),
                                            ("--out", spec.out)) if value is None]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)}")
        runtime = runtime or Runtime()
        for method in spec.methods:
            method_class(method)  # unknown names fail before any work
        self.device, self.workers = runtime.torch_device, runtime.num_workers  # a bad one fails here, not per cell
        self.precision, self.precision_reason = resolve_precision(spec.precision, self.device)
        unknown = sorted(set(runtime.cache_splits or ()) - set(BENCH_SPLITS))
        if unknown:
            raise ConfigError(f"--cache-splits {unknown[0]!r}: not a split a bench reads ({', '.join(BENCH_SPLITS)})")
        self.tasks = discover_tasks(Path(str(spec.suite)), parse_groups(spec.groups))
        self.selected = select_tasks(self.tasks, spec.tasks)
        self.normalisation = (check_normalisation(spec.mean, spec.std)
                              if spec.mean is not None or spec.std is not None else None)
        if spec.recipe:  # an unknown recipe, or a task it does not know, fails before any work
            for task in self.tasks:
                for method in spec.methods:
                    recipe_options(spec.recipe, method_class(method).name, task.name)
        self.spec, self.runtime = spec, runtime
        self.methods, self.backbone, self.out = spec.methods, str(spec.backbone), Path(str(spec.out))
        self.seeds = spec.seeds
        self.backbone_model: VisionTransformer | None = None
        self.chosen: dict[tuple[str, str], dict[str, Any]] = {}  # (task, method) -> the search's choice

    def settings(self, method: str) -> dict[str, Any]:
        floor = {} if self.spec.min_steps is None else {"min_steps": self.spec.min_steps}
        return {**profile_settings(method, self.spec.profile), **floor, "precision": self.precision.value}

    def run_spec(self, method: str, task: SuiteTask, train_split: str) -> RunSpec:
        """A run of the task, trained without evaluating it (:meth:`evaluate` does, for all of them at once)."""
        spec = self.spec
        return RunSpec(backbone=self.backbone, image_size=spec.image_size, mean=spec.mean, std=spec.std,
                       recipe=spec.recipe, method=method, data=str(task.path), train_split=train_split,
                       eval_split="", task_name=task.name)

    def task_runtime(self, task: SuiteTask, *splits: str) -> Runtime:
        """The runtime of the task's runs that read ``splits``: its feature cache, for those of them the bench
        caches. Without a cache folder to keep, each task's cache is private and removed once the task is
        done (per task, so that parts of a bench sharing the folder never remove each other's)."""
        cached = [split for split in splits if split in self.cached_splits()]
        return replace(self.runtime, cache=str(self.cache_dir(task)), cache_splits=cached)

    @staticmethod
    def stacks(method: str) -> bool:
        """Whether the method's search points and seeds train as stacks (:mod:`querytune.grid`)."""
        return method_class(method).reads.frozen

    def train(self, method: str, task: SuiteTask, runs: dict[Path, dict[str, Any]], train_split: str,
              errors: dict[Path, str]) -> None:
        """Train the unfinished ``runs`` of ``method``, without evaluating them (:meth:`evaluate` does,
        for every run of the task at once): a frozen-trunk method's as one stack, where that fails each
        alone. A run that fails gets its error in ``errors``; the others go on."""
        pending = {run: settings for run, settings in runs.items() if not trained(run)}
        batches = [pending] if self.stacks(method) and len(pending) > 1 else [{r: s} for r, s in pending.items()]
        for batch in batches:
            try:
                train_runs(self.run_spec(method, task, train_split), batch, self.task_runtime(task, train_split))
            except Exception as error:  # a failed run must not end the bench; its error goes into the table
                self.log_error(f"{task.name}/{method} ({', '.join(run.name for run in batch)})", error)
                if len(batch) == 1:
                    errors.update(dict.fromkeys(batch, describe_error(error)))
                    continue
                for run, settings in batch.items():  # each run meets the error again alone, or trains
                    self.train(method, task, {run: settings}, train_split, errors)

    def evaluate(self, task: SuiteTask, runs: list[Path], split: str, errors: dict[Path, str]) -> None:
        """The accuracy on ``split`` of every trained run of the task that lacks it, measured together
        (:func:`querytune.run.eval_runs`: one pass of the split through the frozen trunk for all the
        frozen-trunk runs), recorded in each run's metrics.json."""
        todo = [run for run in runs if run not in errors and trained(run) and not evaluated(run, split)]
        if not todo:
            return
        try:
            accuracies = eval_runs(todo, task.path, split, self.task_runtime(task, split))
        except Exception as error:  # reported in every run's cell
            self.log_error(f"{task.name} (evaluating on {split})", error)
            errors.update(dict.fromkeys(todo, describe_error(error)))
            return
        for run, accuracy in zip(todo, accuracies):
            record_accuracy(run, split, accuracy)

    def search_folds(self, task: SuiteTask) -> int:
        """The folds the task's search validates on (:func:`querytune.grid.search_folds`): 1 (train800 -> val200),
        or k where val200 is too small."""
        return grid.search_folds(self.run_spec(self.methods[0], task, SEARCH[0]))

    def search_folder(self, task: SuiteTask, method: str) -> Path:
        return self.out / "search" / task.name / method

    def search_runs(self, method: str, task: SuiteTask) -> dict[Path, dict[str, Any]]:
        """The search's runs of ``method`` on ``task``: its grid (:func:`querytune.grid.search_runs`), on every
        fold where the search folds (:func:`querytune.grid.fold_runs`)."""
        folds, settings, folder = self.search_folds(task), self.settings(method), self.search_folder(task, method)
        if folds == 1:
            return grid.search_runs(method, settings, folder)
        return {run: point for runs in grid.fold_runs(method, settings, folder, folds) for run, point in runs.items()}

    def choose_hyperparameters(self, task: SuiteTask, errors: dict[Path, str]) -> None:
        """The search of every method (:mod:`querytune.grid`'s protocol): train each grid on train800,
        evaluate all of them on val200 at once, and choose each method's point; where val200 is too small,
        each method's grid on the folds of train800val200 instead (:func:`querytune.grid.cross_validate`)."""
        folds = self.search_folds(task)
        if folds > 1:
            for method in self.methods:
                self.cross_validate(method, task, folds, errors)
            return
        train_split, eval_split = SEARCH
        grids = {method: self.search_runs(method, task) for method in self.methods}
        for method, runs in grids.items():
            self.train(method, task, runs, train_split, errors)
        self.evaluate(task, [run for runs in grids.values() for run in runs], eval_split, errors)
        for method, runs in grids.items():
            if not any(run in errors for run in runs):
                accuracies = [read_metrics(run)[f"{eval_split}_accuracy"] for run in runs]
                self.record_choice(task, method, 1, *grid.choose(runs, accuracies))

    def cross_validate(self, method: str, task: SuiteTask, folds: int, errors: dict[Path, str]) -> None:
        """``method``'s search on ``folds`` folds of the task's train800val200 (:func:`querytune.grid.cross_validate`,
        each fold's grid as one stack), and its choice; an error goes to every run of its search."""
        try:
            self.record_choice(task, method, folds, *grid.cross_validate(
                self.run_spec(method, task, SEARCH[0]), self.settings(method), self.search_folder(task, method), folds,
                self.task_runtime(task, *SEARCH)))
        except Exception as error:  # a failed search must not end the bench; its error goes into the table
            self.log_error(f"{task.name}/{method} (search on {folds} folds)", error)
            errors.update(dict.fromkeys(self.search_runs(method, task), describe_error(error)))

    def record_choice(self, task: SuiteTask, method: str, folds: int, chosen: dict[str, Any],
                      table: list[dict[str, Any]]) -> None:
        """Keep the search's choice for the final runs, and write it with its table (each point's validation
        accuracy, and on every fold where it folds) to ``search/<task>/<method>/search.json``, as
        ``train --grid``'s grid.json has them."""
        self.chosen[task.name, method] = chosen
        write_json(self.search_folder(task, method) / "search.json",
                   {"selection": grid.selection(folds), "chosen": chosen, "search": table})

    def seed_runs(self, method: str, task: SuiteTask) -> dict[Path, dict[str, Any]]:
        """The final runs of ``method`` on ``task``, one per seed, with their training settings
        (:func:`querytune.grid.seed_runs`)."""
        settings = {**self.settings(method), **self.chosen.get((task.name, method), {})}
        return grid.seed_runs(self.seed_folders(task, method), settings, range(self.seeds), self.stacks(method))

    def run(self) -> list[dict[str, Any]]:
        """Every cell of the selected tasks, trained, evaluated and reported (what is finished is read back).
        Under torchrun each rank takes whole tasks (task i: rank i mod N) and trains them on its own; rank 0
        then reads every cell back and writes the report (the others return no rows). Rank 0 holds the
        folder meanwhile: a second bench on it is refused, naming the first."""
        first_rank = os.environ.get("RANK", "0") == "0"  # torchrun's, before the process group is joined
        with folder_lock(self.out, self.refuse_busy) if first_rank else contextlib.nullcontext():
            return self.run_locked()

    def refuse_busy(self, holder: str) -> None:
        raise ConfigError(f"{self.out}: another bench is running in it ({holder}); wait for it to end or choose "
                          "another --out")

    def run_locked(self) -> list[dict[str, Any]]:
        plans = self.plan()  # every selected task's splits read: a suite that cannot be is refused, nothing written
        if not distributed.launched():
            self.claim_folder()
            return self.run_tasks(self.selected, plans, {method: self.cost(method) for method in self.methods})
        device = distributed.init_from_env(self.device, timeout=RANKS_WAIT)
        self.device, self.runtime = device, replace(self.runtime, device=str(device))
        rank, world = distributed.rank(), distributed.world_size()
        for turn in (0, 1):  # rank 0 records the bench's settings before the others compare theirs
            if (rank == 0) == (turn == 0):
                self.claim_folder()
            distributed.barrier()
        mine = self.selected[rank::world]
        with distributed.alone():
            self.run_tasks(mine, [plan for plan in plans if plan.task in {task.name for task in mine}], {},
                           report=False)
        distributed.barrier()  # every task done (a killed rank ends them all; the next run resumes its cells)
        results = []
        if rank == 0:
            with distributed.alone():
                results = self.run_tasks(self.selected, self.plan(),
                                         {method: self.cost(method) for method in self.methods})
        distributed.barrier()
        return results

    def run_tasks(self, tasks: list[SuiteTask], plans: list[TaskPlan], costs: dict[str, dict[str, Any]],
                  report: bool = True) -> list[dict[str, Any]]:
        """Run ``tasks`` (whose :meth:`plan` is ``plans``) one after the other; with ``report``, write the report
        after each."""
        note(f"precision {self.precision} ({self.precision_reason}); plan:\n" + "\n".join(p.line() for p in plans),
             self.runtime.progress)
        results = []
        for task in tasks:
            results.extend(self.run_task(task, costs))
            if report:
                self.write(results)
            if self.runtime.cache is None:
                shutil.rmtree(self.cache_dir(task), ignore_errors=True)
                with contextlib.suppress(OSError):  # the last part of a bench to finish removes the folder
                    self.cache_dir(task).parent.rmdir()
        return results

    def run_task(self, task: SuiteTask, costs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Train and evaluate every cell of the task (what is finished is read back); its rows."""
        errors: dict[Path, str] = {}
        train_split, test_split = FINAL
        self.prepare_cache(task)
        if self.spec.search:
            self.choose_hyperparameters(task, errors)
        seed_runs: dict[str, dict[Path, dict[str, Any]]] = {}
        for method in self.methods:
            seed_runs[method] = self.seed_runs(method, task)
            if self.spec.search and (task.name, method) not in self.chosen:
                failed = next(errors[run] for run in self.search_runs(method, task) if run in errors)
                errors.update(dict.fromkeys(seed_runs[method], f"search: {failed}"))
                continue
            self.train(method, task, seed_runs[method], train_split, errors)
        self.evaluate(task, [run for runs in seed_runs.values() for run in runs], test_split, errors)
        return [self.cell(task, method, seed, run, costs.get(method, {}), errors)
                for method, runs in seed_runs.items() for seed, run in enumerate(runs)]

    def prepare_cache(self, task: SuiteTask) -> None:
        """Build the per-layer feature cache of the task's cached splits (:meth:`cached_splits`) once when
        any method reads it, so that class-token readers reuse it instead of running the trunk again."""
        readers = [m for m in self.methods if method_class(m).reads.with_layers]
        if not readers or all(trained(r) for r in self.task_runs(task)):
            return
        try:
            cache_splits(self.cache_dir(task), self.backbone_for_cache(), task.path, self.entry_splits(),
                         self.spec.image_size, self.precision,
                         Building(device=self.device, workers=self.workers, show_progress=self.runtime.progress))
        except QuerytuneError:
            pass  # the task's cells meet the same error and report it

    def backbone_for_cache(self) -> VisionTransformer:
        if self.backbone_model is None:
            self.backbone_model = load_backbone(self.backbone)
            if self.normalisation is not None:
                self.backbone_model.config.mean, self.backbone_model.config.std = self.normalisation
        return self.backbone_model

    def plan(self, tasks: list[SuiteTask] | None = None) -> list[TaskPlan]:
        """The :class:`TaskPlan` of each of ``tasks`` (default: the selected ones); finished runs and cache
        entries already built count as done. Tasks whose splits cannot be read are refused together, and
        a task whose cache would not fit in the free disk is refused (one line), before any work."""
        backbone = self.backbone_for_cache()
        preprocess = Preprocess.for_backbone(backbone, self.spec.image_size)
        frozen = [m for m in self.methods if self.stacks(m)]
        with_layers = any(method_class(m).reads.with_layers for m in frozen)
        shapes = feature_shapes(backbone, preprocess, with_layers)
        plans, shared_bytes, unreadable = [], 0, []
        cached = self.cached_splits()
        for task in self.selected if tasks is None else tasks:
            try:
                images = {split: open_split(task.path, split) for split in self.splits_read()}
            except DataError as error:
                unreadable.append(str(error))
                continue
            cells = trunk = 0
            frozen_evaluated, frozen_trained = set(), False
            for train_split, eval_split in grid.protocol(self.spec.search):
                for method in self.methods:
                    runs = list(self.stage_runs((train_split, eval_split), method, task))
                    pending = [run for run in runs if not trained(run)]
                    unevaluated = [run for run in runs if not evaluated(run, eval_split)]
                    cells += len(pending)
                    train_images = len(images[train_split])
                    config = TrainConfig.for_method(method_class(method), self.settings(method))
                    epochs = config.floored(train_images).epochs  # as run.train_runs floors them
                    if method in frozen:
                        frozen_trained |= bool(pending)
                        if pending and train_split not in cached:  # a stack reads each batch once
                            trunk += epochs * train_images
                        if unevaluated:
                            frozen_evaluated.add(eval_split)
                    else:  # each run puts its images through its own trunk, every epoch
                        trunk += len(pending) * epochs * train_images + len(unevaluated) * len(images[eval_split])
            trunk += sum(len(images[split]) for split in frozen_evaluated if split not in cached)
            cache_bytes = 0
            if frozen_trained:
                for split in self.entry_splits():
                    entry = CacheKey(backbone, images[split], preprocess, with_layers,
                                     self.precision).folder(self.cache_dir(task))
                    if read_meta(entry) is None:
                        cache_bytes += entry_nbytes(shapes, shard_rows(len(images[split]), SHARD_SIZE))
                        trunk += len(images[split])
            cache_dir = self.cache_dir(task)
            folder = next(p for p in (cache_dir, *cache_dir.parents) if p.exists())
            plan = TaskPlan(task.name, {split: len(found) for split, found in images.items()}, cache_bytes, trunk,
                            cells, cache_dir, shutil.disk_usage(folder).free,
                            self.search_folds(task) if self.spec.search else 0)
            shared_bytes = shared_bytes + cache_bytes if self.runtime.cache is not None else cache_bytes
            if shared_bytes > plan.free_bytes:
                raise StorageError(f"bench: task {task.name}: its feature cache needs {human_size(shared_bytes)}, "
                                   f"{human_size(plan.free_bytes)} free in {folder}; give --cache a folder on a "
                                   "larger disk")
            plans.append(plan)
        if unreadable:
            raise DataError("; ".join(unreadable))
        return plans

    def splits_read(self) -> list[str]:
        """The splits the bench reads, in the order of the protocol's stages (:func:`querytune.grid.protocol`)."""
        return [split for stage in grid.protocol(self.spec.search) for split in stage]

    def stage_runs(self, stage: tuple[str, str], method: str, task: SuiteTask) -> dict[Path, dict[str, Any]]:
        """The runs of ``method`` on ``task`` in a stage of the protocol: the search's grid, or the seeds."""
        return self.search_runs(method, task) if stage == SEARCH else self.seed_runs(method, task)

    def entry_splits(self) -> list[str]:
        """The splits whose feature-cache entries the bench builds: the cached splits it reads, but those
        read from another's entry (:func:`querytune.run.entry_splits`)."""
        return [split for split in entry_splits(self.cached_splits()) if split in self.splits_read()]

    def cached_splits(self) -> list[str]:
        """The splits whose features are cached (:func:`querytune.run.cached_splits`): ``--cache-splits``,
        by default the final runs' training split, which holds the search's splits too."""
        return cached_splits(self.runtime.cache_splits, [FINAL[0]])

    def log_error(self, what: str, error: Exception) -> None:
        """An unexpected error's traceback goes to REPORT/errors.log (a user error's line is in the table)."""
        if not isinstance(error, QuerytuneError):
            with open(self.out / "errors.log", "a") as log:
                log.write(f"{what}\n{traceback.format_exc()}\n")

    def cache_dir(self, task: SuiteTask) -> Path:
        return self.runtime.cache_dir or self.out / "feature-cache" / task.name

    def seed_folders(self, task: SuiteTask, method: str) -> list[Path]:
        return [self.out / "runs" / task.name / method / f"seed{seed}" for seed in range(self.seeds)]

    def task_runs(self, task: SuiteTask) -> list[Path]:
        return [run for method in self.methods for run in self.seed_folders(task, method)]

    def cell(self, task: SuiteTask, method: str, seed: int, run: Path, cost: dict[str, Any],
             errors: dict[Path, str]) -> dict[str, Any]:
        """The table row of one run: its accuracy and cost, or its error."""
        row: dict[str, Any] = {"task": task.name, "group": task.group, "method": method, "seed": seed,
                               "trainable_params": cost.get("trainable_params"), "saved_bytes": cost.get("saved_bytes"),
                               "train_peak_bytes": cost.get("train_peak_bytes"), "cost_error": cost.get("error")}
        if run in errors:
            row["error"] = errors[run]
            return row
        metrics, config = read_metrics(run), read_run_config(run)
        row.update(accuracy=metrics["test_accuracy"], train_seconds=metrics["train_seconds"],
                   trainable_params=metrics["trainable_params"], lr=config["train"]["lr"],
                   weight_decay=config["train"]["weight_decay"], recipe=config.get("recipe"),
                   options=searched_options(method, config["options"]))
        return row

    def claim_folder(self) -> None:
        """Record this bench's settings; a folder holding another bench's results is refused, not mixed."""
        settings = {"suite": [str(t.path.resolve()) for t in self.tasks],
                    "groups": {t.name: t.group for t in self.tasks},
                    "backbone": self.backbone, "profile": self.spec.profile, "search": self.spec.search,
                    "image_size": self.spec.image_size, "precision": self.precision.value, "recipe": self.spec.recipe}
        if self.spec.min_steps is not None:  # (recorded where given: a folder of an older bench stays comparable)
            settings["min_steps"] = self.spec.min_steps
        if self.normalisation:
            settings["normalisation"] = [list(self.normalisation[0]), list(self.normalisation[1])]
        path = self.out / "bench.json"
        if path.is_file():
            if differences := setting_differences(json.loads(path.read_text()), settings):
                raise ConfigError(f"{self.out}: holds a bench with other settings ({'; '.join(differences[:4])}"
                                  f"{'; ...' if len(differences) > 4 else ''}); choose another --out")
            return
        # (a temporary file may be another part of this bench writing bench.json at this moment)
        if self.out.exists() and any(not p.name.endswith(".tmp") and p.name != LOCK_FILE for p in self.out.iterdir()):
            raise ConfigError(f"{self.out}: exists, is not empty and is not a querytune bench folder")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)

    def cost(self, method: str) -> dict[str, Any]:
        """Training-step cost at the bench's image size and batch 32, measured once per method."""
        path = self.out / "costs" / f"{method}.json"
        if path.is_file():
            return json.loads(path.read_text())
        note(f"measuring one training step of {method} (batch 32, a fresh process)", self.runtime.progress)
        result = measure_method_isolated(method, self.backbone, 32, self.spec.image_size, self.precision,
                                         self.runtime.device)
        if "error" not in result:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, result)
        return result

    def write(self, results: list[dict[str, Any]]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        spec = self.spec
        write_json(self.out / "results.json", {"profile": spec.profile, "backbone": self.backbone,
                                               "image_size": spec.image_size, "precision": self.precision.value,
                                               "search": spec.search, "results": results})
        table = io.StringIO()
        writer = csv.DictWriter(table, RESULT_FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in RESULT_FIELDS} for row in results)
        write_text(self.out / "results.csv", table.getvalue())
        write_text(self.out / "report.md", markdown_report(results, self.selected, self.methods, self.describe()))
        plot_pareto(results, self.methods, self.out / "pareto.png")

    def describe(self) -> str:
        spec = self.spec
        cut = ("quick profile: epochs capped at "
               f"{QUICK_EPOCHS[True]} (frozen-trunk methods) and {QUICK_EPOCHS[False]} (feature-adapting methods), "
               f"warm-up a tenth of the run, at least the steps they take on {FLOOR_IMAGES} images"
               if spec.profile == "quick"
               else "paper profile: each method's published protocol")
        search = (f"learning rate, weight decay and the options a method searches chosen on train800 -> val200 "
                  f"({grid.FOLDS} folds of train800val200 where val200 holds under {grid.FOLDS_BELOW} images; each "
                  f"choice and its table in `search/<task>/<method>/search.json`)" if spec.search
                  else "default hyperparameters")
        recipe = f"; per-task method settings from recipe `{spec.recipe}`" if spec.recipe else ""
        if spec.min_steps is not None:
            cut += f", at least {spec.min_steps} optimiser steps per run"
        stacked = (" (frozen-trunk methods: as one stack, in seed 0's data order)" if spec.seeds > 1 else "")
        return (f"backbone `{self.backbone}`, {spec.image_size} px, {self.precision}; {cut}; "
                f"{search}{recipe}; {spec.seeds} seed(s){stacked}; accuracy on `test` after the last epoch.")
