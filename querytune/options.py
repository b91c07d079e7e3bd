"""Settings declared once: a method's options dataclass declares its fields with :func:`option`
(help text, bounds, choices), and everything else is generated from it: the command line's
flags and ``--help`` (:mod:`querytune.cli`), the checks with their one-line errors
(:func:`check_options`), and ``querytune methods``. The same checks guard training settings
and the settings read from config files (:func:`check_value` works on any dataclass field).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .errors import ConfigError


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           min_open: bool = False, max_open: bool = False, choices: tuple[str, ...] | None = None,
           short: str | None = None, parse: Callable[[Any, str], Any] | None = None) -> Any:
    """A field of an options dataclass: its default, its help text and what values it takes
    (``min``/``max`` bounds, open with ``min_open``/``max_open``; ``choices`` for strings, or for each
    item of a list); ``short`` is the flag's one-letter spelling (``-m``). ``parse(value, flag)``, where
    given, is the field's own reading of a value of several spellings (:func:`image_size_setting`): its
    flag takes a string, and the value a flag or config file gives becomes what ``parse`` returns."""
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open, "choices": choices,
            "short": short, "parse": parse}
    if isinstance(default, list):  # a fresh list for every instance
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ImageSize(NamedTuple):
    """An input size in pixels, (height, width): ``--image-size N`` (square) or ``HxW``."""

    height: int
    width: int

    @classmethod
    def of(cls, value: Any, name: str = "--image-size") -> ImageSize:
        """The size that ``value`` spells (N, 'N', 'HxW', or a (height, width) pair), else a one-line ConfigError
        naming the flag ``name``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            parts = value.strip().lower().split("x")
            sides: Any = [int(part) if part.isascii() and part.isdecimal() else None for part in parts]
        else:
            sides = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(sides) not in (1, 2) or not all(isinstance(side, int) and not isinstance(side, bool) for side in sides):
            raise ConfigError(f"{name} must be an integer (got {value!r}) or HxW such as 224x320")
        if min(sides) < 1:
            raise ConfigError(f"{name} must be at least 1 on each side (got {value!r})")
        return cls(sides[0], sides[-1])

    @property
    def square(self) -> bool:
        return self.height == self.width

    @property
    def recorded(self) -> int | str:
        """How a run's config.json and a cache key write it: N for a square size (as before non-square sizes
        were taken, so a square run keeps its record and cache key), else 'HxW'."""
        return self.height if self.square else str(self)

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def image_size_setting(value: Any, name: str) -> int | str:
    """The ``parse`` of an input-size setting: the value as it is recorded (:attr:`ImageSize.recorded`)."""
    return ImageSize.of(value, name).recorded


@functools.cache
def _type_hints(options_cls: type) -> dict[str, Any]:
    """The class's resolved annotations (resolving compiles them: once per class, not per run loaded)."""
    return typing.get_type_hints(options_cls)


def value_type(options_cls: type, name: str) -> tuple[type, bool]:
    """The field's value type (int, float, str or bool) and whether it may be None."""
    hint = _type_hints(options_cls)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in args if arg is not type(None)), type(None) in args
    return hint, False


def describe_range(meta: Mapping[str, Any]) -> str | None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f"in {'(' if meta['min_open'] else '['}{_number(low)}, {_number(high)}{')' if meta['max_open'] else ']'}"
    if low is not None:
        if meta["min_open"]:
            return "positive" if low == 0 else f"greater than {_number(low)}"
        return "0 or more" if low == 0 else f"at least {_number(low)}"
    if high is not None:
        return f"{'below' if meta['max_open'] else 'at most'} {_number(high)}"
    return None


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)  # :g would write 2**32 - 1 as 4.29497e+09


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(options_cls: type, field: dataclasses.Field, value: Any) -> None:
    """A one-line ConfigError naming the flag where ``value`` is of the wrong type or out of bounds."""
    kind, optional = value_type(options_cls, field.name)
    name = flag(field.name)
    if value is None:
        if not optional:
            raise ConfigError(f"{name} needs a value")
        return
    if field.metadata.get("parse"):
        field.metadata["parse"](value, name)
        return
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false (got {value!r})")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number (got {value!r})")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number (got {value})")
    if kind is str and not isinstance(value, (str, os.PathLike)):  # a folder option may be given as a Path
        raise ConfigError(f"{name} must be a string (got {value!r})")
    if typing.get_origin(kind) is list:  # list[float]: --mean, --std; list[str]: --log (from a config file)
        numbers = typing.get_args(kind)[0] is float
        if not isinstance(value, list) or not all(_is_number(v) if numbers else isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of {'numbers' if numbers else 'strings'} (got {value!r})")
    meta = field.metadata
    choices = meta.get("choices")
    for item in value if isinstance(value, list) else [value]:
        if choices and item not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)} (got {item!r})")
    low, high = meta.get("min"), meta.get("max")
    below = low is not None and (value <= low if meta["min_open"] else value < low)
    above = high is not None and (value >= high if meta["max_open"] else value > high)
    if below or above:
        raise ConfigError(f"{name} must be {describe_range(meta)} (got {value})")


def check_fields(settings: Any) -> None:
    """Every field of the settings dataclass ``settings`` declared with :func:`option` takes its value (one line
    naming the flag)."""
    for declared in dataclasses.fields(settings):
        if declared.metadata:  # declared with option(): checked; plain fields are the caller's objects
            check_value(type(settings), declared, getattr(settings, declared.name))


def check_options(options_cls: type, given: dict[str, Any], method_name: str) -> None:
    """Every given option exists for the method and takes the value given."""
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    for key, value in given.items():
        if key not in known:
            takes = ", ".join(flag(k) for k in sorted(known)) or "no options"
            raise ConfigError(f"option {flag(key)} does not apply to method {method_name!r} (it takes: {takes})")
        check_value(options_cls, known[key], value)
