"""The C step's multi-row int8 kernel (issue 27): a prefill chunk, a decode batch and the rows
that chose one expert apply each weight block to up to 8 activation rows in one pass.

It must compute the numbers of the row-by-row int8 path (``set_rows_per_pass(model, 1)``): the
kernel alone gives the same bits for any number of rows per pass, in every build; a whole step
or prefill differs from the row-by-row step only where float sums are split differently (the
row-by-row step halves an expert between the threads when its (row, expert) pairs do not divide
evenly among them; grouped by expert, each pair's expert is whole), so within a few float32
rounding errors; and both stay as close to torch on the same rounded weights as the int8 step
always was (tests/test_quantize.py's gates).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rxruntime.models import RxTModel, native
from rxruntime.models.cache import KVCache
from rxruntime.models.quantize import WeightFormat
from rxruntime.models.weight_format import set_weight_format

from .conftest import biased_mqa_model, tiny_model
from .engine_util import decode_steps
from .test_native_layouts import _beta
from .test_quantize import _cpu_flags

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)


@pytest.mark.parametrize("isa", ["native", "avx2", "scalar"])
def test_kernel_gives_the_same_bits_for_any_rows_per_pass(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """``rxt_matmul`` with 1..8 rows per pass against one ``rxt_matvec`` per row, on two
    75-row segments (partial blocks) of 37 columns (a partial tile), 11 rows (a partial pass)."""
    if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("the AVX2 build needs a CPU with AVX2 and FMA")
    monkeypatch.setenv("RXRT_NATIVE_ISA", isa)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(150, 37, generator=g) * torch.logspace(-2, 1, 37)
    keep: list[torch.Tensor] = []
    mat = native._mat(w, "int8", keep, seg=75)
    x = torch.randn(11, 75, generator=g) * torch.linspace(0.01, 3.0, 75)
    x[3] = 0.0  # a row all zero
    x[5, 40:64] = 0.0
    lib = native.library()
    for segment in range(2):
        row = ctypes.c_int64(75 * segment)
        single = torch.empty(11, 37)
        for b in range(11):
            lib.rxt_matvec(ctypes.byref(mat), row, ctypes.c_int64(75), ctypes.c_int64(37),
                           ctypes.c_void_p(x[b].data_ptr()), ctypes.c_void_p(single[b].data_ptr()))  # fmt: skip
        for rows in range(1, 9):
            y = torch.empty(11, 37)
            x_at, y_at = ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr())
            lib.rxt_matmul(ctypes.byref(mat), row, ctypes.c_int64(75), ctypes.c_int64(37), ctypes.c_int(11),
                           x_at, y_at, ctypes.c_int(rows))  # fmt: skip
            assert torch.equal(y, single), (segment, rows)


@pytest.mark.parametrize("isa", ["native", "avx2", "scalar"])
def test_float32_kernel_gives_the_same_bits_for_any_rows_per_pass(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """The float32 multi-row kernel (decode_step.c's f32_rows) against one ``rxt_matvec`` per row:
    every sum is the same chain of fused multiply-adds in the order of the inputs, so any number
    of rows per pass, column tile or block gives the same bits. 70 rows (a partial group of four,
    a partial block of 256 rows in the 600-row case), 37 and 600 columns (partial tiles and
    blocks), 11 and 70 activation rows (partial passes), and 4 and 7 (up to 8 rows the weight
    rows are streamed whole, f32_stream), from row 5 of the matrix; an AVX-512 build with its
    512-bit tile of 8 rows x 32 columns and with the 256-bit tile of 4 x 16."""
    if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("the AVX2 build needs a CPU with AVX2 and FMA")
    monkeypatch.setenv("RXRT_NATIVE_ISA", isa)
    lib = native.library()
    widest = native.f32_tile()
    assert widest == {"scalar": 0, "avx2": 256}.get(isa, 512 if "avx512f" in _cpu_flags() else 256)
    tiles = (256, 512) if widest == 512 else (widest,)
    g = torch.Generator().manual_seed(12)
    for k, cols, n in ((70, 37, 11), (600, 600, 70), (70, 37, 4), (600, 600, 7)):
        w = torch.randn(k + 5, cols, generator=g) * torch.logspace(-2, 1, cols)
        mat = native._mat(w, "fp32", [])
        x = torch.randn(n, k, generator=g)
        x[3] = 0.0
        row = ctypes.c_int64(5)
        single = torch.empty(n, cols)
        for b in range(n):
            lib.rxt_matvec(ctypes.byref(mat), row, ctypes.c_int64(k), ctypes.c_int64(cols),
                           ctypes.c_void_p(x[b].data_ptr()), ctypes.c_void_p(single[b].data_ptr()))  # fmt: skip
        torch.testing.assert_close(single, x @ w[5:], rtol=1e-4, atol=1e-4)
        for tile in tiles:
            assert native.f32_tile(tile) == tile
            for rows in range(1, 9):
                y = torch.empty(n, cols)
                x_at, y_at = ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr())
                lib.rxt_matmul(ctypes.byref(mat), row, ctypes.c_int64(k), ctypes.c_int64(cols), ctypes.c_int(n),
                               x_at, y_at, ctypes.c_int(rows))  # fmt: skip
                assert torch.equal(y, single), (k, cols, n, rows, tile)
    native.f32_tile(widest)


def _with_format(make: object, seed: int, fmt: WeightFormat) -> RxTModel:
    model: RxTModel = make(seed)  # type: ignore[operator]
    set_weight_format(model, fmt)
    return model


def _int8(make: object, seed: int) -> RxTModel:
    return _with_format(make, seed, "int8")


MODELS = {
    "tiny": lambda s: tiny_model(seed=s),
    "bias-mqa": lambda s: biased_mqa_model(seed=s),
    "beta": _beta,
    "beta-bf16-router": lambda s: _beta(s, router_dtype="bfloat16"),
}
PROMPTS = [[3, 9, 27, 81, 50], [11, 12], [60, 61, 62, 63, 64, 65, 66, 67, 68], [5, 4, 3], [70, 71, 72, 73]]


def _buffers(model: RxTModel, rows: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], KVCache]:
    """Memory keys/values of a random STM and an empty cache with every layer (stateless ones too)."""
    model.use_decode_layout()
    stm = model.init_stm(rows, torch.Generator().manual_seed(3), std=1.0)
    with torch.inference_mode():
        memory_kv = [(torch.zeros(k.shape).copy_(k), torch.zeros(v.shape).copy_(v)) for k, v in model.memory_kv(stm)]
    return memory_kv, model.new_cache(rows, 64)


def _torch_prefill(model: RxTModel, prompts: list[list[int]]) -> torch.Tensor:
    memory_kv, cache = _buffers(model, len(prompts))
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    model.native_decode = False
    try:
        with torch.inference_mode():
            return model.prefill(ids, lengths, memory_kv, cache)
    finally:
        model.native_decode = True


def _c_prefills(
    model: RxTModel, prompts: list[list[int]], passes: tuple[int, ...]
) -> list[tuple[torch.Tensor, KVCache]]:
    """The C prefill of ``prompts`` (logits, cache) once per rows-per-pass setting in ``passes``."""
    results = []
    for per_pass in passes:
        native.set_rows_per_pass(model, per_pass)
        memory_kv, cache = _buffers(model, len(prompts))
        with torch.inference_mode():
            logits = native.prefill(model, prompts, memory_kv, cache)
        assert logits is not None
        results.append((logits, cache))
    return results


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.std(-1, keepdim=True)).max())


@pytest.mark.parametrize("fmt", ["int8", "fp32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_batch_matches_the_row_by_row_step(name: str, fmt: WeightFormat) -> None:
    """Five conversations decoded together for 10 greedy steps: the same tokens as the row-by-row
    step, logits and caches within 1e-5 of a row's logit spread (int8 and float32 weights)."""
    model = _with_format(MODELS[name], 80, fmt)
    model.native_decode = True
    native.set_rows_per_pass(model, 1)
    rowwise = decode_steps(model, PROMPTS, 10)
    native.set_rows_per_pass(model, 8)
    multi = decode_steps(model, PROMPTS, 10)
    for a, b in zip(multi[:10], rowwise[:10]):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert _relative(a, b) < 1e-5
    for a, b in zip(multi[10:], rowwise[10:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rows", [2, 4, 8])
def test_prefill_matches_the_row_by_row_prefill_and_stays_close_to_torch(
    name: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three prompts (one spans chunks) through the C prefill with ``rows`` per pass: logits and
    caches within 1e-5 of the row-by-row prefill's; against torch's prefill on the same rounded
    weights, the gate of tests/test_native_prefill.py (5% of a row's spread) and its greedy token."""
    monkeypatch.setattr(native, "PREFILL_CHUNK", 16)
    model = _int8(MODELS[name], 81)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20 + i for i in range(23)]]
    (rowwise, rowwise_cache), (multi, multi_cache) = _c_prefills(model, prompts, (1, rows))
    assert _relative(multi, rowwise) < 1e-5
    for row, p in enumerate(prompts):
        for got, want in ((multi_cache.k, rowwise_cache.k), (multi_cache.v, rowwise_cache.v)):
            torch.testing.assert_close(got[:, row, :, : len(p)], want[:, row, :, : len(p)], rtol=1e-5, atol=1e-6)
    expected = _torch_prefill(model, prompts)
    assert _relative(multi, expected) < 0.05
    assert torch.equal(multi.argmax(-1), expected.argmax(-1))


def test_rows_per_pass_is_checked() -> None:
    model = tiny_model(seed=82)
    with pytest.raises(ValueError, match="1..8"):
        native.set_rows_per_pass(model, 9)
    native.set_rows_per_pass(model, 3)
    assert native.rows_per_pass(model) == 3
    native.set_rows_per_pass(model, None)
    assert native.rows_per_pass(model) == native.ROWS_PER_PASS


def test_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(seed=83)
    monkeypatch.setenv("RXRT_NATIVE_ROWS", "1")
    assert native.rows_per_pass(model) == 1
    monkeypatch.setenv("RXRT_NATIVE_ROWS", "twelve")
    with pytest.raises(ValueError, match="RXRT_NATIVE_ROWS"):
        native.rows_per_pass(model)


def test_the_side_by_side_script_runs(tmp_path: Path) -> None:
    """``benchmarks/int8_rows.py`` (docs/benchmarks.md §8) at a tiny size: every variant measured."""
    out = tmp_path / "rows.json"
    script = Path(__file__).parents[1] / "benchmarks" / "int8_rows.py"
    args = ["--preset", "nano", "--repeats", "1", "--prompts", "5", "--rows", "1,2", "--steps", "2", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["prefill_ms"]["5"]) == {"multi", "rowwise", "torch", "torch-bf16"}
    assert set(result["decode_tokens_per_s"]["2"]) == {"multi", "rowwise", "torch"}
    assert result["config"]["time"] == "thread CPU time"


@pytest.mark.parametrize("name", ["tiny", "beta"])
def test_float32_prefill_gives_an_expert_all_its_rows_at_once(name: str) -> None:
    """A float32 join of 70 prompt tokens sends about 42 rows to each expert (beta: 29), more
    than the 8 of an int8 pass: decode_step.c's moe_task hands f32_multi all of an expert's rows
    at once (up to 64), which must give the bits of any rows per pass (each sum is axpy_f32's
    chain of fmas) and stay within 1e-4 of torch's prefill (a row's spread)."""
    model = _with_format(MODELS[name], 82, "fp32")
    model.native_decode = True
    prompts = [[7 + i for i in range(30)], [40 + i for i in range(25)], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]]
    assert sum(map(len, prompts)) <= native.FP32_PREFILL_MAX_TOKENS
    (two, two_cache), (eight, eight_cache) = _c_prefills(model, prompts, (2, 8))
    assert torch.equal(two, eight)
    assert torch.equal(two_cache.k, eight_cache.k) and torch.equal(two_cache.v, eight_cache.v)
    expected = _torch_prefill(model, prompts)
    assert _relative(eight, expected) < 1e-4
    assert torch.equal(eight.argmax(-1), expected.argmax(-1))
