"""Old module names kept importable after a move: one import-system finder for every package.

A package that moved modules registers a table with :func:`install`: ``old name -> (its new
home(s), whether the docs showed it)``. Importing an old name gives a thin module whose attributes
are those of its new home(s), the very same objects (``renames`` maps an old attribute name to its
new one). Names the docs showed import silently; the others warn with a ``DeprecationWarning``
naming the new home. The finder runs after every real module, so it never shadows one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

Table = Mapping[str, tuple[tuple[str, ...], bool]]
"""old module name (inside its package) -> (new homes, relative to the table's base; documented)"""


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, base: str, table: Table, renames: Mapping[str, str]) -> None:
        self.package, self.base, self.table, self.renames = package, base, table, renames

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != self.package or name not in self.table:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(self))


class _Loader(importlib.abc.Loader):
    def __init__(self, finder: _Finder) -> None:
        self.finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None  # a plain module, filled in by exec_module

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        targets, documented = self.finder.table[old.rpartition(".")[2]]
        names = [f"{self.finder.base}.{target}" for target in targets]
        homes = [importlib.import_module(name) for name in names]
        renames = self.finder.renames

        def __getattr__(attr: str) -> Any:
            for home in homes:
                for candidate in (attr, renames.get(attr)):
                    if candidate is not None and hasattr(home, candidate):
                        return getattr(home, candidate)
            raise AttributeError(f"module {old!r} (moved to {' and '.join(names)}) has no attribute {attr!r}")

        module.__doc__ = f"Moved to {' and '.join(names)}."
        setattr(module, "__getattr__", __getattr__)  # noqa: B010  # PEP 562: attributes come from the new homes
        setattr(module, "__dir__", lambda: sorted({a for home in homes for a in dir(home)}))  # noqa: B010
        if not documented:
            # stacklevel 2 skips the import machinery's frames: the warning names the importing module
            warnings.warn(f"{old} moved to {' and '.join(names)}", DeprecationWarning, stacklevel=2)


def install(package: str, table: Table, *, base: str | None = None, renames: Mapping[str, str] | None = None) -> None:
    """Make ``package``'s old module names in ``table`` importable (once per package)."""
    if not any(isinstance(f, _Finder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_Finder(package, base or package, table, renames or {}))


CORE: Table = {
    "mailbox": (("events",), False),
    "streams": (("conversation",), False),
}
"""What moved in the runtime's core (issue 25): rxruntime.X -> rxruntime.Y."""

ENGINE: Table = {
    "options": (("options",), False),
    "protocol": (("backend",), False),
    "state": (("engine.scheduler",), False),
    "records": (("engine.scheduler",), False),
}
"""rxruntime.engine.X -> rxruntime.Y."""

RENAMED = {"ConvState": "ConversationEntry"}
"""Old attribute names of moved modules -> their new names."""


def install_core() -> None:
    """The core's and the engine's old module names (rxruntime/__init__.py calls this)."""
    install("rxruntime", CORE, renames=RENAMED)
    install("rxruntime.engine", ENGINE, base="rxruntime", renames=RENAMED)
