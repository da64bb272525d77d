"""The wheel carries operators/, models/ and training/ as rxruntime.operators, rxruntime.models and
rxruntime.training, and nothing of the repository's measurement home (benchmarks/)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rxruntime.models.checkpoint import SHIPPED_MODELS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("rxruntime", "operators", "models", "training"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("rxruntime-*.whl")
    return whl


def test_wheel_maps_the_top_level_folders_into_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "rxruntime/models/rxt.py" in names
    assert "rxruntime/training/trainer.py" in names
    assert "rxruntime/training/data/people.py" in names
    assert "rxruntime/models/training/__init__.py" in names  # the deprecated alias of rxruntime.training
    assert "rxruntime/operators/__init__.py" in names
    assert "rxruntime/py.typed" in names
    top = ("models/", "operators/", "training/", "tests/", "benchmarks/", "examples/")
    assert not any(n.startswith(top) for n in names)
    for folder, prefix in (
        ("models", "rxruntime/models/"),
        ("operators", "rxruntime/operators/"),
        ("training", "rxruntime/training/"),
        ("rxruntime", "rxruntime/"),
    ):
        expected = {prefix + p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")}
        missing = expected - set(names)
        assert not missing, f"pyproject.toml's package list misses {sorted(missing)}"


def test_wheel_imports_nothing_that_stays_in_the_repository(wheel: Path) -> None:
    """Every ``rxruntime.*`` module the wheel's code imports is in the wheel, and no module imports a
    repository folder by its own name (benchmarks/ and its harness, tests/, the unmapped folders)."""
    with zipfile.ZipFile(wheel) as whl:
        sources = {n: whl.read(n).decode() for n in whl.namelist() if n.endswith(".py")}
    trees = {n[: -len(".py")].removesuffix("/__init__").replace("/", "."): ast.parse(t, n) for n, t in sources.items()}
    outside = {"benchmarks", "harness", "tests", "scripts", "models", "operators", "training", "examples"}
    bad = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # ``from rxruntime.bench import soak``: a submodule of the wheel or a name its package binds
                imported = [node.module]
                if node.module in trees:
                    bound = _top_level_names(trees[node.module])
                    imported += [f"{node.module}.{a.name}" for a in node.names if a.name not in bound]
            else:
                continue
            for module in imported:
                top = module.partition(".")[0]
                if top in outside or (top == "rxruntime" and module not in trees):
                    bad.append(f"{name}: {module}")
    assert not bad, bad


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (imports, assignments, functions, classes)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).partition(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_wheel_carries_the_shipped_models_the_recipes_and_the_c_step(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        for folder in SHIPPED_MODELS.values():
            assert f"rxruntime/{folder}/{name}" in names
    assert {"rxruntime/training/recipes/nano.json", "rxruntime/training/recipes/ci.json"} <= names
    assert not any(n.startswith("rxruntime/models/recipes/") for n in names)  # recipes moved with training
    assert "rxruntime/models/csrc/decode_step.c" in names  # built on first use (models/native.py)
    assert "rxruntime/serving/ray/config.yaml" in names  # `serve run` / `serve deploy` take it from the package
    for name in ("index.html", "app.js", "style.css"):  # the chat page `rxrt serve --http` serves at /
        assert f"rxruntime/serving/http/web/{name}" in names


def test_installed_wheel_is_not_shadowed_by_a_users_models_module(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    user = tmp_path / "user_project"
    user.mkdir()
    (user / "models.py").write_text("raise ImportError('the user models.py was imported')\n")
    (user / "operators.py").write_text("raise ImportError('the user operators.py was imported')\n")
    (user / "training.py").write_text("raise ImportError('the user training.py was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import rxruntime, rxruntime.models, rxruntime.operators, rxruntime.training.recipe as r; "
        "print(rxruntime.__file__); print(rxruntime.models.__file__); print(rxruntime.operators.__file__); "
        "print(r.__file__); assert r.load_recipe('ci').name == 'ci' and 'nano' in r.builtin_recipes()"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=user, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert all(line.startswith(str(target)) for line in run.stdout.split())
    info = subprocess.run(
        [sys.executable, "-m", "rxruntime.cli", "info", "--preset", "nano", "--json"],
        cwd=user,
        env=env,
        capture_output=True,
        text=True,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["parameters"]["total"] > 0
