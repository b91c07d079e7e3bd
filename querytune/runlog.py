"""A run's per-epoch record: ``log.jsonl`` (the authoritative one, a JSON line per epoch) and what
is derived from it: ``curves.png`` (loss, learning rate, train and validation accuracy), and on
request ``log.csv`` and TensorBoard events under ``tensorboard/``.

The training loop (:func:`querytune.train.fit`) calls :meth:`EpochLog.start` once with the
epochs its checkpoint holds, :meth:`EpochLog.epoch_end` after every epoch and
:meth:`EpochLog.finish` at the end. On resume, lines past the checkpoint are dropped and the
TensorBoard events from that epoch on are purged, so the csv, the events and the curves cover
the whole run once. The validation accuracy (``validate``, every ``eval_every`` epochs and after
the last) is computed on every process; only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import distributed
from .errors import ConfigError
from .files import append_text, write_atomic, write_text

LOGGERS = ("csv", "tensorboard")


def check_loggers(loggers: Sequence[str]) -> None:
    """TensorBoard's package where it is asked for (before any work); the names are checked with the
    run's settings (:class:`~querytune.settings.RunSpec`)."""
    if "tensorboard" in loggers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package: "
                              "pip install 'querytune[tensorboard]'") from None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The epochs' records of a log.jsonl; a line torn by a power loss is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records.append(record)
        except ValueError:
            pass
    return records


class EpochLog:
    """The per-epoch record of the run folder ``run``, with the extra ``loggers`` (:data:`LOGGERS`)."""

    def __init__(self, run: Path, loggers: Sequence[str] = (), validate: Callable[[], float] | None = None,
                 eval_every: int = 1, epochs: int = 1) -> None:
        check_loggers(loggers)
        self.path = run / "log.jsonl"
        self.run, self.loggers = run, tuple(loggers)
        self.validate, self.eval_every, self.epochs = validate, eval_every, epochs
        self.writes = distributed.is_main()
        self.tensorboard: Any = None

    def start(self, epochs_done: int) -> None:
        """Keep the lines of the epochs the checkpoint holds (a killed run may have logged one more)."""
        if not self.writes:
            return
        kept = [json.dumps(record) + "\n" for record in read_log(self.path) if record["epoch"] <= epochs_done]
        if self.path.is_file():
            write_text(self.path, "".join(kept))
        if "tensorboard" in self.loggers:
            from torch.utils.tensorboard import SummaryWriter

            # events of the epochs after the checkpoint, from the interrupted attempt, are hidden
            self.tensorboard = SummaryWriter(str(self.run / "tensorboard"), purge_step=epochs_done + 1)
        self.write_csv()

    def epoch_end(self, record: dict[str, Any]) -> None:
        """Add the validation accuracy where it is due, then append ``record`` (its ``epoch`` counts from 1)."""
        epoch = record["epoch"]
        if self.validate is not None and (epoch % self.eval_every == 0 or epoch == self.epochs):
            record = {**record, "val_accuracy": self.validate()}
        if not self.writes:
            return
        append_text(self.path, json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.tensorboard.add_scalar(key, value, epoch)
            self.tensorboard.flush()  # what a killed run logged stays readable
        self.write_csv()

    def finish(self) -> None:
        if not self.writes:
            return
        if self.tensorboard is not None:
            self.tensorboard.close()
        plot_curves(read_log(self.path), self.run / "curves.png")

    def write_csv(self) -> None:
        """log.csv, rewritten whole from log.jsonl: one row per epoch, a column per key seen."""
        if "csv" not in self.loggers:
            return
        records = read_log(self.path)
        columns = list(dict.fromkeys(key for record in records for key in record)) or ["epoch"]
        table = io.StringIO()
        writer = csv.DictWriter(table, columns)
        writer.writeheader()
        writer.writerows(records)
        write_text(self.run / "log.csv", table.getvalue())


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss, learning rate, and train and validation accuracy against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [epoch for epoch, _ in points], [value for _, value in points]

    figure, (loss_axis, lr_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(12, 3.4))
    loss_axis.plot(*series("loss"), marker=".")
    loss_axis.set_title("training loss")
    lr_axis.plot(*series("lr"), marker=".")
    lr_axis.set_title("learning rate (at the epoch's end)")
    accuracy_axis.plot(*series("train_accuracy"), marker=".", label="train")
    if series("val_accuracy")[0]:
        accuracy_axis.plot(*series("val_accuracy"), marker="o", label="validation")
    accuracy_axis.set_title("accuracy")
    accuracy_axis.legend(fontsize=8)
    for axis in (loss_axis, lr_axis, accuracy_axis):
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=90, format="png"))
    plt.close(figure)
