"""Deprecated: the training curriculum moved to ``rxruntime.training`` (its data generators to
``rxruntime.training.data``), so that ``rxruntime.models`` is the model alone.

``rxruntime.models.training`` and every old submodule (``rxruntime.models.training.recipe``, ...)
still import, with a ``DeprecationWarning``; each name is the very module of its new home, not a
copy, so classes and module state are shared.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

MOVED = {
    **{
        name: f"rxruntime.training.{name}"
        for name in (
            "batches",
            "joint",
            "memory_aware",
            "memory_pretrain",
            "mlm",
            "mrqbench",
            "optim",
            "people_eval",
            "recipe",
            "sources",
            "state",
            "tensorbleu",
            "trainer",
        )
    },
    **{
        name: f"rxruntime.training.data.{name}"
        for name in ("chitchat", "dialogues", "grammar", "loaders", "people", "phrasings", "values")
    },
}
"""Old submodule name -> the module's new import name."""


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)


def __getattr__(name: str) -> ModuleType:
    """``from rxruntime.models.training import recipe``: the module of its new home."""
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _warn(f"{__name__}.{name}", MOVED[name])
    module = globals()[name] = importlib.import_module(MOVED[name])  # later lookups skip the warning
    return module


class _Forward(MetaPathFinder, Loader):
    """``import rxruntime.models.training.recipe``: the import system's answer is the new module.

    The import machinery keeps whatever ``exec_module`` leaves in ``sys.modules`` under the name it
    imports, so the old name becomes an alias of the new module instead of a second copy of it.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in MOVED:
            return None
        return ModuleSpec(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__.rpartition(".")[2]]
        _warn(module.__name__, new)
        sys.modules[module.__name__] = importlib.import_module(new)


if not any(type(finder).__qualname__ == "_Forward" and type(finder).__module__ == __name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _Forward())
warnings.warn(
    f"{__name__} moved to rxruntime.training (its data generators to rxruntime.training.data)",
    DeprecationWarning,
    stacklevel=2,
)
