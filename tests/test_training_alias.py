"""``rxruntime.models.training`` (before issue 25) still imports, warns, and is the new modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import rxruntime.training.data.people as people
import rxruntime.training.recipe as recipe


def _forget_old_names() -> None:
    old = "rxruntime.models.training"
    for name in [n for n in sys.modules if n == old or n.startswith(old + ".")]:
        del sys.modules[name]


def test_old_submodule_imports_warn_and_give_the_new_module_itself() -> None:
    _forget_old_names()
    with pytest.warns(DeprecationWarning, match="moved to rxruntime.training") as caught:
        old = importlib.import_module("rxruntime.models.training.recipe")
    messages = [str(w.message) for w in caught]
    assert "rxruntime.models.training.recipe moved to rxruntime.training.recipe; import it from there" in messages
    assert old is recipe and old.__name__ == "rxruntime.training.recipe"
    with pytest.warns(DeprecationWarning, match=r"moved to rxruntime\.training\.data\.people"):
        generator = importlib.import_module("rxruntime.models.training.people").PeopleGenerator
    assert generator is people.PeopleGenerator


def test_old_package_attributes_forward_to_the_new_modules() -> None:
    _forget_old_names()
    with pytest.warns(DeprecationWarning, match=r"rxruntime\.models\.training moved to rxruntime\.training"):
        package = importlib.import_module("rxruntime.models.training")
    with pytest.warns(DeprecationWarning, match=r"moved to rxruntime\.training\.data\.people"):
        assert package.people is people
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        package.nothing  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("rxruntime.models.training.nothing")


def test_the_model_package_does_not_import_training() -> None:
    """``rxruntime.models`` is the model alone: importing it pulls in no training module."""
    code = "import sys, rxruntime.models; print(sorted(m for m in sys.modules if 'training' in m))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
