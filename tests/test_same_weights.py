"""benchmarks/same_weights.py, the check behind the default model card's reproduction claim, run as
a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rxruntime.models.checkpoint import shipped_model_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "same_weights.py"


def _run(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=120)


def _model_dir(path: Path, weights: dict[str, torch.Tensor], config: str = "{}") -> Path:
    path.mkdir()
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(config)
    (path / "tokenizer.json").write_text("{}")
    return path


def test_the_shipped_model_is_the_same_as_its_copy(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shipped_model_dir("small"), copy)
    done = _run(shipped_model_dir("small"), copy)
    assert done.returncode == 0 and "the same: 127 tensors" in done.stdout, done


def test_a_sign_of_zero_a_value_a_shape_and_a_config_byte_are_each_found(tmp_path: Path) -> None:
    w = {"a": torch.tensor([0.0, 1.0]), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    base = _model_dir(tmp_path / "base", w, '{"dim": 8}')
    same = _model_dir(tmp_path / "same", {k: v.clone() for k, v in w.items()}, '{"dim": 8}')
    other = _model_dir(
        tmp_path / "other", {"a": torch.tensor([-0.0, 1.0]), "b": torch.ones(3, 2, dtype=torch.bfloat16)}, '{"dim": 9}'
    )
    assert _run(base, same).returncode == 0
    done = _run(base, other)
    assert done.returncode == 1, done
    assert "tensor a: values differ" in done.stdout  # -0.0 == 0.0 as floats, not as bytes
    assert "tensor b: torch.bfloat16 (2, 3) vs torch.bfloat16 (3, 2)" in done.stdout
    assert "config.json: contents differ" in done.stdout and "tokenizer.json:" not in done.stdout
