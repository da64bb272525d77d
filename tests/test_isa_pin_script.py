"""benchmarks/isa_pin.py at CI size: the first steps of ``smol-ci`` under each kernel setting.

The script's by-hand record is ``smol3`` (docs/training.md, "Pinned kernels"); here the same
comparison on the tiny backbone: a run repeats itself bit for bit, and ATen's scalar kernels give
other tensors (the variables reach the run). Whether the pinned setting equals the native one
depends on the CPU (equal where the native kernels are AVX2), so it is recorded, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("faker")

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "isa_pin.py"


def test_pinned_kernels_script_compares_fresh_runs(tmp_path: Path) -> None:
    out = tmp_path / "isa.json"
    command = [sys.executable, str(SCRIPT), "--recipe", "smol-ci", "--steps", "5", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    record = json.loads(out.read_text())
    assert set(record["runs"]) == {"native", "native-again", "avx2", "scalar"}
    assert record["same_as_native"]["native-again"] is True
    assert record["same_as_native"]["scalar"] is False
    assert record["runs"]["avx2"]["environment"]["ATEN_CPU_CAPABILITY"] == "avx2"
    again = tmp_path / "again.json"
    compare = [*command[:-2], "--settings", "avx2", "--compare", str(out), "--out", str(again)]
    subprocess.run(compare, check=True, capture_output=True, text=True, timeout=600)
    assert json.loads(again.read_text())["compared_with"]["same"] == {"avx2": True}
