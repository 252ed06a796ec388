"""Names of a package imported on first use (PEP 562), so that importing it stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, where: dict[str, str], names: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: attribute ``n`` comes from submodule ``where[n]``.

    ``names`` is the package's ``globals()`` (listed by ``dir`` beside the lazy names).
    """

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(f".{where[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(names) | set(where))

    return __getattr__, __dir__
