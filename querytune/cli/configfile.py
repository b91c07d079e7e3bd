"""``--config`` files: YAML or JSON mappings of the same settings the flags set, keyed by the fields'
names, checked as the flags are (:func:`querytune.cli.flags.setting_value`), and the resolved settings
of a command: its defaults, then the file, then the flags given."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError, one_line
from ..options import flag
from .flags import Flags, Given, default_of, setting_value

# what a run's config.json holds beside its settings
RUN_RECORD = ("querytune_version", "num_classes", "classes", "input_size", "schedule")
PrintConfigOpt = typer.Option(False, "--print-config", help="print the resolved settings, a --config file, and exit")


def config_option(note: str = "") -> Any:
    """The ``--config`` option of a command; ``note`` says more of what the file may be."""
    return typer.Option(None, "--config", help=f"YAML or JSON file of these settings{note}; flags override it")


def read_settings_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON file's mapping of settings. YAML's aliases (``*name``) are refused, so a few bytes
    cannot stand for gigabytes ("billion laughs"), and so is a key given twice in one mapping."""
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.2's floats: 1e-3 is a number (PyYAML reads YAML 1.1, where it is a string); no aliases,
        no key twice."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: a YAML alias (*name); settings files take none, write "
                                  "the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in seen:
                    raise ConfigError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice")
                seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
        r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))
    try:
        data = yaml.load(path.read_text(), Loader=Loader)  # JSON is YAML too
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or one_line(error)})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: neither YAML nor JSON ({one_line(error)})") from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def check_file(path: Path, data: Mapping[str, Any], groups: Sequence[Flags],
               sections: Mapping[str, Flags | None] | None = None, prefix: str = "") -> dict[str, Any]:
    """``data`` with every value as its field takes it: every key is a field of one of ``groups`` or
    a section, a mapping of its own group's fields (None: free, the method's options, which the method
    checks), and takes its value; otherwise a one-line ConfigError naming the file and the key (and the
    section it belongs under, where it is one of a section's fields given at the top)."""
    sections = sections or {}
    known = {field.name: (flags.settings, field) for flags in groups for field in flags.fields()}
    checked: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} must be a mapping of settings, got {value!r}")
            inner = sections[key]
            checked[key] = dict(value) if inner is None else check_file(path, value, [inner], prefix=f"{key}.")
        elif key not in known:
            home = next((name for name, inner in sections.items()
                         if inner is not None and key in {field.name for field in inner.fields()}), None)
            if home is not None:
                raise ConfigError(f"{path}: {prefix + key!r} belongs under {home!r} ({home}: {{{key}: ...}})")
            raise ConfigError(f"{path}: unknown setting {prefix + key!r} (known: {', '.join([*known, *sections])})")
        else:
            try:
                checked[key] = setting_value(*known[key], value)
            except ConfigError as error:
                raise ConfigError(f"{path}: {error}") from None
    return checked


def from_run_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json as train's settings (it replays the run); other files as they are."""
    data = dict(data)
    if isinstance(data.get("backbone"), dict):  # the source, name and fingerprint of the backbone
        data["backbone"] = data["backbone"].get("source")
    if isinstance(data.get("normalisation"), dict):  # the normalisation it used
        data["mean"], data["std"] = data["normalisation"].get("mean"), data["normalisation"].get("std")
    data.pop("normalisation", None)
    if isinstance(data.get("recipe"), dict):  # the recipe and the task it was read for
        data["recipe"], data["task_name"] = data["recipe"].get("name"), data.get("task")
    data.pop("task", None)
    for key in RUN_RECORD:
        data.pop(key, None)
    return data


def resolve(groups: Sequence[Flags], from_file: Mapping[str, Any], given: Given) -> dict[str, Any]:
    """The settings of ``groups`` as one mapping: each field's default, the file's value over it, the
    command line's over both."""
    settings = {field.name: default_of(field) for flags in groups for field in flags.fields()}
    settings.update(from_file)
    for flags in groups:
        settings.update(given[flags.settings])
    return settings


def require(settings: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [flag(key) for key in keys if not settings[key]]
    if missing:
        raise ConfigError(f"{', '.join(missing)} missing: give it on the command line or in --config")
