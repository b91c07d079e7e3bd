"""The rules for small training splits (docs/small-data.md): the step floor, the searched options, the k-fold
search, and the cut task folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_vit, write_task
from querytune import grid
from querytune.data import open_split
from querytune.data.cuts import cut_lists, fold_lists
from querytune.data.cuts import write_task as write_cut
from querytune.errors import ConfigError
from querytune.grid import member_name, search_grid, train_grid
from querytune.methods import build_method, method_class
from querytune.run import train_runs
from querytune.settings import RunSpec, Runtime
from querytune.train import TrainConfig


def test_the_floor_raises_epochs_only_on_small_training_splits():
    synqt = TrainConfig.for_method(method_class("synqt"), {})  # 50 epochs of batch 64, 10 warming up
    assert synqt.min_steps == 50 * 13  # its epochs on 800 images
    for items in (800, 1000, 5000):  # VTAB-1k's search and final splits, and more
        assert synqt.floored(items) == synqt
    small = synqt.floored(100)  # 2 steps an epoch
    assert (small.epochs, small.warmup_epochs) == (325, 65)  # 650 steps, the warm-up a fifth of them as before
    assert small.floored(100) == small  # stated in steps: flooring again changes nothing
    head2toe = TrainConfig.for_method(method_class("head2toe"), {})  # 63 epochs of batch 128
    assert head2toe.floored(100).epochs == 63 * 7
    given = TrainConfig.for_method(method_class("synqt"), {"epochs": 20})
    assert given.min_steps == 0 and given.floored(100) == given  # epochs the user gave are trained as given
    cut = TrainConfig.for_method(method_class("synqt"), {"epochs": 20, "min_steps": 260})
    assert cut.floored(100).epochs == 130 and cut.floored(100).warmup_epochs == pytest.approx(13)  # a tenth, as cut


def test_config_json_records_the_floored_schedule(tiny_backbone_dir, tiny_task, tmp_path):
    spec = RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32)
    runtime = Runtime(workers=0, cache=tmp_path / "cache", progress=False, device="cpu")
    run = tmp_path / "run"
    train_runs(spec, {run: {"epochs": 1, "batch_size": 8, "min_steps": 7}}, runtime)  # 18 images: 3 steps an epoch
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 3 and config["train"]["min_steps"] == 7
    assert config["schedule"] == {"train_items": 18, "steps_per_epoch": 3, "steps": 9, "warmup_steps": 1,
                                  "min_steps": 7}
    assert len((run / "log.jsonl").read_text().splitlines()) == 3


def test_the_search_crosses_the_options_that_matter_on_small_data():
    head2toe = search_grid("head2toe", 128)
    assert len(head2toe) == 2 * 3
    assert [p["options"]["keep_fraction"] for p in head2toe] == [0.2, 0.2, 0.05, 0.05, 1.0, 1.0]
    synqt = search_grid("synqt", 64)
    assert len(synqt) == 6 * 2 and {p["options"]["dropout"] for p in synqt} == {0.1, 0.3}
    assert synqt[0]["options"]["dropout"] == 0.1  # the protocol's value first: ties keep it
    assert len({member_name(p) for p in synqt}) == 12
    assert "options" not in search_grid("vqt", 128)[0] and len(search_grid("vqt", 128)) == 20
    scores = [0.5] * 12
    assert grid.select_best(list(zip(synqt, scores)))["options"] == {"dropout": 0.1}


def test_synqt_dropouts_follow_its_options():
    method = build_method("synqt", tiny_vit(), 3, {"dropout": 0.3, "head_drop_path": 0.0})
    rates = {module.p for module in method.modules() if isinstance(module, torch.nn.Dropout)}
    assert rates == {0.3, 0.0}  # 0: the QSM projections' adapters, as in the official code
    assert method.head.drop_path == 0.0


def test_stacked_members_differ_in_the_searched_options_only(tiny_backbone_dir, tiny_task, tmp_path):
    spec = RunSpec(method="head2toe", backbone=tiny_backbone_dir, data=tiny_task, train_split="train800",
                   eval_split="val200", image_size=32)
    runtime = Runtime(workers=0, cache=tmp_path / "cache", progress=False, device="cpu")
    settings = {"epochs": 2, "batch_size": 8}
    runs = {tmp_path / "keep0.2": {**settings, "options": {"keep_fraction": 0.2}},
            tmp_path / "keep1": {**settings, "options": {"keep_fraction": 1.0}}}
    kept, everything = train_runs(spec, runs, runtime)
    assert kept["kept_features"] < everything["kept_features"] == everything["total_features"]
    assert json.loads((tmp_path / "keep1" / "config.json").read_text())["options"]["keep_fraction"] == 1.0
    with pytest.raises(ConfigError, match=r"options 'head2toe' searches \(keep_fraction; not target_size"):
        train_runs(spec, {tmp_path / "a": {**settings, "options": {"target_size": 8}}, tmp_path / "b": settings},
                   runtime)


def test_fold_lists_partition_the_training_split_and_leave_out_test(tiny_task, tmp_path):
    folds = [fold_lists(tiny_task, 5, fold) for fold in range(5)]
    whole = open_split(tiny_task, "train800val200")
    held_out = [line for lists in folds for line in lists["val200"]]
    assert sorted(held_out) == sorted(lines for lines in folds[0]["train800val200"])
    assert len(held_out) == len(whole)
    for lists in folds:
        assert not set(lists["train800"]) & set(lists["val200"])
        assert "test" not in lists
    folder = write_cut(tiny_task, tmp_path / "fold0", folds[0])
    assert folder.name == tiny_task.name and not (folder / "test.txt").exists()
    assert (folder / "images").is_symlink()  # links, never copies
    assert open_split(folder, "train800val200").fingerprint() == whole.fingerprint()  # one cache entry for both


def test_a_tiny_validation_split_selects_by_k_fold_never_on_test(tiny_backbone_dir, tiny_task, tmp_path,
                                                                  monkeypatch):
    searched_on = []
    real_train_runs = grid.train_runs

    def spy(spec, runs, runtime=None):
        searched_on.append((Path(spec.data), spec.train_split, spec.eval_split))
        return real_train_runs(spec, runs, runtime)

    monkeypatch.setattr(grid, "train_runs", spy)
    monkeypatch.setattr(method_class("linear"), "search_grid", {"lr": (0.1, 0.01), "weight_decay": (0.0,)})
    spec = RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32, eval_split="test")
    runtime = Runtime(workers=0, cache=tmp_path / "cache", progress=False, device="cpu")
    summary = train_grid(spec, tmp_path / "out", {"epochs": 1, "batch_size": 8}, runtime, search=True, seeds=[0])
    assert summary["selection"] == "5-fold cross-validation over train800val200"  # val200 holds 6 images
    search, final = searched_on[:-1], searched_on[-1]
    assert len(search) == 5 and final == (tiny_task, None, "test")  # the default: train800val200
    for data, train_split, eval_split in search:
        assert (train_split, eval_split) == ("train800", "val200") and data.parent.parent.name == "folds"
        assert not (data / "test.txt").exists()
    assert all(len(row["fold_accuracies"]) == 5 for row in summary["search"])
    row = next(r for r in summary["search"] if r["lr"] == summary["chosen"]["lr"])
    assert row["val200_accuracy"] == pytest.approx(sum(row["fold_accuracies"]) / 5)


def test_a_cut_shrinks_the_training_splits_in_proportion(tmp_path):
    task = write_task(tmp_path / "task", per_split={"train800": 40, "val200": 10, "test": 9})
    lists = cut_lists(task, 20, seed=1)
    assert (len(lists["train800"]), len(lists["val200"])) == (16, 4)
    assert sorted(lists["train800val200"]) == sorted(lists["train800"] + lists["val200"])
    assert lists["test"] == (task / "test.txt").read_text().split("\n")[:-1]
    assert set(lists["train800"]) <= set((task / "train800.txt").read_text().split("\n"))
    folder = write_cut(task, tmp_path / "cut", lists)
    assert len(open_split(folder, "train800val200")) == 20 and len(open_split(folder, "test")) == 9


def test_folds_given_override_the_rule(tiny_backbone_dir, tiny_task, tmp_path, monkeypatch):
    monkeypatch.setattr(method_class("linear"), "search_grid", {"lr": (0.1,), "weight_decay": (0.0,)})
    spec = RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=32, eval_split="test")
    runtime = Runtime(workers=0, cache=tmp_path / "cache", progress=False, device="cpu")
    summary = train_grid(spec, tmp_path / "out", {"epochs": 1, "batch_size": 8}, runtime, search=True, seeds=[0],
                         folds=1)
    assert summary["selection"] == "train800 -> val200" and not (tmp_path / "out" / "search" / "folds").exists()


def test_the_selection_table_sets_the_search_s_choice_beside_the_defaults(tmp_path, capsys):
    """benchmarks/small_data_table.py --selection reads a bench's search records (search.json) and sets each
    choice beside the method's default point on the folds and on test (seed-matched)."""
    searched, defaults = tmp_path / "searched", tmp_path / "defaults"
    fold_accuracies = {0.3: [0.5, 0.6, 0.7], 0.1: [0.4, 0.5, 0.6], 0.03: [0.7, 0.1, 0.1]}
    record = {"selection": "3-fold cross-validation over train800val200", "chosen": {"lr": 0.3, "weight_decay": 0.0},
              "search": [{"lr": lr, "weight_decay": 0.0, "fold_accuracies": accuracies}
                         for lr, accuracies in fold_accuracies.items()]}
    (searched / "search" / "dtd10" / "memory").mkdir(parents=True)
    (searched / "search" / "dtd10" / "memory" / "search.json").write_text(json.dumps(record))

    def seed_run(bench: Path, seed: int, lr: float, accuracy: float) -> None:
        folder = bench / "runs" / "dtd10" / "memory" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"train": {"lr": lr, "weight_decay": 0.0}, "options": {}}))
        (folder / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy}))

    seed_run(searched, 0, 0.3, 0.42)
    for seed, accuracy in enumerate([0.44, 0.9, 0.9]):  # seeds 1 and 2 not in the searched bench: not compared
        seed_run(defaults, seed, 0.1, accuracy)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "small_data_table.py"
    spec = importlib.util.spec_from_file_location("small_data_table", path)
    assert spec is not None and spec.loader is not None
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    table.selection_table([searched], defaults)
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| dtd10 | memory | lr0.3_wd0 | lr0.1_wd0 | 60.0 | 50.0 | +10.0 ± 0.0 | 0 | 42.0 | 44.0 |"
    seed_run(searched, 1, 0.03, 0.5)  # a seed trained at another point than the folds choose: refused
    with pytest.raises(SystemExit, match="the folds choose lr0.3_wd0, but seed 1 trained lr0.03_wd0"):
        table.selection_table([searched], defaults)
