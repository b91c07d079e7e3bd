"""The small-data study's tables (docs/small-data.md) from its benches' results.csv:

    python benchmarks/small_data_table.py --out /tmp/qt-study

reads ``OUT-<size>/results.csv`` (without the search) and ``OUT-<size>-search/results.csv`` for each size and
prints, per size, the test accuracy (%) of each method without and with the search: the mean of group means
and each group's mean, each as the mean +- standard deviation over the seeds (per seed: the tasks' mean in each
group, then the groups' mean). A method counts only on the tasks it finished under both protocols (where it
has finished any with the search), and the last column is the linear probe's on those same tasks.

    python benchmarks/small_data_table.py --protocols "quick=/tmp/qt-study-100 paper=/tmp/qt-floor-lh,/tmp/qt-floor-qsm"

prints instead, per task, each method's test accuracy (%, mean over its seeds) under each protocol (its
benches' results.csv together), and the mean of group means over the tasks every protocol's every method
finished.

    python benchmarks/small_data_table.py --selection /tmp/qt-s3-lh,/tmp/qt-s3-mem --defaults /tmp/qt-qfloor

prints, for every k-fold search of those benches (its record ``search/<task>/<method>/search.json``), the
point the search chose and the method's default point: their mean validation accuracy over the folds, the chosen
point's lead over the default with its standard error over the folds (paired), and both on test: the chosen
point's seed runs in the searched bench, the default's in the ``--defaults`` bench (the same seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from querytune.grid import member_name
from querytune.methods import method_class

GROUPS = ("natural", "specialized", "structured")
METHODS = ("linear", "head2toe", "vqt", "synqt", "memory")


def read_cells(path: Path) -> dict[tuple[str, str, int], tuple[str, float]]:
    """(task, method, seed) -> (group, accuracy) of the finished cells of a bench's results.csv."""
    if not path.is_file():
        return {}
    return {(row["task"], row["method"], int(row["seed"])): (row["group"], float(row["accuracy"]))
            for row in csv.DictReader(open(path)) if row["accuracy"]}


def summary(cells: dict[tuple[str, str, int], tuple[str, float]], method: str, tasks: set[str]) -> dict[str, str]:
    """'mean +- std' over seeds of the mean of group means and of each group's mean."""
    by_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (task, m, seed), (group, accuracy) in cells.items():
        if m == method and task in tasks:
            by_seed[seed][group].append(100 * accuracy)
    columns: dict[str, list[float]] = defaultdict(list)
    for groups in by_seed.values():
        means = {group: statistics.mean(values) for group, values in groups.items()}
        columns["mean"].append(statistics.mean(means.values()))
        for group, value in means.items():
            columns[group].append(value)
    return {name: f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
            for name, v in columns.items()}


def protocols_table(protocols: dict[str, list[Path]]) -> None:
    """Per task, each method's mean accuracy over its seeds under each protocol, then the mean of group means
    over the tasks that every (protocol, method) finished."""
    cells = {name: {k: v for path in paths for k, v in read_cells(path / "results.csv").items()}
             for name, paths in protocols.items()}
    found_methods = {method for found in cells.values() for _, method, _ in found}
    methods = [m for m in METHODS if m in found_methods]
    means: dict[tuple[str, str, str], float] = {}  # (protocol, method, task) -> mean over seeds
    groups: dict[str, str] = {}
    for name, found in cells.items():
        by_run: dict[tuple[str, str], list[float]] = defaultdict(list)
        for (task, method, _), (group, accuracy) in found.items():
            by_run[method, task].append(100 * accuracy)
            groups[task] = group
        means.update({(name, method, task): statistics.mean(v) for (method, task), v in by_run.items()})
    tasks = sorted(groups, key=lambda t: (GROUPS.index(groups[t]), t))
    common = [t for t in tasks if all((name, m, t) in means for name in protocols for m in methods)]
    columns = [(name, m) for name in protocols for m in methods]
    print("| task | " + " | ".join(f"{m} ({name})" for name, m in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{means[name, m, task]:.1f}" if (name, m, task) in means else "-"
                                          for name, m in columns) + " |")
    if common:
        def group_means(name: str, method: str) -> float:
            by_group = defaultdict(list)
            for task in common:
                by_group[groups[task]].append(means[name, method, task])
            return statistics.mean(statistics.mean(v) for v in by_group.values())

        print(f"| mean of group means ({len(common)} tasks) | "
              + " | ".join(f"{group_means(name, m):.1f}" for name, m in columns) + " |")


def fold_scores(record: dict[str, object], method: str) -> dict[str, list[float]]:
    """Each grid point's validation accuracy on every fold, by member name, from a search's record."""
    return {point_name(method, row["lr"], row["weight_decay"], row.get("options", {})): row["fold_accuracies"]
            for row in record["search"]}


def test_accuracies(runs: Path) -> dict[int, float]:
    """seed -> test accuracy of a bench's finished seed runs ``runs/seed<s>``."""
    found = {int(m.parent.name.removeprefix("seed")): json.loads(m.read_text()).get("test_accuracy")
             for m in runs.glob("seed*/metrics.json")}
    return {seed: accuracy for seed, accuracy in found.items() if accuracy is not None}


def point_name(method: str, lr: float, weight_decay: float, options: dict[str, object]) -> str:
    """The member name (:func:`querytune.grid.member_name`) of a run with these settings: the options the
    method's search crosses (``Method.search_options``) among ``options``."""
    searched = {name: options[name] for name in method_class(method).search_options}
    return member_name({"lr": lr, "weight_decay": weight_decay, **({"options": searched} if searched else {})})


def default_point(method: str) -> str:
    """The member name of the method's default settings (its protocol's lr, weight decay and options)."""
    cls = method_class(method)
    options = {name: values[0] for name, values in cls.search_options.items()}
    return point_name(method, cls.train_defaults["lr"], cls.train_defaults["weight_decay"], options)


def selection_table(searched: list[Path], defaults: Path) -> None:
    """Per search: the chosen and the default point on the folds and on test (see the module's docstring)."""
    print("| task | method | chosen | default | folds: chosen | folds: default | lead ± s.e. | seeds "
          "| test: chosen | test: default |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bench in searched:
        for path in sorted(bench.glob("search/*/*/search.json")):  # (written when the search has finished)
            search = path.parent
            task, method = search.parent.name, search.name
            record = json.loads(path.read_text())
            found, plain = test_accuracies(bench / "runs" / task / method), test_accuracies(
                defaults / "runs" / task / method)
            if "fold_accuracies" not in record["search"][0] or not found:  # (a 1-fold search; no seed runs yet)
                continue
            scores = fold_scores(record, method)
            chosen = point_name(method, record["chosen"]["lr"], record["chosen"]["weight_decay"],
                                record["chosen"].get("options", {}))
            for seed in found:  # (the record's choice must be what the bench trained)
                ran = json.loads((bench / "runs" / task / method / f"seed{seed}" / "config.json").read_text())
                trained = point_name(method, ran["train"]["lr"], ran["train"]["weight_decay"], ran["options"])
                if chosen != trained:
                    raise SystemExit(f"{search}: the folds choose {chosen}, but seed {seed} trained {trained}")
            default = default_point(method)
            seeds = sorted(set(found) & set(plain))
            lead = "-"
            if default in scores:
                differences = [100 * (c - d) for c, d in zip(scores[chosen], scores[default])]
                lead = (f"{statistics.mean(differences):+.1f} ± "
                        f"{statistics.stdev(differences) / len(differences) ** 0.5:.1f}")
            default_folds = f"{100 * statistics.mean(scores[default]):.1f}" if default in scores else "not in grid"
            tests = [f"{statistics.mean(100 * runs[s] for s in seeds):.1f}" if seeds else "-"
                     for runs in (found, plain)]
            print(f"| {task} | {method} | {chosen} | {default} | {100 * statistics.mean(scores[chosen]):.1f} | "
                  f"{default_folds} | {lead} | {','.join(map(str, seeds)) or '-'} | {tests[0]} | {tests[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the study's OUT prefix (benchmarks/small_data_study.sh)")
    parser.add_argument("--sizes", default="100,200,400")
    parser.add_argument("--protocols", help="'NAME=BENCH[,BENCH...] ...': per-task tables of these benches")
    parser.add_argument("--selection", help="BENCH[,BENCH...]: searched benches, each search's choice against the "
                        "method's defaults (with --defaults)")
    parser.add_argument("--defaults", help="the bench of the same cells at the methods' defaults, without --search")
    args = parser.parse_args()
    if args.selection:
        if not args.defaults:
            parser.error("--selection needs --defaults")
        selection_table([Path(p) for p in args.selection.split(",")], Path(args.defaults))
        return
    if args.protocols:
        protocols_table({name: [Path(p) for p in paths.split(",")]
                         for name, paths in (item.split("=", 1) for item in args.protocols.split())})
        return
    for size in args.sizes.split(","):
        plain, searched = (read_cells(Path(f"{args.out}-{size}{suffix}") / "results.csv") for suffix in ("", "-search"))
        methods = sorted({m for _, m, _ in plain} | {m for _, m, _ in searched},
                         key=METHODS.index)
        print(f"\n{size} images\n")
        print("| method | tasks | protocol | mean of group means | " + " | ".join(GROUPS)
              + " | linear, same tasks |")
        print("|---|---|---|---|" + "---|" * len(GROUPS) + "---|")
        for method in methods:
            tasks = ({t for t, m, _ in plain if m == method} & {t for t, m, _ in searched if m == method}
                     or {t for t, m, _ in plain if m == method})
            for name, cells in (("defaults", plain), ("--search", searched)):
                row, linear = summary(cells, method, tasks), summary(cells, "linear", tasks)
                if row:
                    print(f"| {method} | {len(tasks)} | {name} | {row['mean']} | "
                          + " | ".join(row.get(group, "-") for group in GROUPS) + f" | {linear.get('mean', '-')} |")


if __name__ == "__main__":
    main()
