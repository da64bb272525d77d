"""``benchmarks/gpu_check.py``, the GPU check prepared for a lent CUDA machine (issue 27): its
plan parses and collects the GPU tests here, and its runner works end to end on the CPU (with
``--quick``), so the one call on a GPU spends its minutes measuring, not finding typos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_parses_every_command_and_collects_the_gpu_tests(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("turns", "throughput", "overlap", "decode", "decode-b64"):
        assert f"[{step}] parses: rxrt bench" in out
    assert "[gpu-tests] collects 3 tests" in out
    plan = _load().plan(tmp_path)  # type: ignore[attr-defined]
    assert all("--device" in s.argv and "cuda" in s.argv for s in plan if "bench" in s.argv)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_fails_on_a_command_that_does_not_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _load()
    bad = gpu_check.Step("turns", [*gpu_check.RXRT, "bench", "turns", "--no-such-flag"], 10)  # type: ignore[attr-defined]
    assert gpu_check.dry_run([bad]) == 1  # type: ignore[attr-defined]
    assert "[turns] does not parse" in capsys.readouterr().out


def test_a_quick_cpu_run_writes_every_report(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "nano", "--quick", "--skip-setup"]
    proc = subprocess.run([*argv, "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["step"] for s in report["steps"]] == [
        "gpu-tests",
        "turns",
        "throughput",
        "overlap",
        "decode",
        "decode-b64",
    ]
    assert all(s["exit"] == 0 for s in report["steps"])
    assert json.loads((tmp_path / "turns-nano.json").read_text())["config"]["device"] == "cpu"
    assert json.loads((tmp_path / "throughput-nano.json").read_text())["config"]["concurrency"] == [1, 3]
    assert json.loads((tmp_path / "decode-nano-cpu-b4.json").read_text())["batch_size"] == 4
    assert json.loads((tmp_path / "overlap-nano.json").read_text())["config"]["turns"] == 3
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back from $OUT
    assert "testcase" in (tmp_path / "gpu-tests.xml").read_text()
