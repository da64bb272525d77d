"""benchmarks/openmp_threads.py at a tiny size: each workload timed three ways, the main
thread's team handed back for the third."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.openmp_threads import main
from rxruntime.models import openmp

from .test_openmp import pytestmark as needs_libgomp

pytestmark = needs_libgomp


def test_the_side_by_side_script_runs(tmp_path: Path) -> None:
    out = tmp_path / "openmp.json"
    assert main(["--ops", "20", "--checkpoint", "small", "--prompts", "2", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["openmp_runtime"] == str(openmp.runtime_path())
    assert set(report["results"]) == {"20 element-wise ops", "2-prompt float32 prefill"}
    for r in report["results"].values():
        assert r["released"] is True
        assert all(r[k] > 0 for k in ("main_s", "thread_s", "thread_main_released_s"))


def test_a_missing_checkpoint_is_an_error() -> None:
    with pytest.raises(Exception, match="nope"):
        main(["--ops", "1", "--checkpoint", str(Path("/nonexistent/nope")), "--repeats", "1"])


def test_the_engine_side_by_side_script_runs(tmp_path: Path) -> None:
    """benchmarks/engine_openmp_ab.py on the small model: both sides ran every turn, each in
    its own process, and the report's medians come from them."""
    from benchmarks.engine_openmp_ab import QUERIES
    from benchmarks.engine_openmp_ab import main as ab_main

    out = tmp_path / "ab.json"
    assert ab_main(["--model", "small", "--rounds", "1", "--answer-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for which in ("off", "on"):
        (run,) = report["runs"][which]
        assert [len(run[k]) for k in ("memory_update_s", "turn_s", "ttft_s")] == [len(QUERIES)] * 3
        assert all(v > 0 for k in run for v in run[k])
    medians = report["medians"]
    assert report["memory_update_speedup"] == pytest.approx(
        medians["off"]["memory_update_s"] / medians["on"]["memory_update_s"]
    )
