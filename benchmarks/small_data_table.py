"""The small-data study's tables (docs/small-data.md) from its benches' results.csv:

    python benchmarks/small_data_table.py --out /tmp/qt-study

reads ``OUT-<size>/results.csv`` (without the search) and ``OUT-<size>-search/results.csv`` for each size and
prints, per size, the test accuracy (%) of each method without and with the search: the mean of group means
and each group's mean, each as the mean +- standard deviation over the seeds (per seed: the tasks' mean in each
group, then the groups' mean). A method counts only on the tasks it finished under both protocols (where it
has finished any with the search), and the last column is the linear probe's on those same tasks.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

GROUPS = ("natural", "specialized", "structured")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the study's OUT prefix (benchmarks/small_data_study.sh)")
    parser.add_argument("--sizes", default="100,200,400")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        plain, searched = (read_cells(Path(f"{args.out}-{size}{suffix}") / "results.csv") for suffix in ("", "-search"))
        methods = sorted({m for _, m, _ in plain} | {m for _, m, _ in searched},
                         key=lambda m: ["linear", "head2toe", "vqt", "synqt", "memory"].index(m))
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
