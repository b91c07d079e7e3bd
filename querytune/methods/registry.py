"""The method registry: name -> method class. Each method module registers its class here;
:mod:`querytune.methods` imports every method module, so the registry is full once the
package is imported."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..backbones.vit import VisionTransformer
from ..errors import ConfigError
from .base import Method, parse_options

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def resolve_method(name: str, options: dict[str, Any] | None = None) -> tuple[type[Method], dict[str, Any]]:
    """The method class that ``name`` with ``options`` means, and the options it takes: old
    spellings stay valid (``memory`` with ``memory_mode="plain"`` is ``memory-plain``)."""
    return method_class(name).variant(dict(options or {}))


def build_method(name: str, backbone: VisionTransformer, num_classes: int,
                 options: dict[str, Any] | None = None) -> Method:
    cls, options = resolve_method(name, options)
    return cls(backbone, num_classes, parse_options(cls, options))


def options_dict(method: Method) -> dict[str, Any]:
    return asdict(method.options)
