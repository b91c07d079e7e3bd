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
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the study's OUT prefix (benchmarks/small_data_study.sh)")
    parser.add_argument("--sizes", default="100,200,400")
    parser.add_argument("--protocols", help="'NAME=BENCH[,BENCH...] ...': per-task tables of these benches")
    args = parser.parse_args()
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
