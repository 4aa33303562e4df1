"""Package attributes imported on first use, so light imports stay light (OrtBlip2 never imports torch)."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_attributes(package: str, table: dict[str, str]):
    """A module `__getattr__` for `package`: a name in `table` (name -> relative module) is imported
    from its module on first use and kept in the package."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(table[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
