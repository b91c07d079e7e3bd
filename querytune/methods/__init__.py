"""The methods, one module each; importing this package registers them all (:mod:`.registry`).

Adding a method: write its module (a :class:`~querytune.methods.base.Method` subclass with
its options dataclass, decorated with ``@register``) and import it on the line below.
"""

from __future__ import annotations

from . import (  # noqa: F401
    adaptformer,
    bitfit,
    dtl,
    full,
    head2toe,
    linear,
    lora,
    memory,
    memory_plain,
    ssf,
    synqt,
    vpt,
    vqt,
    vqt_addon,
)
from .base import Method
from .registry import METHODS, build_method, method_class, options_dict, register

__all__ = ["METHODS", "Method", "build_method", "method_class", "options_dict", "register"]
