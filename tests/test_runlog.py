"""The per-epoch record of a run: validation during training, curves.png, log.csv and TensorBoard,
also across a resume."""

from __future__ import annotations

import csv
import json

import pytest

from querytune import eval_run, train_run
from querytune.cli import main
from querytune.errors import ConfigError
from querytune.settings import RunSpec, Runtime

PNG = b"\x89PNG\r\n\x1a\n"


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _csv(run):
    return list(csv.DictReader(open(run / "log.csv")))


def test_eval_every_logs_the_held_out_accuracy_with_csv_and_curves(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--method", "linear", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task),
          "--out", str(run), "--train-split", "train800", "--eval-every", "2", "--log", "csv", "--epochs", "5",
          "--batch-size", "4", "--lr", "0.05", "--image-size", "32", "--workers", "0", "-q"])
    records = _log(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    # every second epoch and the last, on val200 (the default held-out split of train800)
    assert [r["epoch"] for r in records if "val_accuracy" in r] == [2, 4, 5]
    final = eval_run(run, tiny_task, "val200", runtime=Runtime(workers=0, progress=False))
    assert records[-1]["val_accuracy"] == pytest.approx(final)
    config = json.loads((run / "config.json").read_text())
    assert (config["val_split"], config["eval_every"], config["log"]) == ("val200", 2, ["csv"])
    capsys.readouterr()  # the training's metrics table
    main(["train", "--config", str(run / "config.json"), "--print-config"])  # a run's config replays them
    replayed = json.loads(capsys.readouterr().out)
    assert (replayed["val_split"], replayed["eval_every"], replayed["log"]) == ("val200", 2, ["csv"])
    rows = _csv(run)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5]
    for row, record in zip(rows, records):
        assert float(row["loss"]) == pytest.approx(record["loss"]) and float(row["lr"]) == pytest.approx(record["lr"])
        assert row["val_accuracy"] == ("" if "val_accuracy" not in record else str(record["val_accuracy"]))
    assert (run / "curves.png").read_bytes().startswith(PNG)


def test_every_run_writes_curves_and_no_extra_loggers_unless_asked(tiny_backbone_dir, tiny_task, tmp_path):
    run = tmp_path / "run"
    train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32), run,
              train={"epochs": 2, "batch_size": 8}, runtime=Runtime(workers=0, progress=False))
    assert (run / "curves.png").read_bytes().startswith(PNG)
    assert all("val_accuracy" not in r for r in _log(run))
    assert not (run / "log.csv").exists() and not (run / "tensorboard").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_every": 1}, "give --val-split, a split held out from 'train800val200'"),
    ({"val_split": "val200"}, "--val-split val200: 6 of its images are in the training split 'train800val200'"),
    ({"eval_every": 0, "train_split": "train800"}, "--eval-every must be at least 1 (got 0)"),
    ({"log": ["wandb"]}, "--log must be one of csv, tensorboard (got 'wandb')"),
])
def test_bad_validation_or_logger_settings_are_refused_before_any_work(tiny_backbone_dir, tiny_task, tmp_path,
                                                                       kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32, **kwargs),
                  tmp_path / "run", {"epochs": 1}, Runtime(workers=0, progress=False))
    assert not (tmp_path / "run").exists()


def test_unknown_logger_on_the_command_line_is_one_line_exit_2(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "linear", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task),
              "--out", str(tmp_path / "run"), "--log", "csv,wandb", "-q"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --log must be one of csv, tensorboard (got 'wandb')"


def test_a_resumed_run_logs_the_whole_run_once(tiny_backbone_dir, tiny_task, tmp_path, monkeypatch):
    """Killed after epoch 2 was logged but before its checkpoint: the rerun drops epoch 2's line and
    its TensorBoard events and logs epochs 2 and 3 again, so every record holds each epoch once."""
    pytest.importorskip("tensorboard", reason="tensorboard (querytune[tensorboard]) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import querytune.train as train_module

    def run(out):
        return train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, train_split="train800",
                                 eval_every=1, log=["csv", "tensorboard"], image_size=32),
                         out, train={"epochs": 3, "batch_size": 4}, runtime=Runtime(workers=0, progress=False))

    save = train_module.save_checkpoint
    saved = []

    def save_then_crash(path, state):
        if saved:
            raise RuntimeError("killed")
        saved.append(state["epochs_done"])
        save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="killed"):
        run(cut)
    assert [r["epoch"] for r in _log(cut)] == [1, 2] and saved == [1]
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    assert run(cut)["resumed"]
    run(tmp_path / "whole")

    records = _log(cut)
    untimed = lambda run: [{k: v for k, v in r.items() if k != "seconds"} for r in _log(run)]  # noqa: E731
    assert untimed(cut) == untimed(tmp_path / "whole")  # the same epochs and values as an uninterrupted run
    assert [int(row["epoch"]) for row in _csv(cut)] == [1, 2, 3]
    events = EventAccumulator(str(cut / "tensorboard"))
    events.Reload()
    for key in ("loss", "train_accuracy", "val_accuracy", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert (cut / "curves.png").read_bytes().startswith(PNG)
