"""``rxrt bench turns|decode|throughput`` measure what users run: by default the weights
``rxruntime.load`` would give the model on this device, and every report says which weights and
which decode step it measured (issue 27)."""

from __future__ import annotations

import json

import pytest

from rxruntime import DEFAULT_CPU_WEIGHTS
from rxruntime.cli import main
from rxruntime.models import RxTModel, native, preset


def _expected_default() -> str:
    """What ``rxruntime.load`` picks for a float32 CPU model: int8 where the C step runs it."""
    model = RxTModel(preset("nano")).eval()
    return DEFAULT_CPU_WEIGHTS if native.not_used_reason(model) is None else "fp32"


TURNS = ["bench", "turns", "--preset", "nano", "--turns", "2", "--answer-tokens", "4"]
DECODE = ["bench", "decode", "--preset", "nano", "--steps", "2", "--repeats", "1"]
THROUGHPUT = ["bench", "throughput", "--preset", "nano", "--concurrency", "2", "--query-tokens", "4"]
THROUGHPUT += ["--answer-tokens", "3", "--no-warmup"]


def test_turns_defaults_to_the_engines_weights_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    want = _expected_default()
    assert main([*TURNS, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = result["config"]
    assert cfg["weights"] == [want] and cfg["weights_requested"] == ["default"]
    assert result["series"]["rxt"] == f"RxT {want}"
    assert cfg["decode_kernels"]["rxt"].startswith("C step" if want == "int8" else "torch")
    assert main(TURNS) == 0
    out = capsys.readouterr().out
    assert f"RxT weights: {want} (" in out and "the engine's default for the device" in out


def test_turns_weights_override_and_default_resolves_before_the_duplicate_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    want = _expected_default()
    assert main([*TURNS, "--json", "--weights", "bf16,default"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["weights"] == ["bf16", want]
    assert result["series"]["rxt"] == "RxT bf16" and result["series"][f"rxt_{want}"] == f"RxT {want}"
    # "default" resolves to the same format as `want`: the same series twice is a usage error.
    assert main([*TURNS, "--weights", f"{want},default"]) == 2
    assert f"runs {want} twice" in capsys.readouterr().err


def test_turns_default_is_float32_where_the_c_step_is_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RXRT_NATIVE", "0")
    assert main([*TURNS, "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["weights"] == ["fp32"] and cfg["decode_kernels"] == {"rxt": "torch step"}


def test_decode_defaults_to_the_engines_weights_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    want = _expected_default()
    assert main([*DECODE, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == want and result["weights_requested"] == "default"
    assert main([*DECODE, "--weights", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "weights bf16, decode: " in out and "the engine's default" not in out
    assert main([*DECODE, "--weights", "fp8"]) == 2


def test_throughput_defaults_to_the_engines_weights_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    want = _expected_default()
    assert main([*THROUGHPUT, "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["weights"] == want and cfg["weights_requested"] == "default"
    assert cfg["decode_kernel"].startswith("C step" if want == "int8" else "torch")
    assert main([*THROUGHPUT, "--weights", "fp32"]) == 0
    assert "weights fp32, decode: " in capsys.readouterr().out


OVERLAP = ["bench", "overlap", "--preset", "nano", "--turns", "2", "--query-tokens", "4", "--answer-tokens", "3"]


def test_overlap_defaults_to_the_engines_weights_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    want = _expected_default()
    assert main([*OVERLAP, "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["weights"] == want and cfg["weights_requested"] == "default"
    assert cfg["decode_kernel"].startswith("C step" if want == "int8" else "torch")
    assert main(OVERLAP) == 0
    assert f"weights {want} (the engine's default for the device), decode: " in capsys.readouterr().out
    assert main([*OVERLAP, "--json", "--weights", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["weights"] == "fp32"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("command", [TURNS, THROUGHPUT], ids=["turns", "throughput"])
def test_half_dtypes_are_refused_on_the_cpu_with_a_clear_error(
    capsys: pytest.CaptureFixture[str], command: list[str], dtype: str
) -> None:
    assert main([*command, "--dtype", dtype]) == 2
    err = capsys.readouterr().err
    assert f"--dtype {dtype} is for CUDA" in err and "--weights bf16|int8" in err


def test_dtype_names_are_checked_and_the_cpu_runs_float32(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*THROUGHPUT, "--dtype", "fp64"]) == 2
    assert "--dtype must be one of float32, bfloat16, float16 or default" in capsys.readouterr().err
    for dtype in ("default", "float32"):
        assert main([*THROUGHPUT, "--json", "--dtype", dtype]) == 0
        cfg = json.loads(capsys.readouterr().out)["config"]
        assert cfg["dtype"] == "float32" and cfg["dtype_requested"] == dtype


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["default", "bfloat16", "float16", "float32"])
def test_dtype_on_cuda_is_what_the_model_computes_in(capsys: pytest.CaptureFixture[str], dtype: str) -> None:
    want = {"default": "bfloat16"}.get(dtype, dtype)  # default: rxruntime.load's choice on CUDA
    assert main([*THROUGHPUT, "--json", "--device", "cuda", "--dtype", dtype]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["dtype"] == want and cfg["weights"] == "fp32"
    assert main([*TURNS, "--json", "--device", "cuda", "--dtype", dtype]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["dtype"] == want


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the C step does not build here")
def test_rowwise_int8_runs_beside_the_multi_row_step(capsys: pytest.CaptureFixture[str]) -> None:
    """``--weights int8,int8-rowwise`` puts the int8 C step before its multi-row kernel beside
    today's in one turns run; ``bench decode`` at int8 compares the two steps itself."""
    assert main([*TURNS, "--json", "--weights", "int8,int8-rowwise"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = result["config"]
    assert cfg["weights"] == ["int8", "int8-rowwise"]
    assert result["series"]["rxt_int8-rowwise"] == "RxT int8-rowwise"
    assert cfg["decode_kernels"]["rxt"] == f"C step (up to {native.MULTI_ROW_MAX_ROWS} rows)"
    assert cfg["decode_kernels"]["rxt_int8-rowwise"] == f"C step (up to {native.MAX_ROWS} rows, row by row)"
    assert len(result["rxt_int8-rowwise"]) == 2
    assert main([*DECODE, "--json", "--weights", "int8", "--batch-size", "2"]) == 0
    compared = json.loads(capsys.readouterr().out)["steps_compared"]
    assert list(compared) == ["torch", "C row by row", "C"]
    assert main([*DECODE, "--json", "--weights", "int8-rowwise"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == "int8-rowwise" and list(result["steps_compared"]) == ["torch", "C"]
