"""querytune bench: the report files, resume without redoing cells, failed cells reported, search."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from test_bad_input import cli_error

from conftest import write_task
from querytune import grid
from querytune.bench import Bench, discover_tasks, markdown_report
from querytune.errors import ConfigError, DataError
from querytune.methods import METHODS
from querytune.methods.registry import method_class
from querytune.settings import BenchSpec, RunSpec, Runtime
from querytune.train import TrainConfig


@pytest.fixture
def suite(tmp_path):
    root = tmp_path / "suite"
    write_task(root / "alpha", classes=3, seed=1)
    write_task(root / "beta", classes=2, seed=2)
    (root / "groups.txt").write_text("alpha natural\nbeta structured\n")
    return root


@pytest.fixture
def one_fold(monkeypatch):
    """The search on train800 -> val200 however small val200 is (the tiny tasks' hold 6 images)."""
    monkeypatch.setattr(grid, "FOLDS_BELOW", 0)


FIXED_COST = {"trainable_params": 1, "saved_bytes": 0, "train_peak_bytes": 2**20}


def _bench(suite, tiny_backbone_dir, out, measure=False, **kwargs):
    """A bench on the tiny suite; unless ``measure``, the per-method cost (a subprocess each) is stubbed."""
    kwargs.setdefault("methods", ["linear", "vqt"])
    # no step floor unless a test is about it: the tiny tasks' 18 images would train what 800 images take
    kwargs.setdefault("min_steps", 0)
    cache = kwargs.pop("cache_dir", None)
    bench = Bench(BenchSpec(suite=suite, backbone=str(tiny_backbone_dir), out=out, image_size=32, **kwargs),
                  Runtime(workers=0, progress=False, cache=cache))
    if not measure:
        bench.cost = lambda method: dict(FIXED_COST)
    return bench


def test_bench_writes_results_report_and_plot_and_resumes(suite, tiny_backbone_dir, tmp_path, monkeypatch):
    out = tmp_path / "report"
    results = _bench(suite, tiny_backbone_dir, out, measure=True, seeds=2).run()
    assert len(results) == 2 * 2 * 2 and not any(r.get("error") for r in results)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["task"] for r in rows} == {"alpha", "beta"} and {r["group"] for r in rows} == {"natural", "structured"}
    classes = {"alpha": 3, "beta": 2}
    for row in rows:
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["train_seconds"]) > 0
        linear_params = 49 * classes[row["task"]]  # a head on the tiny ViT's width-48 class token
        if row["method"] == "linear":
            assert int(row["trainable_params"]) == linear_params
        else:  # VQT: queries, and a head on more features
            assert int(row["trainable_params"]) > linear_params
        assert int(row["train_peak_bytes"]) > int(row["saved_bytes"])  # the step's peak holds what it saved
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    assert "natural mean" in report and "mean of group means" in report and "**" in report and " ± " in report
    assert (out / "pareto.png").stat().st_size > 10_000
    assert not (out / "feature-cache").exists()  # the private cache goes once each task is done

    # An interrupted bench: one cell lost its result. Running again redoes that cell only.
    finished = out / "runs" / "alpha" / "linear" / "seed0" / "metrics.json"
    kept = out / "runs" / "beta" / "vqt" / "seed1" / "metrics.json"
    kept_before = kept.read_bytes()
    finished.unlink()
    trained = []
    import querytune.run as run_module

    real = run_module.fit  # the seeds of these frozen-trunk methods train as stacks
    monkeypatch.setattr(run_module, "fit",
                        lambda members, *a, **k: trained.extend(m.checkpoint.parent for m in members)
                        or real(members, *a, **k))
    again = _bench(suite, tiny_backbone_dir, out, measure=True, seeds=2).run()  # costs are read back, not remeasured
    assert kept.read_bytes() == kept_before
    assert trained == [finished.parent] and len(again) == len(results)

    # A finished bench run again (a retried job) trains nothing and writes the same report.
    trained.clear()
    report, table = (out / "report.md").read_bytes(), (out / "results.json").read_bytes()
    _bench(suite, tiny_backbone_dir, out, measure=True, seeds=2).run()
    assert trained == [] and (out / "report.md").read_bytes() == report and (out / "results.json").read_bytes() == table


def test_a_bench_split_by_task_shares_its_folder_and_one_more_run_reports_all(suite, tiny_backbone_dir, tmp_path,
                                                                              monkeypatch, capsys):
    from querytune.cli import main

    out = tmp_path / "report"
    (out / "bench.json.123.tmp").parent.mkdir(parents=True)
    (out / "bench.json.123.tmp").write_text("")  # another part writing bench.json at this moment
    part = _bench(suite, tiny_backbone_dir, out, tasks=["alpha"])
    part.claim_folder()
    (out / "feature-cache" / "beta").mkdir(parents=True)  # the other part's private cache, in use
    alpha = part.run()
    assert (out / "feature-cache" / "beta").is_dir() and not (out / "feature-cache" / "alpha").exists()
    beta = _bench(suite, tiny_backbone_dir, out, tasks=["beta"]).run()
    assert not (out / "feature-cache").exists()
    assert {r["task"] for r in alpha} == {"alpha"} and {r["task"] for r in beta} == {"beta"}
    assert "alpha" not in (out / "report.md").read_text()  # the last part's report covers its tasks
    import querytune.run as run_module

    trained = []
    real = run_module.fit
    monkeypatch.setattr(run_module, "fit",
                        lambda members, *a, **k: trained.extend(m.checkpoint.parent for m in members)
                        or real(members, *a, **k))
    whole = _bench(suite, tiny_backbone_dir, out).run()
    assert trained == [] and whole == alpha + beta
    report = (out / "report.md").read_text()
    assert "alpha" in report and "beta" in report
    with pytest.raises(ConfigError, match="--tasks: gamma not in the suite \\(known: alpha, beta\\)"):
        _bench(suite, tiny_backbone_dir, out, tasks=["alpha", "gamma"])
    from test_bad_input import cli_error

    bench_args = ["bench", "--suite", suite, "-b", tiny_backbone_dir, "--out", tmp_path / "other", "--image-size", "32"]
    assert cli_error(capsys, *bench_args, "--tasks", " , ") == "error: --tasks: no task named (known: alpha, beta)"
    assert not (tmp_path / "other").exists()
    monkeypatch.setattr(Bench, "cost", lambda self, method: dict(FIXED_COST))
    main(["bench", *map(str, bench_args[1:]), "--tasks", " beta ", "--methods", "linear", "--workers", "0", "-q"])
    assert {r["task"] for r in json.loads((tmp_path / "other" / "results.json").read_text())["results"]} == {"beta"}


def test_failed_cell_is_reported_and_the_rest_continue(suite, tiny_backbone_dir, tmp_path):
    victim = sorted((suite / "beta" / "images" / "train800").iterdir())[0]
    victim.write_bytes(b"not an image")
    out = tmp_path / "report"
    results = _bench(suite, tiny_backbone_dir, out).run()
    failed = [r for r in results if r.get("error")]
    assert {r["task"] for r in failed} == {"beta"} and all(str(victim) in r["error"] for r in failed)
    assert all(r.get("accuracy") is not None for r in results if r["task"] == "alpha")
    assert "Failed cells" in (out / "report.md").read_text()


def test_search_picks_by_validation_accuracy(suite, tiny_backbone_dir, tmp_path, monkeypatch, one_fold):
    for method in ("linear", "vqt"):
        monkeypatch.setattr(METHODS[method], "search_grid", {"lr": (0.5, 1e-6), "weight_decay": (0.0,)})
    out = tmp_path / "report"
    cache = tmp_path / "cache"
    results = _bench(suite, tiny_backbone_dir, out, methods=["linear", "vqt"], search=True, cache_dir=cache).run()
    assert all(r["lr"] == 0.5 for r in results if r["method"] == "linear")  # 1e-6 learns nothing in 20 epochs
    assert (out / "search" / "alpha" / "linear" / "lr0.5_wd0" / "metrics.json").is_file()
    record = json.loads((out / "search" / "alpha" / "linear" / "search.json").read_text())
    assert record["selection"] == "train800 -> val200" and record["chosen"] == {"lr": 0.5, "weight_decay": 0.0}
    assert [row["lr"] for row in record["search"]] == [0.5, 1e-6]
    assert record["search"][0]["val200_accuracy"] > record["search"][1]["val200_accuracy"]
    # the search's train800 is read from the train800val200 entry; val200 and test, read once, are not cached
    assert sorted(entry.name.split("-")[1] for entry in cache.iterdir()) == ["train800val200", "train800val200"]


def test_a_tiny_val200_searches_on_the_folds_as_train_grid_does(suite, tiny_backbone_dir, tmp_path, monkeypatch):
    import querytune.bench as bench_module

    monkeypatch.setattr(METHODS["linear"], "search_grid", {"lr": (0.5, 0.05, 1e-6), "weight_decay": (0.0,)})
    monkeypatch.setattr(bench_module, "QUICK_EPOCHS", {True: 3, False: 1})
    out, cache = tmp_path / "report", tmp_path / "cache"
    bench = _bench(suite, tiny_backbone_dir, out, methods=["linear"], search=True, cache_dir=cache, tasks=["alpha"])
    plan = bench.plan()[0]  # val200 holds 6 images: 5 folds x 3 points, then the seed
    assert plan.cells == 5 * 3 + 1 and "the search on 5 folds of train800val200" in plan.line()
    results = bench.run()
    assert not any(r.get("error") for r in results)
    folds = out / "search" / "alpha" / "linear"
    assert all((folds / f"fold{i}" / "lr0.5_wd0" / "metrics.json").is_file() for i in range(5))
    assert not any(folds.glob("folds/*/alpha/test.txt"))  # the folds' tasks cannot be tested on
    spec = RunSpec(method="linear", backbone=str(tiny_backbone_dir), data=str(suite / "alpha"), image_size=32,
                   eval_split="test")
    summary = grid.train_grid(spec, tmp_path / "grid", bench.settings("linear"),
                              Runtime(workers=0, progress=False, cache=cache), search=True, seeds=[0])
    assert summary["selection"] == "5-fold cross-validation over train800val200"
    chosen = summary["chosen"]
    assert (results[0]["lr"], results[0]["weight_decay"]) == (chosen["lr"], chosen["weight_decay"])
    record = json.loads((folds / "search.json").read_text())  # the bench's record of it, as grid.json has it
    assert record["selection"] == summary["selection"] and record["chosen"] == chosen
    assert all(len(row["fold_accuracies"]) == 5 for row in record["search"]) and len(record["search"]) == 3
    assert "5 folds of train800val200" in (out / "report.md").read_text()


def test_min_steps_floors_every_run_of_the_quick_profile_and_is_recorded(suite, tiny_backbone_dir, tmp_path):
    out = tmp_path / "report"
    bench = _bench(suite, tiny_backbone_dir, out, methods=["linear"], tasks=["alpha"], min_steps=30)
    assert bench.settings("linear")["min_steps"] == 30 and "at least 30 optimiser steps per run" in bench.describe()
    bench.run()
    schedule = json.loads((out / "runs" / "alpha" / "linear" / "seed0" / "config.json").read_text())["schedule"]
    assert schedule["steps"] >= 30 and schedule["min_steps"] == 30  # 20 quick epochs of 18 images: 20 steps alone
    assert json.loads((out / "bench.json").read_text())["min_steps"] == 30


def test_the_quick_profile_floors_its_capped_epochs_as_on_800_images(suite, tiny_backbone_dir, tmp_path):
    """Issue 38: the quick profile's 20 epochs of an 80-image split were 20 optimiser steps of VQT; it now
    trains at least what the 20 epochs take on 800 images, and an 800-image split is unchanged."""
    out = tmp_path / "report"
    bench = _bench(suite, tiny_backbone_dir, out, methods=["vqt"], tasks=["alpha"], min_steps=None)
    settings = bench.settings("vqt")  # VQT's protocol: batch 128, so 7 steps an epoch on 800 images
    assert (settings["epochs"], settings["min_steps"]) == (20, 20 * 7)
    assert "at least the steps they take on 800 images" in bench.describe()
    config = TrainConfig.for_method(method_class("vqt"), settings)
    assert config.floored(800) == config and config.floored(18).epochs == 20 * 7  # 18 images: one step an epoch
    bench.run()
    schedule = json.loads((out / "runs" / "alpha" / "vqt" / "seed0" / "config.json").read_text())["schedule"]
    assert schedule["steps"] == 140 and schedule["min_steps"] == 140


def test_bad_settings_fail_before_any_work(suite, tiny_backbone_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        _bench(suite, tiny_backbone_dir, tmp_path / "a", methods=["nope"])
    with pytest.raises(ConfigError, match="profile"):
        _bench(suite, tiny_backbone_dir, tmp_path / "b", profile="fast")
    with pytest.raises(ConfigError, match="not in"):
        discover_tasks(suite, {"gamma": "natural"})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a querytune bench folder"):
        _bench(suite, tiny_backbone_dir, tmp_path / "c").run()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_bench_refused_on_its_suite_writes_nothing_and_other_settings_are_named(suite, tiny_backbone_dir, tmp_path):
    out = tmp_path / "report"
    listed = (suite / "beta" / "test.txt").read_text()
    (suite / "beta" / "test.txt").write_text(listed + "images/test/gone.jpg 0\n")
    with pytest.raises(DataError, match="test.txt:10: image not found: .*gone.jpg"):
        _bench(suite, tiny_backbone_dir, out).run()
    assert not out.exists()  # no bench.json to hold the folder: the same bench runs there once the suite is mended
    (suite / "beta" / "test.txt").write_text(listed)
    _bench(suite, tiny_backbone_dir, out).claim_folder()
    with pytest.raises(ConfigError, match=r"holds a bench with other settings \(profile: 'quick' -> 'paper'; "
                                          r"search: False -> True\); choose another --out"):
        _bench(suite, tiny_backbone_dir, out, profile="paper", search=True).run()


def test_a_task_folder_without_a_split_is_named_and_the_plan_names_every_bad_task(suite, tiny_backbone_dir,
                                                                                  tmp_path, capsys):
    write_task(suite / "gamma", classes=2)
    (suite / "gamma" / "test.txt").unlink()
    (suite / "notes").mkdir()  # no split of a task: not a task, passed over
    (suite / "notes" / "readme.md").write_text("not a task")
    with pytest.raises(DataError, match="task folders without a split the bench reads: gamma has no test.txt$"):
        discover_tasks(suite)
    plan = ["bench", "--suite", suite, "-b", tiny_backbone_dir, "--image-size", "32", "--out", tmp_path / "out",
            "--plan"]
    assert cli_error(capsys, *plan, "--tasks", "gamma").endswith("gamma has no test.txt")
    with pytest.raises(DataError, match="gamma: a task folder without a split the bench reads: it has no test.txt"):
        discover_tasks(suite / "gamma")

    shutil.rmtree(suite / "gamma")
    for task in ("alpha", "beta"):
        (suite / task / "test.txt").write_text((suite / task / "test.txt").read_text() + "images/test/gone.jpg 0\n")
    error = cli_error(capsys, *plan)
    assert error.count("image not found") == 2, error  # each bad task, not only the first
    assert str(suite / "alpha" / "test.txt:10:") in error and str(suite / "beta" / "test.txt:10:") in error
    assert not (tmp_path / "out").exists()


def test_report_means_are_group_means():
    from pathlib import Path

    from querytune.bench import SuiteTask

    tasks = [SuiteTask("a", Path("a"), "natural"), SuiteTask("b", Path("b"), "natural"),
             SuiteTask("c", Path("c"), "structured")]
    results = [{"task": t, "method": "m", "seed": 0, "accuracy": acc}
               for t, acc in (("a", 0.5), ("b", 0.7), ("c", 0.1))]
    report = markdown_report(results, tasks, ["m"], "")
    line = next(l for l in report.splitlines() if l.startswith("| m |"))
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    assert cells[1:] == ["50.0", "70.0", "10.0", "60.0", "10.0", "35.0", "43.3"]  # mean of group means; over tasks


def test_report_gives_the_trainable_parameters_over_the_tasks():
    """A recipe's settings (and the number of classes) change a method's size per task: the cost table
    gives the range, not one task's count."""
    from pathlib import Path

    from querytune.bench import SuiteTask

    tasks = [SuiteTask("a", Path("a"), "natural"), SuiteTask("b", Path("b"), "natural")]
    results = [{"task": t, "method": m, "seed": 0, "accuracy": 0.5, "trainable_params": n, "saved_bytes": 2**20}
               for t, m, n in (("a", "vqt", 39558), ("b", "vqt", 1017610), ("a", "linear", 3850),
                               ("b", "linear", 3850))]
    lines = markdown_report(results, tasks, ["vqt", "linear"], "").splitlines()
    assert "| vqt | 39558–1017610 | 1 | – | – |" in lines
    assert "| linear | 3850 | 1 | – | – |" in lines


def test_bench_recipe_checks_every_task_first_and_the_report_names_the_settings(suite, tiny_backbone_dir, tmp_path):
    from pathlib import Path

    from querytune.bench import SuiteTask

    with pytest.raises(ConfigError, match="task 'alpha' is not in recipe 'vtab1k' for vqt"):
        _bench(suite, tiny_backbone_dir, tmp_path / "out", recipe="vtab1k")
    assert not (tmp_path / "out").exists()
    recipe = {"name": "vtab1k", "settings": {"num_queries": 10}}
    results = [{"task": "dtd", "method": "vqt", "seed": 0, "accuracy": 0.5, "recipe": recipe}]
    report = markdown_report(results, [SuiteTask("dtd", Path("dtd"), "natural")], ["vqt"], "")
    assert "- dtd / vqt: num_queries 10 (recipe vtab1k)" in report.splitlines()


def test_a_task_folder_is_a_suite_of_one_with_accuracy_and_cost_in_one_table(suite, tiny_backbone_dir, tmp_path):
    """What `make demo` runs: the bench on one task folder."""
    (task,) = discover_tasks(suite / "beta")
    assert (task.name, task.path, task.group) == ("beta", suite / "beta", "other")  # no suite groups.txt above it
    assert discover_tasks(suite / "beta", {"beta": "structured"})[0].group == "structured"
    # the whole suite's groups serve a suite of one; groups without its task are refused
    assert discover_tasks(suite / "beta", {"alpha": "natural", "beta": "structured"})[0].group == "structured"
    with pytest.raises(ConfigError, match="^groups name no group for the task beta$"):
        discover_tasks(suite / "beta", {"alpha": "natural"})
    out = tmp_path / "demo"
    results = _bench(suite / "beta", tiny_backbone_dir, out, methods=["linear", "vqt"]).run()
    assert [(r["task"], r["method"]) for r in results] == [("beta", "linear"), ("beta", "vqt")]
    lines = (out / "report.md").read_text().splitlines()
    assert "| method | accuracy (%) | trainable params | peak training memory (MiB) | saved for backward (MiB) | " \
           "train seconds |" in lines
    for row in results:
        line = next(l for l in lines if l.startswith(f"| {row['method']} |"))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        assert cells == [row["method"], f"{100 * row['accuracy']:.1f}", str(row["trainable_params"]), "1", "0",
                         f"{row['train_seconds']:.0f}"]
    assert "mean of group means" not in "\n".join(lines) and (out / "pareto.png").is_file()


def test_bench_search_with_seeds_runs_end_to_end_as_stacks(suite, tiny_backbone_dir, tmp_path, monkeypatch, one_fold):
    from querytune.cli import main

    for method in ("linear", "vqt", "synqt", "memory"):  # a 2 x 2 grid each, to keep the test short
        monkeypatch.setattr(METHODS[method], "search_grid", {"lr": (0.5, 0.05), "weight_decay": (1e-3, 0.0)})
        monkeypatch.setattr(METHODS[method], "search_options", {})  # (SynQT's dropout would double its grid)
    import querytune.bench as bench_module
    import querytune.run as run_module

    monkeypatch.setattr(bench_module, "QUICK_EPOCHS", {True: 2, False: 1})
    monkeypatch.setattr(Bench, "cost", lambda self, method: dict(FIXED_COST))  # measured in other tests,
    monkeypatch.setattr(bench_module, "plot_pareto", lambda *args: None)  # and so is the plot (3 s a cell)
    stacks = []
    real = run_module.fit
    monkeypatch.setattr(run_module, "fit",
                        lambda members, *a, **k: stacks.append(len(members)) or real(members, *a, **k))
    out = tmp_path / "report"
    main(["bench", "--suite", str(suite), "--methods", "linear,vqt,synqt,memory", "-b", str(tiny_backbone_dir),
          "--out", str(out), "--search", "--seeds", "3", "--image-size", "32", "--workers", "0", "-q",
          "--min-steps", "0"])  # no step floor: the tiny tasks would train what 800 images take
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2 * 4 * 3 and not any(r.get("error") for r in results)
    assert stacks == ([4] * 4 + [3] * 4) * 2  # per task: each method's grid, then each method's seeds, as stacks
    for task in ("alpha", "beta"):
        for method in ("linear", "vqt", "synqt", "memory"):
            cells = [r for r in results if r["task"] == task and r["method"] == method]
            assert len({(r["lr"], r["weight_decay"]) for r in cells}) == 1  # the one chosen setting for every seed
            configs = [json.loads((out / "runs" / task / method / f"seed{s}" / "config.json").read_text())
                       for s in range(3)]
            assert [(c["train"]["seed"], c["train"]["data_seed"]) for c in configs] == [(0, None), (1, 0), (2, 0)]
    assert " ± " in (out / "report.md").read_text()


def test_the_plan_is_what_the_bench_then_does(suite, tiny_backbone_dir, tmp_path, monkeypatch, one_fold):
    """Cache bytes written and images through the trunk, as planned: the training split once into the cache,
    each evaluated split once for all frozen-trunk runs, an adapting method's every epoch and evaluation."""
    from querytune.backbones.vit import PatchEmbed

    seen = [0]
    real = PatchEmbed.forward
    monkeypatch.setattr(PatchEmbed, "forward", lambda self, images: seen.__setitem__(0, seen[0] + len(images))
                        or real(self, images))
    cache = tmp_path / "cache"
    bench = _bench(suite, tiny_backbone_dir, tmp_path / "out", methods=["linear", "vqt", "memory", "bitfit"],
                   seeds=2, search=True, cache_dir=cache, min_steps=12)
    for method in ("linear", "vqt", "memory", "bitfit"):  # a 2 x 1 grid each, to keep the test short
        monkeypatch.setattr(METHODS[method], "search_grid", {"lr": (0.5, 0.05), "weight_decay": (0.0,)})
    plans = bench.plan()
    assert [p.task for p in plans] == ["alpha", "beta"] and all(p.cells == 4 * (2 + 2) for p in plans)
    results = bench.run()
    assert not any(r.get("error") for r in results)
    written = sum(f.stat().st_size for f in cache.rglob("*.npy"))
    assert written == pytest.approx(sum(p.cache_bytes for p in plans), rel=0.01)
    assert {entry.name.split("-")[1] for entry in cache.iterdir()} == {"train800val200"}  # what is read twice
    assert seen[0] == sum(p.trunk_images for p in plans)
    # the quick profile's 5 epochs for bitfit, which adapts the trunk, floored to 12 steps
    config = TrainConfig.for_method(method_class("bitfit"), bench.settings("bitfit"))
    for plan in plans:
        n = plan.images
        frozen = n["train800val200"] + n["test"]  # one pass each for all frozen runs; val200 from the cache
        search, final = (config.floored(n[split]).epochs for split in ("train800", "train800val200"))
        adapting = 2 * (search * n["train800"] + n["val200"]) + 2 * (final * n["train800val200"] + n["test"])
        assert plan.trunk_images == frozen + adapting
    assert all(p.cells == 0 and p.cache_bytes == 0 and p.trunk_images == 0 for p in bench.plan())  # all done


def test_bench_plan_flag_prints_the_plan_and_cache_splits_caches_the_test_split_too(suite, tiny_backbone_dir,
                                                                                    tmp_path, capsys, monkeypatch):
    from querytune.cli import main

    monkeypatch.setattr(Bench, "cost", lambda self, method: dict(FIXED_COST))
    args = ["bench", "--suite", str(suite), "--methods", "linear,vqt", "-b", str(tiny_backbone_dir), "--image-size",
            "32", "--workers", "0", "-q", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    main(args + ["--plan"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["alpha", "beta"] and lines[2].startswith("in all: ")
    assert "2 runs to train" in lines[0] and not (tmp_path / "out").exists()  # nothing done
    main(args + ["--cache-splits", "train800val200,test"])
    assert sorted(entry.name.split("-")[1] for entry in (tmp_path / "cache").iterdir()) == [
        "test", "test", "train800val200", "train800val200"]


def test_bench_runs_head2toe_dtl_and_ssf(suite, tiny_backbone_dir, tmp_path):
    methods = ["head2toe", "dtl", "dtl+", "ssf"]
    results = _bench(suite / "alpha", tiny_backbone_dir, tmp_path / "out", methods=methods).run()
    assert sorted(r["method"] for r in results) == sorted(methods)
    assert all(not r.get("error") and 0 <= r["accuracy"] <= 1 for r in results)
    options = {r["method"]: r["options"] for r in results}  # what a search chooses beside lr and weight decay
    assert options == {"head2toe": "keep_fraction=0.2", "dtl": None, "dtl+": None, "ssf": None}
    assert "keep_fraction=0.2" in (tmp_path / "out" / "results.csv").read_text()


def test_a_cached_whole_split_holds_its_parts_and_only_the_whole_has_an_entry():
    from querytune.run import cached_splits, entry_splits

    assert cached_splits(None, ["train800val200"]) == ["train800val200", "train800", "val200"]
    assert cached_splits(["test"], ["train800val200"]) == ["test"]  # given, they replace the default
    assert cached_splits(["train800", "test"], []) == ["train800", "test"]  # a part alone has no whole
    assert entry_splits(cached_splits(["val200", "train800val200"], [])) == ["train800val200"]
    assert entry_splits(["train800", "test"]) == ["train800", "test"]
