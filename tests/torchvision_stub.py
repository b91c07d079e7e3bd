"""A test-only stand-in for ``torchvision``, so that timm imports where torchvision cannot be installed.

timm's model files use torchvision only for data transforms and a few ops that the tests never reach.
:func:`import_with_stand_in` imports a module with a meta-path finder first that answers every
``torchvision`` import with a placeholder module whose attributes are ``MagicMock``s. Never used by
querytune itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any
from unittest.mock import MagicMock


class PlaceholderModule(types.ModuleType):
    """A module every attribute of which is a ``MagicMock`` (made on first access)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class TorchvisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def import_with_stand_in(name: str) -> types.ModuleType:
    """Import module ``name`` (and what it imports) while ``torchvision`` imports are answered with
    placeholders; afterwards the stand-in is taken off the path and out of ``sys.modules`` again, so that
    other libraries (transformers checks whether torchvision is installed) do not find it."""
    finder = TorchvisionFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
