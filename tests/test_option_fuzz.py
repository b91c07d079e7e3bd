"""Every option of every method, and every run, runtime, training and bench setting (each declared
field of RunSpec, Runtime, TrainConfig, BenchSpec and train's own TrainCommand), given a value the
method, the backbone or the run cannot take, on the command line or in a --config file: exit 2, one
line on stderr naming the option, nothing written, and no work started (the check comes before any
feature is computed)."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_vit, write_task
from querytune import bench as bench_module
from querytune import cli, run
from querytune.cli.bench import BENCH_GROUPS
from querytune.cli.serving import SERVE_GROUPS
from querytune.cli.train import TRAIN_GROUPS, TRAINING
from querytune.methods import METHODS
from querytune.options import flag, value_type
from querytune.settings import BenchSpec, RunSpec, Runtime
from querytune.train import TrainConfig

# Free-form string options have no declared type beyond str: their bad values are listed here, and a
# new free-form option fails test_every_free_form_option_has_bad_values until it is added.
FREE_FORM_BAD = {
    "layers": ["0-99", "3", "-1", "x-y", "2-0", "1,1", ""],  # the tiny backbone has blocks 0-2
    "extend": ["no-such-run"],
}
# The free-form settings of train and bench: a value each that the run or the bench refuses up front
# (a tuple: the value and the other flags it needs).
SETTING_BAD: dict[str, list[Any]] = {
    "backbone": ["no-such-folder/vit.safetensors"], "model_name": ["vit_sorcery_patch16_224"],
    "recipe": ["no-such-recipe"], "method": ["sorcery"], "methods": ["sorcery"], "data": ["no-such-task"],
    "suite": ["no-such-suite"],
    "train_split": ["train999"], "eval_split": ["test999"], "val_split": ["val999"],
    "task_name": [("no-such-task", "--recipe", "vtab1k-mini", "-m", "vqt")], "out": ["/dev/null"],
    "device": ["tpu"], "cache_splits": ["test999"], "groups": ["no-groups"], "tasks": ["no-such-task"],
}
# Free-form settings no value of which can be refused before the work starts, and why.
UNCHECKED_UP_FRONT = {
    ("train", "cache"): "any folder may become a feature cache; one that cannot is met where it is written",
    ("bench", "cache"): "the same",
    ("bench", "out"): "the report folder is claimed when the bench starts",
    ("bench", "backbone"): "the backbone is loaded when the bench starts",
}
# Values within the declared bounds that the tiny backbone (width 48, depth 3, 4 x 4 patches) cannot take.
BACKBONE_BAD = {"lora_rank": ["49"], "dtl_rank": ["49"], "add_from_block": ["3"], "fusion_size": ["8"]}


def bad_values(options_cls: type, field: Any) -> Iterator[str]:
    """Command-line values of the wrong type or out of the option's declared bounds."""
    kind, _ = value_type(options_cls, field.name)
    meta = field.metadata
    if kind is bool:
        yield "maybe"  # given as --flag=maybe
        return
    if kind is int:
        yield from ("abc", "2.5")
        if options_cls in METHOD_OPTIONS:
            yield str(2**40)  # as a size: more parameters than any memory holds
    if kind is float:
        yield from ("abc", "nan", "inf")
    if meta.get("min") is not None:
        yield str(meta["min"] if meta["min_open"] else meta["min"] - 1)
    if meta.get("max") is not None:
        yield str(meta["max"] if meta["max_open"] else meta["max"] + 1)
    if meta.get("choices"):
        yield "bogus"
    if typing.get_origin(kind) is list and typing.get_args(kind)[0] is float:
        yield from ("abc", "0.5,0.5")  # 'R,G,B': not numbers, or too few
    if kind in (str, list[str]) and not meta.get("choices") and options_cls in METHOD_OPTIONS:
        yield from FREE_FORM_BAD[field.name]
    yield from BACKBONE_BAD.get(field.name, [])


def setting_bad_values(command: str, settings: type, field: Any) -> Iterator[Any]:
    """A setting's bad values: those of its declared type and bounds, and the listed ones of a free-form one."""
    kind, _ = value_type(settings, field.name)
    yield from bad_values(settings, field)
    if kind in (str, list[str]) and not field.metadata.get("choices") and (command, field.name) not in \
            UNCHECKED_UP_FRONT:
        yield from SETTING_BAD[field.name]


def wrong_type(options_cls: type, field: Any) -> Any:
    """A value of the wrong JSON type for a --config file."""
    kind, _ = value_type(options_cls, field.name)
    return {bool: "yes", int: "two", float: [1.0], str: 5}.get(kind, 5)  # 5 for a list of numbers


METHOD_OPTIONS = {cls.Options for cls in METHODS.values()}
CASES = [(method, field.name, value) for method, cls in sorted(METHODS.items()) for field in fields(cls.Options)
         for value in bad_values(cls.Options, field)]
CONFIG_CASES = [(method, field.name, wrong_type(cls.Options, field)) for method, cls in sorted(METHODS.items())
                for field in fields(cls.Options)]
COMMAND_SETTINGS = {"train": [*TRAIN_GROUPS, TRAINING], "bench": list(BENCH_GROUPS)}
SETTINGS = [(command, flags.settings, field) for command, groups in COMMAND_SETTINGS.items() for flags in groups
            for field in flags.fields()]
SETTING_CASES = [(command, settings, field.name, value) for command, settings, field in SETTINGS
                 for value in setting_bad_values(command, settings, field)]
SERVE_CASES = [(field.name, value) for flags in SERVE_GROUPS for field in flags.fields()
               for value in bad_values(flags.settings, field)]  # the limits (--device: below, with every command)


@pytest.fixture(scope="module")
def task_and_backbone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from querytune.backbones import save_backbone

    root = tmp_path_factory.mktemp("fuzz")
    backbone = root / "tiny-vit.safetensors"
    save_backbone(tiny_vit(), backbone)
    return write_task(root / "task", per_split={"train800": 3, "val200": 3, "test": 3}), backbone


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Computing features or images for training means the bad value was not caught up front."""
    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training work started before the bad option was refused")

    monkeypatch.setattr(run, "make_source", started)


def refused(args: list[str], capsys: pytest.CaptureFixture, tmp_path: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    return lines[0]


def common(task_and_backbone: tuple[Path, Path], tmp_path: Path) -> list[str]:
    task, backbone = task_and_backbone
    return ["-b", str(backbone), "-d", str(task), "-o", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
            "--image-size", "32", "--workers", "0", "-q"]


def test_every_free_form_option_has_bad_values():
    free = {f.name for cls in METHODS.values() for f in fields(cls.Options)
            if value_type(cls.Options, f.name)[0] is str and not f.metadata.get("choices")}
    assert free <= set(FREE_FORM_BAD), f"add bad values for {sorted(free - set(FREE_FORM_BAD))}"


@pytest.mark.parametrize("method,option,value", CASES, ids=[f"{m}-{o}-{v!r}" for m, o, v in CASES])
def test_bad_option_on_the_command_line(method: str, option: str, value: str, task_and_backbone, tmp_path: Path,
                                        capsys: pytest.CaptureFixture, no_work: None):
    kind, _ = value_type(METHODS[method].Options, option)
    given = [f"{flag(option)}={value}"] if kind is bool else [flag(option), value]
    line = refused(["train", "-m", method, *common(task_and_backbone, tmp_path), *given], capsys, tmp_path)
    assert flag(option) in line


@pytest.mark.parametrize("method,option,value", CONFIG_CASES, ids=[f"{m}-{o}" for m, o, _ in CONFIG_CASES])
def test_wrong_type_in_a_config_file(method: str, option: str, value: Any, task_and_backbone, tmp_path: Path,
                                     capsys: pytest.CaptureFixture, no_work: None):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"method": method, "options": {option: value}}))
    line = refused(["train", "--config", str(config), *common(task_and_backbone, tmp_path)], capsys, tmp_path)
    assert flag(option) in line


def test_every_declared_setting_is_fuzzed():
    """Every declared field of the settings dataclasses is a flag of train (bench: its own and its
    runtime's), and every free-form one has bad values or a reason why none is refused up front."""
    covered = {(settings, field.name) for _, settings, field in SETTINGS}
    declared = {(settings, field.name) for settings in (RunSpec, Runtime, TrainConfig, BenchSpec)
                for field in fields(settings) if field.metadata}
    assert declared <= covered, sorted(name for _, name in declared - covered)
    free = {(command, field.name) for command, settings, field in SETTINGS
            if value_type(settings, field.name)[0] in (str, list[str]) and not field.metadata["choices"]}
    listed = {(command, name) for command, name in free if name in SETTING_BAD} | set(UNCHECKED_UP_FRONT)
    assert free <= listed, f"add bad values for {sorted(free - listed)}"


@pytest.fixture
def no_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench that starts means the bad value was not caught up front."""
    def started(self: Any) -> None:
        raise AssertionError("the bench started before the bad setting was refused")

    monkeypatch.setattr(bench_module.Bench, "run", started)


def command_args(command: str, task_and_backbone: tuple[Path, Path], tmp_path: Path) -> list[str]:
    task, backbone = task_and_backbone
    if command == "bench":
        return ["bench", "--suite", str(task), "-b", str(backbone), "-o", str(tmp_path / "run"), "--image-size", "32",
                "--workers", "0", "-q"]
    return ["train", "-m", "linear", *common(task_and_backbone, tmp_path)]


@pytest.mark.parametrize("command,settings,name,value", SETTING_CASES,
                         ids=[f"{c}-{s.__name__}-{n}-{v!r}" for c, s, n, v in SETTING_CASES])
def test_bad_setting_on_the_command_line(command: str, settings: type, name: str, value: Any, task_and_backbone,
                                         tmp_path: Path, capsys: pytest.CaptureFixture, no_work: None,
                                         no_bench: None):
    kind, _ = value_type(settings, name)
    value, *others = value if isinstance(value, tuple) else (value,)
    given = [f"{flag(name)}={value}"] if kind is bool else [flag(name), value]
    line = refused([*command_args(command, task_and_backbone, tmp_path), *given, *others], capsys, tmp_path)
    assert flag(name) in line or value in line


@pytest.mark.parametrize("command,settings,name", [(c, s, f.name) for c, s, f in SETTINGS],
                         ids=[f"{c}-{s.__name__}-{f.name}" for c, s, f in SETTINGS])
def test_setting_of_the_wrong_type_in_a_config_file(command: str, settings: type, name: str, task_and_backbone,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture, no_work: None,
                                                    no_bench: None):
    config = tmp_path / "config.json"
    value = wrong_type(settings, next(f for f in fields(settings) if f.name == name))
    config.write_text(json.dumps({"train": {name: value}} if settings is TrainConfig else {name: value}))
    line = refused([*command_args(command, task_and_backbone, tmp_path), "--config", str(config)], capsys, tmp_path)
    assert flag(name) in line and str(config) in line


@pytest.fixture(scope="module")
def finished_run(task_and_backbone: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    task, backbone = task_and_backbone
    out = tmp_path_factory.mktemp("finished") / "run"
    cli.main(["train", "-m", "linear", "-b", str(backbone), "-d", str(task), "-o", str(out), "--no-cache",
              "--epochs", "1", "--image-size", "32", "--workers", "0", "-q"])
    return out


def other_commands(task_and_backbone: tuple[Path, Path], run_folder: Path, tmp_path: Path) -> dict[str, list[str]]:
    task, backbone = task_and_backbone
    return {
        "bench": ["bench", "--suite", str(task), "-b", str(backbone), "--out", str(tmp_path / "run"),
                  "--image-size", "32", "-q"],
        "cache": ["cache", "build", "-b", str(backbone), "--data", str(task), "--cache", str(tmp_path / "cache"),
                  "--image-size", "32", "-q"],
        "measure": ["measure", "-m", "linear", "-b", str(backbone), "--image-size", "32"],
        "predict": ["predict", "--run", str(run_folder), str(task / "images" / "test")],
        "serve": ["serve", "--run", str(run_folder)],
    }


@pytest.mark.parametrize("command,flags,named", [
    (command, flags, flags[0]) for command in ("bench", "cache", "measure", "predict", "serve")
    for flags in (["--device", "tpu"], ["--workers", "-1"]) if not (command in ("measure", "serve") and
                                                                   flags[0] == "--workers")])
def test_every_command_refuses_a_bad_device_or_worker_count(command: str, flags: list[str], named: str,
                                                            task_and_backbone, finished_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, no_work: None):
    line = refused(other_commands(task_and_backbone, finished_run, tmp_path)[command] + flags, capsys, tmp_path)
    assert named in line


@pytest.mark.parametrize("name,value", SERVE_CASES, ids=[f"{n}-{v!r}" for n, v in SERVE_CASES])
def test_bad_serve_limit_on_the_command_line(name: str, value: str, finished_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Each limit of serve (declared in ServiceLimits) out of its bounds: refused before the model loads."""
    from querytune.serve import MultiTaskServer

    def loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before the bad limit was refused")

    monkeypatch.setattr(MultiTaskServer, "from_runs", loading)
    line = refused(["serve", "--run", str(finished_run), flag(name), value], capsys, tmp_path)
    assert flag(name) in line
