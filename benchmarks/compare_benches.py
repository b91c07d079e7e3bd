"""Put one method's accuracy from several bench folders side by side, task by task (markdown).

    python benchmarks/compare_benches.py --method vqt \
        before=docs/bench-vtab1k-mini-paper after=/tmp/bench-vqt-fixed recipe=/tmp/bench-recipe,/tmp/bench-b

A name may gather several bench folders (comma-separated: benches of the same settings run on
different tasks). Each bench's results.json gives the accuracy (mean over seeds) and the trainable parameters of its
cells; a task a bench has not finished shows "-". The last rows are the mean over tasks and the mean
of group means, over the tasks every bench finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cells(folders: list[Path], method: str) -> dict[str, dict]:
    """Task -> {accuracy, params, group} of ``method``'s finished cells in the bench folders."""
    by_task: dict[str, list[dict]] = {}
    rows = [row for folder in folders for row in json.loads((folder / "results.json").read_text())["results"]]
    for row in rows:
        if row["method"] == method and row.get("accuracy") is not None:
            by_task.setdefault(row["task"], []).append(row)
    return {task: {"accuracy": statistics.mean(r["accuracy"] for r in rows), "params": rows[0]["trainable_params"],
                   "group": rows[0]["group"]} for task, rows in by_task.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("benches", nargs="+", help="NAME=FOLDER[,FOLDER...]")
    args = parser.parse_args()
    named = [bench.split("=", 1) for bench in args.benches]
    tables = {name: cells([Path(f) for f in folders.split(",")], args.method) for name, folders in named}
    tasks = sorted({task for table in tables.values() for task in table},
                   key=lambda t: (next(tb[t]["group"] for tb in tables.values() if t in tb), t))
    print("| task | group | " + " | ".join(f"{name} (%) | params" for name, _ in named) + " |")
    print("|---|---|" + "---|---|" * len(named))
    for task in tasks:
        group = next(table[task]["group"] for table in tables.values() if task in table)
        row = [f"{100 * tables[n][task]['accuracy']:.1f} | {tables[n][task]['params']}" if task in tables[n]
               else "- | -" for n, _ in named]
        print(f"| {task} | {group} | " + " | ".join(row) + " |")
    complete = [task for task in tasks if all(task in table for table in tables.values())]
    if not complete:
        return
    groups = sorted({tables[named[0][0]][t]["group"] for t in complete})
    means, group_means = [], []
    for name, _ in named:
        accuracies = {t: 100 * tables[name][t]["accuracy"] for t in complete}
        means.append(f"{statistics.mean(accuracies.values()):.1f} |")
        by_group = [[a for t, a in accuracies.items() if tables[name][t]["group"] == g] for g in groups]
        group_means.append(f"{statistics.mean(statistics.mean(g) for g in by_group):.1f} |")
    print(f"| mean over {len(complete)} tasks | | " + " | ".join(means) + " |")
    print("| mean of group means | | " + " | ".join(group_means) + " |")


if __name__ == "__main__":
    main()
