"""The method registry: name -> method class. Each method module registers its class here;
:mod:`querytune.methods` imports every method module, so the registry is full once the
package is imported."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

import torch

from ..backbones.vit import VisionTransformer
from ..errors import ConfigError
from ..options import flag
from .base import Method, parse_options

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_method(name: str, backbone: VisionTransformer, num_classes: int,
                 options: dict[str, Any] | None = None) -> Method:
    cls, options = method_class(name), dict(options or {})
    parsed = parse_options(cls, options)
    try:
        return cls(backbone, num_classes, parsed)
    except RuntimeError as error:  # torch's allocators raise RuntimeError (OutOfMemoryError on a GPU)
        # The CPU allocator says "tried to allocate 633318697598976 bytes", CUDA's "Tried to allocate 2.00 GiB".
        tried = re.search(r"[Tt]ried to allocate ([0-9.]+) ?(bytes|[KMGT]iB)", str(error))
        if not isinstance(error, torch.OutOfMemoryError) and tried is None:
            raise
        amount = "out of memory"
        if tried is not None:
            size = f"{int(tried[1]) / 2**30:,.0f} GiB" if tried[2] == "bytes" else f"{tried[1]} {tried[2]}"
            amount = f"tried to allocate {size}"
        given = ", ".join(f"{flag(key)} {value}" for key, value in options.items()) or "its default options"
        raise ConfigError(f"method {cls.name!r} with {given}: its parameters do not fit in memory ({amount})") \
            from error


def options_dict(method: Method) -> dict[str, Any]:
    return asdict(method.options)
