"""Every option of every method, and every training setting, given a value the method, the backbone
or the training loop cannot take, on the command line or in a --config file: exit 2, one line on
stderr naming the option, nothing written, and no work started (the check comes before any feature
is computed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_vit, write_task
from querytune import cli, run
from querytune.cli import TRAIN_SETTINGS, TrainCommand
from querytune.methods import METHODS
from querytune.options import flag, value_type
from querytune.train import TrainConfig

# Free-form string options have no declared type beyond str: their bad values are listed here, and a
# new free-form option fails test_every_free_form_option_has_bad_values until it is added.
FREE_FORM_BAD = {
    "layers": ["0-99", "3", "-1", "x-y", "2-0", "1,1", ""],  # the tiny backbone has blocks 0-2
    "extend": ["no-such-run"],
}
# Values within the declared bounds that the tiny backbone (width 48) cannot take.
BACKBONE_BAD = {"lora_rank": ["49"]}


def bad_values(options_cls: type, field: Any) -> Iterator[str]:
    """Command-line values of the wrong type or out of the option's declared bounds."""
    kind, _ = value_type(options_cls, field.name)
    meta = field.metadata
    if kind is bool:
        yield "maybe"  # given as --flag=maybe
        return
    if kind is int:
        yield from ("abc", "2.5")
        if options_cls is not TrainConfig:
            yield str(2**40)  # as a size: more parameters than any memory holds
    if kind is float:
        yield from ("abc", "nan", "inf")
    if meta.get("min") is not None:
        yield str(meta["min"] if meta["min_open"] else meta["min"] - 1)
    if meta.get("max") is not None:
        yield str(meta["max"] if meta["max_open"] else meta["max"] + 1)
    if meta.get("choices"):
        yield "bogus"
    if kind is str and not meta.get("choices"):
        yield from FREE_FORM_BAD[field.name]
    yield from BACKBONE_BAD.get(field.name, [])


def wrong_type(options_cls: type, field: Any) -> Any:
    """A value of the wrong JSON type for a --config file."""
    kind, _ = value_type(options_cls, field.name)
    return {bool: "yes", int: "two", float: [1.0], str: 5}.get(kind, 5)  # 5 for a list of numbers


CASES = [(method, field.name, value) for method, cls in sorted(METHODS.items()) for field in fields(cls.Options)
         for value in bad_values(cls.Options, field)]
CONFIG_CASES = [(method, field.name, wrong_type(cls.Options, field)) for method, cls in sorted(METHODS.items())
                for field in fields(cls.Options)]
TRAIN_FIELDS = [field for field in fields(TrainConfig) if field.name in TRAIN_SETTINGS]
TRAIN_CASES = [(field.name, value) for field in TRAIN_FIELDS for value in bad_values(TrainConfig, field)]


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


def test_every_training_setting_is_fuzzed():
    assert {field.name for field in TRAIN_FIELDS} == set(TRAIN_SETTINGS)


@pytest.mark.parametrize("setting,value", TRAIN_CASES, ids=[f"{s}-{v!r}" for s, v in TRAIN_CASES])
def test_bad_training_setting_on_the_command_line(setting: str, value: str, task_and_backbone, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, no_work: None):
    kind, _ = value_type(TrainConfig, setting)
    given = [f"{flag(setting)}={value}"] if kind is bool else [flag(setting), value]
    line = refused(["train", "-m", "linear", *common(task_and_backbone, tmp_path), *given], capsys, tmp_path)
    assert flag(setting) in line


@pytest.mark.parametrize("setting", [field.name for field in TRAIN_FIELDS])
def test_training_setting_of_the_wrong_type_in_a_config_file(setting: str, task_and_backbone, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, no_work: None):
    config = tmp_path / "config.json"
    value = wrong_type(TrainConfig, next(f for f in TRAIN_FIELDS if f.name == setting))
    config.write_text(json.dumps({"method": "linear", "train": {setting: value}}))
    line = refused(["train", "--config", str(config), *common(task_and_backbone, tmp_path)], capsys, tmp_path)
    assert flag(setting) in line


@pytest.mark.parametrize("flags,named", [(["--workers", "-1"], "--workers"), (["--device", "tpu"], "--device"),
                                         (["--image-size", "30"], "--image-size")])
def test_bad_run_settings(flags: list[str], named: str, task_and_backbone, tmp_path: Path,
                          capsys: pytest.CaptureFixture, no_work: None):
    line = refused(["train", "-m", "linear", *common(task_and_backbone, tmp_path), *flags], capsys, tmp_path)
    assert named in line


@pytest.mark.parametrize("key", [field.name for field in fields(TrainCommand)])
def test_command_setting_of_the_wrong_type_in_a_config_file(key: str, task_and_backbone, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, no_work: None):
    config = tmp_path / "config.json"
    value = wrong_type(TrainCommand, next(field for field in fields(TrainCommand) if field.name == key))
    config.write_text(json.dumps({"method": "linear", key: value}))
    line = refused(["train", "--config", str(config), *common(task_and_backbone, tmp_path)], capsys, tmp_path)
    assert flag(key) in line


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
