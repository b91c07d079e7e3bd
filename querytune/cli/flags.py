"""Flags generated from the settings dataclasses (:mod:`querytune.settings`, :class:`querytune.train.TrainConfig`)
and from the methods' options dataclasses: one flag per declared field, its help from the field's
``option(...)`` (bounds, choices, default), and its value converted and checked as a config file's is
(:func:`setting_value`).

A command declares which settings it takes with :func:`settings_command`; the generated flags join its
own typer options, and the command receives ``given``: per settings class, the values the command line gave.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Optional

import typer

from ..errors import ConfigError
from ..options import check_value, describe_range, flag, value_type

Given = dict[type, dict[str, Any]]  # per settings class, the values given on the command line
NEGATIVE_ALIASES = {"progress": (" /--quiet", " /-q")}  # --no-progress as the commands have always spelled it


@dataclass(frozen=True)
class Flags:
    """The flags of one settings dataclass on a command: all its declared fields, or ``only`` these,
    shown under ``panel`` in ``--help``. ``method_defaults``: a method's protocol sets the defaults."""

    settings: type
    panel: str
    only: tuple[str, ...] | None = None
    method_defaults: bool = False

    def fields(self) -> list[Field]:
        """The fields declared with ``option()`` (plain fields hold a Python caller's objects)."""
        return [f for f in fields(self.settings) if f.metadata and (self.only is None or f.name in self.only)]


def default_of(field: Field) -> Any:
    return field.default_factory() if field.default_factory is not MISSING else field.default


def field_help(settings: type, field: Field, method_defaults: bool = False) -> str:
    """The field's help with its choices (where the help does not name them), range and default."""
    meta = field.metadata
    notes = []
    if meta["choices"] and not all(choice in meta["help"] for choice in meta["choices"]):
        notes.append(" | ".join(meta["choices"]))
    if span := describe_range(meta):
        notes.append(span)
    default = default_of(field)
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    if "default" in meta["help"]:
        pass  # the help says it (--data-seed's is --seed)
    elif method_defaults:
        notes.append("default: the method's protocol" + ("" if default is None else f", else {shown}"))
    elif default is not None and default != [] and default is not False:
        notes.append(f"default {shown}")
    return meta["help"] + (f" ({'; '.join(notes)})" if notes else "")


def setting_help(settings: type, name: str, note: str = "") -> str:
    """A declared field's help, for a command's plain option of the same meaning (``eval --data``)."""
    return field_help(settings, next(f for f in fields(settings) if f.name == name)) + note


def image_size_option() -> Any:
    """``--image-size`` where a command takes it as a plain option (``measure``, ``info``, ``cache build``): the
    string :class:`~querytune.options.ImageSize` reads, as the settings' ``--image-size`` is read."""
    from ..settings import ModelSpec

    return typer.Option("224", "--image-size", help=setting_help(ModelSpec, "image_size"))


def parameter(flags: Flags, field: Field) -> inspect.Parameter:
    """The typer option of one field: ``--name`` (``--name/--no-name`` for a switch), its short form."""
    kind, _ = value_type(flags.settings, field.name)
    names = [flag(field.name)]
    annotation: Any = Optional[kind]
    extra: dict[str, Any] = {}
    if field.metadata.get("parse"):  # several spellings (--image-size N or HxW): read by the field's own parse
        annotation = Optional[str]
    elif kind is bool:
        if not field.name.startswith("no_"):  # --no-cache is a switch alone
            names = [f"{names[0]}/--no-{names[0][2:]}", *NEGATIVE_ALIASES.get(field.name, ())]
    elif typing.get_origin(kind) is list:
        annotation = Optional[list[str]]  # repeated or comma-separated: 'R,G,B', 'linear,vqt'
        extra["metavar"] = "<a,b,...>"
    if field.metadata["short"]:
        names.append(field.metadata["short"])
    option = typer.Option(None, *names, help=field_help(flags.settings, field, flags.method_defaults),
                          rich_help_panel=flags.panel, show_default=False, **extra)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def setting_value(settings: type, field: Field, value: Any) -> Any:
    """A flag's or a config file's value as the field takes it (a list also as 'a,b'), checked."""
    kind, _ = value_type(settings, field.name)
    if field.metadata.get("parse") and value is not None:
        return field.metadata["parse"](value, flag(field.name))
    if typing.get_origin(kind) is list and value is not None:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            parts = [part.strip() for item in items for part in item.split(",") if part.strip()]
            value = numbers(parts, field.name) if typing.get_args(kind)[0] is float else parts
    check_value(settings, field, value)
    return value


def numbers(parts: list[str], name: str) -> list[float]:
    try:
        return [float(part) for part in parts]
    except ValueError as error:
        raise ConfigError(f"{flag(name)} {','.join(parts)!r}: expected numbers separated by commas, e.g. "
                          "0.485,0.456,0.406") from error


def given_values(flags: Flags, values: dict[str, Any]) -> dict[str, Any]:
    """The values the command line gave for ``flags``' fields (None: not given), converted and checked."""
    return {field.name: setting_value(flags.settings, field, values[field.name]) for field in flags.fields()
            if values[field.name] is not None and values[field.name] != []}


def settings_command(*groups: Flags) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command with a flag for every field of ``groups`` beside its own options; it is called with
    ``given`` (:data:`Given`) in place of those flags."""
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "given"]
        generated = [parameter(flags, field) for flags in groups for field in flags.fields()]
        names = [p.name for p in own + generated]
        assert len(names) == len(set(names)), f"{command.__name__}: a flag declared twice"

        @functools.wraps(command)
        def with_settings(**values: Any) -> None:
            given = {flags.settings: given_values(flags, values) for flags in groups}
            command(**{p.name: values[p.name] for p in own}, given=given)

        parameters = own + generated
        with_settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_settings
    return decorate


def settings_of(settings: type, resolved: dict[str, Any], only: Sequence[str] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``settings`` in the resolved (flat) settings of a command."""
    return {f.name: resolved[f.name] for f in Flags(settings, "", tuple(only) if only else None).fields()}


# The methods' options: one flag per option name of the registered methods, parsed from what typer left over.


def _option_users() -> dict[str, list[tuple[str, Any, type]]]:
    """Each option name of the registered methods with the methods that take it (name, field, Options)."""
    from ..methods import METHODS

    users: dict[str, list[tuple[str, Any, type]]] = {}
    for name, cls in sorted(METHODS.items()):
        for field in fields(cls.Options):
            users.setdefault(field.name, []).append((name, field, cls.Options))
    return users


def method_options_parser() -> argparse.ArgumentParser:
    """A parser for the method options of ``train``, one flag per option name of the registered methods
    (an option several methods share is one flag), typed from the options dataclasses."""
    parser = argparse.ArgumentParser(prog="querytune train", add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    for option_name, uses in _option_users().items():
        kind, _ = value_type(uses[0][2], option_name)
        if kind is bool:
            parser.add_argument(flag(option_name), action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag(option_name), type={int: int, float: float}.get(kind, str), default=None)
    return parser


def parse_method_options(args: list[str]) -> dict[str, Any]:
    """The method options given on ``train``'s command line (what typer's own options left over)."""
    parser = method_options_parser()
    try:
        parsed, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as error:
        raise ConfigError(str(error)) from None
    if unknown:
        raise ConfigError(f"unknown option or extra argument {unknown[0]!r} (see querytune train --help)")
    return {key: value for key, value in vars(parsed).items() if value is not None}


def method_options_help() -> str:
    """The method options for ``train --help``, from the registry."""
    lines = ["Method options (each for the methods named):", ""]
    for option_name, uses in _option_users().items():
        field = uses[0][1]
        names = ", ".join(name for name, _, _ in uses)
        shown = (f"{flag(option_name)}/--no-{flag(option_name)[2:]}" if isinstance(field.default, bool)
                 else flag(option_name))
        defaults = {name: used.default for name, used, _ in uses}
        if len(set(map(str, defaults.values()))) > 1:
            default = "; defaults " + ", ".join(f"{name} {value}" for name, value in defaults.items())
        else:
            default = "" if field.default is None else f"; default {field.default}"
        lines.append(f"{shown}  {names}: {field.metadata.get('help', '')}{default}")
    return "\n\n".join(lines)
