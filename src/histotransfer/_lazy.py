"""Lazy package exports (PEP 562): a package names its public objects and imports each module on first use.

Importing a stage's package (which ``histotransfer STAGE --help`` does to build its options) then costs nothing
beyond the package itself; torch and the other heavy libraries load only when a stage's work starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` exporting ``name -> module`` (relative names allowed)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module '{package}' has no attribute {name!r}")
        module = importlib.import_module(names[name], package)
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
