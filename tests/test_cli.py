"""The command line: the train/eval/info contract, what the flags and --config files build (the
RunSpec, Runtime, training settings and BenchSpec handed to the runs), and one-line errors with exit
code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from querytune import cli


def querytune(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "querytune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_train_then_eval(tiny_backbone_dir, tiny_task, tmp_path):
    out = tmp_path / "run"
    result = querytune("train", "--method", "linear", "--backbone", tiny_backbone_dir, "--data", tiny_task,
                       "--out", out, "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--workers", "0", "-q")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and (out / "adapter.safetensors").is_file() and (out / "config.json").is_file()
    result = querytune("eval", "--run", out, "--data", tiny_task, "--split", "test", "--workers", "0", "-q")
    assert result.returncode == 0, result.stderr
    assert f"test accuracy: {metrics['test_accuracy']:.4f}" in result.stdout


@pytest.mark.parametrize("method,flags", [
    ("vqt+lora", {"--num-queries": "2", "--lora-rank": "2", "--lora-alpha": "4", "--lora-dropout": "0.1"}),
    ("vqt+vpt", {"--prompts": "2", "--vpt-mode": "shallow", "--prompt-dropout": "0.2"}),
    ("adaptformer", {"--adapter-dim": "4", "--adapter-scale": "0.5", "--adapter-dropout": "0.0"}),
    ("dtl+", {"--dtl-rank": "3", "--swish-beta": "10.0", "--add-from-block": "2", "--fusion-size": "2"}),
])
def test_method_flags_reach_the_options(method, flags, tiny_backbone_dir, tiny_task, tmp_path):
    out = tmp_path / "run"
    result = querytune("train", "--method", method, "--backbone", tiny_backbone_dir, "--data", tiny_task,
                       "--out", out, "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--eval-split", "",
                       "--workers", "0", "-q", *[x for kv in flags.items() for x in kv])
    assert result.returncode == 0, result.stderr
    options = json.loads((out / "config.json").read_text())["options"]
    for flag, value in flags.items():
        given = options[flag[2:].replace("-", "_")]
        assert str(given) == value or given == float(value), flag


def test_info(tiny_backbone_dir):
    result = querytune("info", "--backbone", tiny_backbone_dir)
    assert result.returncode == 0, result.stderr
    assert "depth (L)" in result.stdout and "parameters" in result.stdout


@pytest.mark.parametrize("case", ["missing data", "unknown method", "bad split", "unknown option"])
def test_user_errors_are_one_line_with_exit_code_2(case, tiny_backbone_dir, tiny_task, tmp_path):
    args = {"--method": "linear", "--backbone": tiny_backbone_dir, "--data": tiny_task, "--out": tmp_path / "run"}
    extra: list[str] = []
    if case == "missing data":
        args["--data"] = tmp_path / "no-such-task"
    elif case == "unknown method":
        args["--method"] = "sorcery"
    elif case == "bad split":
        extra = ["--train-split", "train999"]
    else:
        extra = ["--num-queries", "4"]
    result = querytune("train", *[x for kv in args.items() for x in kv], *extra, "--image-size", "32", "-q")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    culprit = {"missing data": "no-such-task", "unknown method": "sorcery", "bad split": "train999",
               "unknown option": "--num-queries"}[case]
    assert culprit in lines[0]
    assert not (tmp_path / "run").exists()


def test_synqt_flags_reach_the_method(tiny_backbone_dir, tiny_task, tmp_path):
    common = ["--method", "synqt", "--backbone", tiny_backbone_dir, "--data", tiny_task, "--epochs", "1",
              "--batch-size", "8", "--image-size", "32", "--workers", "0", "-q"]
    flags = ["--num-queries", "2", "--attn-scale", "1.0", "--ffn-scale", "0.5", "--feat-scale", "1.0",
             "--adapter-dim", "6", "--qsm-dim", "3", "--dropout", "0.2", "--head-drop-path", "0.1"]
    result = querytune("train", *common, *flags, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert options == {"num_queries": 2, "attn_scale": 1.0, "ffn_scale": 0.5, "feat_scale": 1.0,
                       "adapter_dim": 6, "qsm_dim": 3, "dropout": 0.2, "head_drop_path": 0.1}
    result = querytune("train", *common, "--qsm-dim", "0", "--out", tmp_path / "bad")
    assert result.returncode == 2 and "--qsm-dim" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_corrupt_image_names_its_path(tiny_backbone_dir, tiny_task, tmp_path):
    victim = sorted((tiny_task / "images" / "train800").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:50])
    result = querytune("train", "--method", "linear", "--backbone", tiny_backbone_dir, "--data", tiny_task,
                       "--out", tmp_path / "run", "--epochs", "1", "--image-size", "32", "--workers", "0", "-q")
    assert result.returncode == 2
    assert str(victim) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_takes_the_options_of_a_method_registered_only_here(monkeypatch, tmp_path, capsys):
    """The command line comes from the registry: a new method needs no change to the CLI."""
    from dataclasses import dataclass

    from querytune import cli, run
    from querytune.methods import METHODS, Method
    from querytune.options import option
    from querytune.trunk import TrunkInput

    @dataclass
    class GammaOptions:
        gamma_width: int = option(3, "width of the gamma path", min=1)
        gamma_gate: bool = option(False, "gate the gamma path")

    class Gamma(Method):
        name = "gamma"
        reads = TrunkInput.CLASS_TOKEN
        Options = GammaOptions

    monkeypatch.setitem(METHODS, "gamma", Gamma)
    seen = {}

    def fake_train_run(spec, out, train, runtime):
        seen.update(method=spec.method, options=spec.options)
        return {"method": spec.method}

    monkeypatch.setattr(run, "train_run", fake_train_run)
    cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--gamma-width gamma: width of the gamma path; default 3" in shown
    assert "--gamma-gate/--no-gamma-gate gamma: gate the gamma path; default False" in shown
    cli.main(["train", "-m", "gamma", "-b", "b", "-d", str(tmp_path), "-o", str(tmp_path / "run"),
              "--gamma-width", "7", "--gamma-gate"])
    assert seen == {"method": "gamma", "options": {"gamma_width": 7, "gamma_gate": True}}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "-m", "gamma", "-b", "b", "-d", str(tmp_path), "-o", str(tmp_path / "run"),
                  "--gamma-widht", "7"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: unknown option or extra argument '--gamma-widht' "
                                               "(see querytune train --help)")


def test_image_size_that_is_no_multiple_of_the_patch_size_is_one_line(tiny_backbone_dir, tiny_task, tmp_path):
    result = querytune("train", "--method", "linear", "--backbone", tiny_backbone_dir, "--data", tiny_task,
                       "--out", tmp_path / "run", "--image-size", "36", "-q")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --image-size 36: must be a positive multiple of the backbone's patch size 8"
    assert not (tmp_path / "run").exists()


def test_config_file_and_the_same_flags_give_identical_runs_and_config_json_replays(tiny_backbone_dir, tiny_task,
                                                                                   tmp_path):
    flags = ["--method", "vqt", "--backbone", tiny_backbone_dir, "--data", tiny_task, "--image-size", "32",
             "--epochs", "2", "--batch-size", "4", "--num-queries", "2", "--query-dropout", "0", "-q"]
    assert querytune("train", *flags, "--out", tmp_path / "flags").returncode == 0
    config = tmp_path / "vqt.yaml"
    config.write_text(f"method: vqt\nbackbone: {tiny_backbone_dir}\ndata: {tiny_task}\nimage_size: 32\n"
                      "options: {num_queries: 2, query_dropout: 0.0}\ntrain: {epochs: 2, batch_size: 4}\n")
    assert querytune("train", "--config", config, "--out", tmp_path / "file", "-q").returncode == 0
    replay = querytune("train", "--config", tmp_path / "flags" / "config.json", "--seed", "1", "--out",
                       tmp_path / "replay", "-q")
    assert replay.returncode == 0, replay.stderr
    runs = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("flags", "file", "replay")}
    assert runs["file"] == runs["flags"]
    assert runs["replay"]["train"] == {**runs["flags"]["train"], "seed": 1}  # the flag overrides the file
    assert {k: v for k, v in runs["replay"].items() if k != "train"} == {k: v for k, v in runs["flags"].items()
                                                                         if k != "train"}
    adapters = {name: (tmp_path / name / "adapter.safetensors").read_bytes() for name in ("flags", "file")}
    assert adapters["file"] == adapters["flags"]

    shown = querytune("train", "--config", config, "--epochs", "5", "--print-config")
    assert shown.returncode == 0 and json.loads(shown.stdout)["train"] == {"epochs": 5, "batch_size": 4}
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("method: [vqt", "neither YAML nor JSON"),
    ("- vqt", "expected a mapping of settings, got list"),
    ("methd: vqt", "unknown setting 'methd' (known: backbone, image_size,"),
    ("train: {lrr: 0.1}", "unknown setting 'train.lrr' (known: epochs, batch_size,"),
    ("image_size: big", "--image-size must be an integer (got 'big')"),
    ("train: {epochs: ten}", "--epochs must be an integer (got 'ten')"),
    ("options: {num_queries: 0}", "--num-queries must be at least 1 (got 0)"),
    ("epochs: 3", "'epochs' belongs under 'train' (train: {epochs: ...})"),
    ("method: vqt\ntrain: {epochs: 1, epochs: 2}", "line 2: 'epochs' is given twice"),
    ('{"method": "vqt", "method": "linear"}', "line 1: 'method' is given twice"),
    # "billion laughs": each level names the one above nine times (a real bomb has ten levels)
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]",
     "line 2: a YAML alias (*name); settings files take none"),
])
def test_bad_config_files_are_one_line_errors_and_write_nothing(text, message, tiny_backbone_dir, tiny_task, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(text + "\n")
    result = querytune("train", "--config", config, "--method", "vqt", "--backbone", tiny_backbone_dir, "--data",
                       tiny_task, "--out", tmp_path / "run", "--image-size", "32", "-q")  # the file is checked whole
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_bench_takes_a_config_file_that_flags_override(tmp_path):
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"suite": "tasks", "backbone": "vit.safetensors", "out": "report",
                                  "methods": "linear,vqt,synqt", "profile": "paper", "seeds": 3}))
    shown = querytune("bench", "--config", config, "--seeds", "2", "--print-config")
    assert shown.returncode == 0, shown.stderr
    settings = json.loads(shown.stdout)
    assert (settings["methods"], settings["profile"], settings["seeds"], settings["image_size"]) == (
        ["linear", "vqt", "synqt"], "paper", 2, 224)
    config.write_text(json.dumps({"suite": "tasks", "sedes": 3}))
    result = querytune("bench", "--config", config, "--print-config")
    assert result.returncode == 2 and "unknown setting 'sedes' (known: backbone, image_size," in result.stderr


def test_a_backbone_of_unknown_normalisation_needs_mean_and_std(tiny_task, tmp_path):
    """Normalisation is never guessed: an .npz checkpoint names none, so a run must give it; the run
    records it, and evaluation uses what the run recorded."""
    import torch
    from test_loading import write_npz_checkpoint

    from querytune.backbones.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    npz = tmp_path / "vit.npz"
    write_npz_checkpoint(VisionTransformer(ViTConfig(embed_dim=48, depth=2, num_heads=4, patch_size=8,
                                                     image_size=32)), npz)
    args = ["train", "--method", "linear", "--backbone", npz, "--data", tiny_task, "--image-size", "32", "--epochs",
            "2", "-q"]
    missing = querytune(*args, "--out", tmp_path / "a")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "backbone vit.npz: its normalisation is unknown" in missing.stderr
    assert "give --mean and --std" in missing.stderr
    short = querytune(*args, "--out", tmp_path / "a", "--mean", "0.5,0.5", "--std", "0.5,0.5,0.5")
    assert short.returncode == 2 and "--mean needs 3 values (R, G, B), got 2" in short.stderr
    assert not (tmp_path / "a").exists()

    given = querytune(*args, "--out", tmp_path / "run", "--mean", "0.4,0.5,0.6", "--std", "0.2,0.3,0.4")
    assert given.returncode == 0, given.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["normalisation"] == {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = querytune("eval", "--run", tmp_path / "run", "--data", tiny_task, "-q")
    assert evaluated.returncode == 0 and f"test accuracy: {metrics['test_accuracy']:.4f}" in evaluated.stdout
    assert "unknown: its checkpoint names none" in " ".join(querytune("info", "--backbone", npz).stdout.split())


def test_rerunning_a_finished_train_is_a_no_op_and_other_settings_are_listed(tiny_backbone_dir, tiny_task, tmp_path):
    args = ["train", "--method", "linear", "--backbone", tiny_backbone_dir, "--data", tiny_task, "--out",
            tmp_path / "run", "--image-size", "32", "--epochs", "2", "-q"]
    assert querytune(*args).returncode == 0
    adapter = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    again = querytune(*args)
    assert again.returncode == 0 and "test_accuracy" in again.stdout
    other = querytune(*args, "--lr", "0.5")
    assert other.returncode == 2
    assert other.stderr.strip().endswith("holds a finished run with other settings (train.lr: 0.03 -> 0.5); "
                                         "choose another --out")
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() == adapter


# What the commands build: the run, runtime and training settings handed to the runs, caught here.


@pytest.fixture
def calls(monkeypatch) -> dict[str, Any]:
    """What train_run, train_grid, eval_runs and Bench were called with (nothing is trained)."""
    from querytune import bench, grid, run

    seen: dict[str, Any] = {}

    def train_run(spec, out, train=None, runtime=None):
        seen["train_run"] = {"spec": spec, "out": out, "train": train, "runtime": runtime}
        return {"method": spec.method}

    def train_grid(spec, out, train, runtime, *, search, seeds, folds=None):
        seen["train_grid"] = {"spec": spec, "out": out, "train": train, "runtime": runtime, "search": search,
                              "seeds": seeds}
        return {"search": [], "chosen": {}, "seeds": [], "eval_split": "test", "mean_accuracy": None}

    def eval_runs(runs, data, split, runtime, backbone=None):
        seen["eval_runs"] = {"runs": runs, "data": data, "split": split, "runtime": runtime, "backbone": backbone}
        return [0.5] * len(runs)

    class Bench:
        def __init__(self, spec, runtime):
            seen["bench"] = {"spec": spec, "runtime": runtime}

        def run(self):
            (Path(seen["bench"]["spec"].out) / "report.md").write_text("report")
            return []

    monkeypatch.setattr(run, "train_run", train_run)
    monkeypatch.setattr(grid, "train_grid", train_grid)
    monkeypatch.setattr(run, "eval_runs", eval_runs)
    monkeypatch.setattr(bench, "Bench", Bench)
    return seen


def test_flags_reach_the_run_spec_the_runtime_and_the_training_settings(calls, tmp_path):
    from querytune.settings import RunSpec, Runtime

    cli.main(["train", "-m", "vqt", "-b", "vit.safetensors", "-d", str(tmp_path / "task"), "-o", str(tmp_path / "run"),
              "--image-size", "32", "--mean", "0.1,0.2,0.3", "--std", "0.5,0.5,0.5", "--eval-split", "",
              "--log", "csv", "--log", "tensorboard", "--train-split", "train800", "--eval-every", "2",
              "--task-name", "t", "--num-queries", "3", "--momentum", "0.5", "--min-lr", "0.001", "--data-seed", "7",
              "--optimizer", "sgd", "--epochs", "4", "--precision", "bf16", "--no-augment", "--workers", "0",
              "--device", "cpu", "--cache", str(tmp_path / "cache"), "--cache-splits", "train800,val200",
              "--cache-placement", "host", "-q"])
    call = calls["train_run"]
    assert call["spec"] == RunSpec(method="vqt", backbone="vit.safetensors", data=str(tmp_path / "task"),
                                   image_size=32, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5], eval_split=None,
                                   log=["csv", "tensorboard"], train_split="train800", eval_every=2, task_name="t",
                                   options={"num_queries": 3})
    assert call["out"] == tmp_path / "run"
    assert call["train"] == {"momentum": 0.5, "min_lr": 0.001, "data_seed": 7, "optimizer": "sgd", "epochs": 4,
                             "precision": "bf16", "augment": False}  # only what was given: the method fills the rest
    assert call["runtime"] == Runtime(device="cpu", workers=0, cache=str(tmp_path / "cache"),
                                      cache_splits=["train800", "val200"], cache_placement="host", progress=False)


def test_the_defaults_a_run_gets_from_the_command_line(calls, tmp_path, monkeypatch):
    from querytune.settings import RunSpec, Runtime

    monkeypatch.setenv("QUERYTUNE_CACHE", str(tmp_path / "default-cache"))
    cli.main(["train", "-m", "linear", "-b", "b", "-d", "task", "-o", str(tmp_path / "run")])
    call = calls["train_run"]
    assert call["spec"] == RunSpec(method="linear", backbone="b", data="task")
    assert call["spec"].eval_split == "test" and call["train"] == {}
    assert call["runtime"] == Runtime(cache=str(tmp_path / "default-cache"))  # --no-cache: None, the trunk live
    cli.main(["train", "-m", "linear", "-b", "b", "-d", "task", "-o", str(tmp_path / "run"), "--no-cache"])
    assert calls["train_run"]["runtime"].cache is None


def test_grid_and_seeds_reach_train_grid(calls, tmp_path):
    cli.main(["train", "-m", "vqt", "-b", "b", "-d", "task", "-o", str(tmp_path / "run"), "--grid", "--seeds", "3",
              "--seed", "5", "--lr", "0.1"])
    call = calls["train_grid"]
    assert (call["search"], call["seeds"], call["train"]) == (True, [5, 6, 7], {"seed": 5, "lr": 0.1})
    assert "train_run" not in calls


def test_a_flag_overrides_the_config_file(calls, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: vqt\nbackbone: b\ndata: task\nimage_size: 32\nlog: csv\nworkers: 2\n"
                      "options: {num_queries: 2, query_dropout: 0.1}\ntrain: {epochs: 2, lr: 0.5}\n")
    cli.main(["train", "--config", str(config), "-o", str(tmp_path / "run"), "--image-size", "64", "--workers", "0",
              "--num-queries", "4", "--epochs", "3", "--no-progress"])
    call = calls["train_run"]
    assert (call["spec"].image_size, call["spec"].log, call["spec"].method) == (64, ["csv"], "vqt")
    assert call["spec"].options == {"num_queries": 4, "query_dropout": 0.1}
    assert call["train"] == {"epochs": 3, "lr": 0.5}
    assert (call["runtime"].workers, call["runtime"].progress) == (0, False)


def test_print_config_round_trips_as_a_config_file(calls, tmp_path, capsys):
    args = ["-m", "vqt", "-b", "b", "-d", "task", "-o", str(tmp_path / "run"), "--mean", "0.1,0.2,0.3",
            "--std", "0.5,0.5,0.5", "--log", "csv", "--epochs", "3", "--num-queries", "2", "--cache-splits", "train",
            "--compile", "default", "-q"]
    cli.main(["train", *args])
    direct = calls.pop("train_run")
    capsys.readouterr()  # the metrics it printed
    cli.main(["train", *args, "--print-config"])
    printed = capsys.readouterr().out
    assert "train_run" not in calls
    config = tmp_path / "printed.json"
    config.write_text(printed)
    cli.main(["train", "--config", str(config)])
    assert calls["train_run"] == direct
    capsys.readouterr()
    cli.main(["train", "--config", str(config), "--print-config"])
    assert json.loads(capsys.readouterr().out) == json.loads(printed)


def test_print_config_with_a_recipe_prints_the_recipe_options(tmp_path, capsys):
    from querytune.recipes import recipe_options

    cli.main(["train", "-m", "vqt", "-b", "b", "-d", str(tmp_path / "dtd10"), "--recipe", "vtab1k-mini",
              "--num-queries", "3", "--print-config"])
    options = json.loads(capsys.readouterr().out)["options"]
    assert options == {**recipe_options("vtab1k-mini", "vqt", "dtd10"), "num_queries": 3}
    assert len(options) > 1  # the recipe's own, under the one given


@pytest.mark.parametrize("args,says", [
    (["--bf16"], "unknown option or extra argument '--bf16'"),  # --precision bf16 is its one spelling
    (["--no-cache", "--cache", "c"], "--cache and --no-cache exclude each other"),
    (["--seeds", "0"], "--seeds must be at least 1 (got 0)"),
    (["--mean", "a,b,c"], "--mean 'a,b,c': expected numbers separated by commas"),
    (["--log", "csv,xml"], "--log must be one of csv, tensorboard (got 'xml')"),
    (["--momentum", "2"], "--momentum must be in [0, 1] (got 2.0)"),
])
def test_bad_combinations_are_one_line(args, says, calls, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "-m", "linear", "-b", "b", "-d", "task", "-o", str(tmp_path / "run"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {says}")
    assert not calls


def test_every_setting_has_a_flag_with_its_help(capsys):
    """train, bench, serve and predict --help list a flag for every declared setting they take (serve: every
    limit of ServiceLimits), with the setting's help."""
    from querytune.cli.bench import BENCH_GROUPS
    from querytune.cli.serving import PREDICT_RUNTIME, SERVE_GROUPS
    from querytune.cli.train import TRAIN_GROUPS, TRAINING
    from querytune.options import flag
    from querytune.service import ServiceLimits

    assert {field.name for flags in SERVE_GROUPS if flags.settings is ServiceLimits for field in flags.fields()} \
        == {field.name for field in fields(ServiceLimits)}
    for command, groups in (("train", [*TRAIN_GROUPS, TRAINING]), ("bench", BENCH_GROUPS), ("serve", SERVE_GROUPS),
                            ("predict", [PREDICT_RUNTIME])):
        cli.main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.replace("│", " ").split())
        for flags in groups:
            for field in flags.fields():
                assert flag(field.name) in shown, (command, field.name)
                assert " ".join(field.metadata["help"].split()[:4]) in shown, (command, field.name)


def test_eval_takes_the_runtime_flags(calls, tmp_path):
    from querytune.settings import Runtime

    cli.main(["eval", "-r", str(tmp_path / "run"), "-d", "task", "--split", "val200", "--workers", "1",
              "--cache-placement", "host", "-q"])
    call = calls["eval_runs"]
    assert (call["runs"], call["data"], call["split"], call["backbone"]) == ([tmp_path / "run"], Path("task"),
                                                                             "val200", None)
    assert call["runtime"] == Runtime(workers=1, cache_placement="host", progress=False)  # no cache: the trunk live


def test_bench_flags_and_config_file_reach_the_bench_spec(calls, tmp_path):
    from querytune.settings import BenchSpec, Runtime

    config = tmp_path / "bench.yaml"
    config.write_text("suite: tasks\nbackbone: b\nmethods: linear,synqt\nseeds: 3\n")
    cli.main(["bench", "--config", str(config), "-o", str(tmp_path), "--seeds", "2", "--tasks", "a,b",
              "--precision", "bf16", "--search", "--workers", "0", "-q"])
    assert calls["bench"]["spec"] == BenchSpec(suite="tasks", backbone="b", methods=["linear", "synqt"], seeds=2,
                                               out=str(tmp_path), tasks=["a", "b"], precision="bf16", search=True)
    assert calls["bench"]["runtime"] == Runtime(workers=0, progress=False)


def test_the_old_cache_form_is_gone(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cache", "--backbone", "b", "--data", "task", "--cache", str(tmp_path)])
    assert exit_info.value.code == 2 and "--backbone" in capsys.readouterr().err
