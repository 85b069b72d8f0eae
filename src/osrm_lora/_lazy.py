"""Imports deferred to first use, so settings, registries and report rebuilding run without torch.

Validating an experiment file or listing the merge methods imports every method module, and those are torch
kernels. They read `torch` from here: a stand-in that imports the real module on the first attribute access,
so the kernels are written exactly as with ``import torch`` and torch loads only when one runs. Type checkers
see the real module. `lazy_exports` does the same for a package's public names (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any


class LazyModule:
    """Module `name`, imported when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # later reads are plain attribute look-ups
        return value


def lazy_exports(package: str, modules: Mapping[str, Iterable[str]]) -> Callable[[str], Any]:
    """A package ``__getattr__`` importing each public name from its module on first access; `modules` maps a
    module (relative to `package`) to the names it provides."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    return __getattr__


if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")
