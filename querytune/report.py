"""The bench's report: the accuracy table with group means (markdown) and the accuracy-against-cost plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .files import write_atomic
from .suite import SuiteTask

GROUP_ORDER = ("natural", "specialized", "structured")


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_report(results: list[dict[str, Any]], tasks: list[SuiteTask], methods: list[str], description: str) -> str:
    """Per-task accuracy (mean ± spread over seeds), group means, their mean and the mean over tasks, best
    per column in bold; then each method's cost, and the per-task settings a recipe gave (rows' ``recipe``)."""
    accuracy: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    for row in results:
        if row.get("error"):
            errors[(row["task"], row["method"])] = row["error"]
        elif row.get("accuracy") is not None:
            accuracy.setdefault((row["task"], row["method"]), []).append(100 * row["accuracy"])
    groups = [g for g in GROUP_ORDER if any(t.group == g for t in tasks)]
    groups += sorted({t.group for t in tasks} - set(groups))
    ordered = sorted(tasks, key=lambda t: (groups.index(t.group), t.name))

    def cell_value(task: str, method: str) -> tuple[float, float] | None:
        values = accuracy.get((task, method))
        return _mean_spread(values) if values else None

    columns = ([f"{t.name} ({t.group})" for t in ordered] + [f"{g} mean" for g in groups]
               + ["mean of group means", "mean over tasks"])
    table: dict[str, list[tuple[float, float] | None]] = {}
    for method in methods:
        cells = [cell_value(t.name, method) for t in ordered]
        group_means = []
        for group in groups:
            members = [v[0] for t, v in zip(ordered, cells) if t.group == group and v is not None]
            complete = len(members) == sum(t.group == group for t in ordered)
            group_means.append((statistics.fmean(members), 0.0) if members and complete else None)
        overall = [g[0] for g in group_means if g is not None]
        per_task = [c[0] for c in cells if c is not None]
        cells += group_means + [((statistics.fmean(overall), 0.0) if len(overall) == len(groups) else None),
                                ((statistics.fmean(per_task), 0.0) if len(per_task) == len(ordered) else None)]
        table[method] = cells
    best = [max((cell[0] for cell in (table[m][i] for m in methods) if cell is not None), default=None)
            for i in range(len(columns))]

    def fmt(value: tuple[float, float] | None, best_value: float | None) -> str:
        if value is None:
            return "–"
        text = f"{value[0]:.1f}" + (f" ± {value[1]:.1f}" if value[1] else "")
        return f"**{text}**" if best_value is not None and abs(value[0] - best_value) < 1e-9 else text

    costs = {row["method"]: row for row in results}
    seconds = {m: [r["train_seconds"] for r in results if r["method"] == m and r.get("train_seconds")]
               for m in methods}
    mib = lambda v: f"{v / 2**20:.0f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    mean_seconds = lambda m: f"{statistics.fmean(seconds[m]):.0f}" if seconds[m] else "–"  # noqa: E731

    def param_range(method: str) -> str:
        counts = sorted({r["trainable_params"] for r in results if r["method"] == method and r.get("trainable_params")})
        return "–" if not counts else f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    lines = ["# querytune bench", "", description, ""]
    if len(ordered) == 1:  # one task: accuracy and cost side by side in one table
        lines += [f"Top-1 accuracy on {ordered[0].name} `test` (%, mean ± standard deviation over seeds), and "
                  "the cost of training: memory of one step at batch 32, seconds of all epochs (caching not "
                  "included).", "",
                  "| method | accuracy (%) | trainable params | peak training memory (MiB) | saved for backward "
                  "(MiB) | train seconds |", "|---|---|---|---|---|---|"]
        for method in methods:
            row = costs.get(method, {})
            cost = (f"measurement failed: {row['cost_error']} | | |" if row.get("cost_error") else
                    f"{row.get('trainable_params') or '–'} | {mib(row.get('train_peak_bytes'))} | "
                    f"{mib(row.get('saved_bytes'))} |")
            lines.append(f"| {method} | {fmt(table[method][0], best[0])} | {cost} {mean_seconds(method)} |")
    else:
        header = "| method | " + " | ".join(columns) + " |"
        lines += ["Top-1 test accuracy (%), mean ± standard deviation over seeds. Group means are means over the "
                  "group's tasks; then the mean of the group means (VTAB's usual summary) and the plain mean over "
                  "tasks. Best per column in bold.",
                  "", header, "|" + "---|" * (len(columns) + 1)]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(fmt(v, b) for v, b in zip(table[method], best)) + " |")
        lines += ["", "Trainable parameters over the tasks (they differ by the number of classes, and by a "
                  "recipe's settings); memory measured once per method, one step at batch 32 with its default "
                  "options.", "",
                  "| method | trainable params | saved for backward (MiB) | peak training memory (MiB) | "
                  "mean train seconds |", "|---|---|---|---|---|"]
        for method in methods:
            row = costs.get(method, {})
            if row.get("cost_error"):
                lines.append(f"| {method} | measurement failed: {row['cost_error']} | | | |")
                continue
            lines.append(f"| {method} | {param_range(method)} | {mib(row.get('saved_bytes'))} | "
                         f"{mib(row.get('train_peak_bytes'))} | {mean_seconds(method)} |")
    recipes = {(row["task"], row["method"]): row["recipe"] for row in results if row.get("recipe")}
    if recipes:
        lines += ["", "## Recipe settings", ""]
        lines += [f"- {task} / {method}: " + ", ".join(f"{k} {v}" for k, v in recipe["settings"].items())
                  + f" (recipe {recipe['name']})" for (task, method), recipe in sorted(recipes.items())]
    if errors:
        lines += ["", "## Failed cells", ""]
        lines += [f"- {task} / {method}: {message}" for (task, method), message in sorted(errors.items())]
    return "\n".join(lines) + "\n"


def plot_pareto(results: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """Mean accuracy against peak training memory and against trainable parameters, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for method in methods:
        rows = [r for r in results if r["method"] == method and r.get("accuracy") is not None]
        if rows and rows[0].get("train_peak_bytes") and rows[0].get("trainable_params"):
            points.append((method, 100 * statistics.fmean(r["accuracy"] for r in rows),
                           rows[0]["train_peak_bytes"] / 2**20, rows[0]["trainable_params"]))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*Xh<>"
    for i, (method, acc, memory, params) in enumerate(points):
        for axis, x in zip(axes, (memory, params)):
            axis.scatter(x, acc, marker=markers[i % len(markers)], s=70, label=method)
            axis.annotate(method, (x, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes[0].set_xlabel("peak training memory, one step at batch 32 (MiB)")
    axes[1].set_xlabel("trainable parameters")
    axes[1].set_xscale("log")
    for axis in axes:
        axis.set_ylabel("mean test accuracy over tasks (%)")
        axis.grid(alpha=0.3)
    if points:
        axes[1].legend(fontsize=8, loc="best")
    figure.suptitle("Accuracy against training cost")
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
