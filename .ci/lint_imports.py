#!/usr/bin/env python3
"""Run import-linter's contracts (pyproject.toml, [tool.importlinter]) on the package as it is installed.

`operators/` and `models/` (and any other folder that pyproject's package-dir maps under
`rxruntime`) sit at the top of the repository, so the source tree's `rxruntime/` alone is not the
whole package that import-linter must read. This stages the package as the wheel lays it out (a
tree of symbolic links in a temporary folder) and runs `lint-imports` on that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mypy (in the test extra) brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def stage(into: Path) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"].get("package-dir", {})
    for name, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        target = into.joinpath(*name.split("."))
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            link = target / source.relative_to(ROOT / folder)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rxrt-lint-imports-") as tmp:
        stage(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        command = ["lint-imports", str(ROOT / "pyproject.toml"), "--no-cache", *sys.argv[1:]]
        return subprocess.call(command, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
