"""The C step's attention (decode_step.c's ``attend``, vectorised in issue 27): softmax(q k^T) v
of one head against a float64 reference over head dims and lengths that are not multiples of the
vector widths (16 lanes of AVX-512, 8 of AVX2, the 4 keys scored at a time), with the same bits in
every build (the scalar build is the reference order, so a forced-scalar int8 step still equals the
vector step bit for bit), and whole steps with grouped heads of such sizes against the torch step.

Skipped only where there is no C compiler (like the GPU tests without CUDA).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rxruntime.models import DecoderConfig, RxTModel, native

from .conftest import tiny_model
from .engine_util import decode_steps
from .test_quantize import _cpu_flags

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)

ISAS = ["native", "avx2", "scalar"]
SHAPES = [
    (hd, n) for hd in (1, 6, 8, 15, 16, 17, 20, 36, 64, 72, 100, 130) for n in (1, 2, 3, 4, 5, 15, 16, 17, 33, 130)
]
"""(head_dim, keys): below, at and past 16 (one AVX-512 vector, two AVX2 ones, a block of the
softmax's lanes) and 64 (the columns of v summed in registers at once), and key counts that leave
1-3 keys after the groups of 4."""


def _use(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("the AVX2 build needs a CPU with AVX2 and FMA")
    monkeypatch.setenv("RXRT_NATIVE_ISA", isa)


def _attend(q: Tensor, k: Tensor, v: Tensor, old: bool = False) -> Tensor:
    """decode_step.c's attention of one head (``rxt_attend``) in the loaded build."""
    n, hd = k.shape
    scores, out = torch.full((n,), float("nan")), torch.full((hd,), float("nan"))
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (q, k, v)]
    native.library().rxt_attend(*ptrs, ctypes.c_int64(n), ctypes.c_int64(hd), ctypes.c_void_p(scores.data_ptr()),
                                ctypes.c_void_p(out.data_ptr()), ctypes.c_int(int(old)))  # fmt: skip
    return out


def _inputs(hd: int, n: int, seed: int, sharpness: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """A query, keys and values; ``sharpness`` scales the query so the softmax is peaked, as a
    trained model's is, rather than nearly uniform (which would average errors away)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hd, generator=g) * sharpness
    return q, torch.randn(n, hd, generator=g), torch.randn(n, hd, generator=g) * torch.linspace(0.1, 4.0, hd)


def _reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    weights = torch.softmax(k.double() @ q.double() / math.sqrt(q.numel()), dim=0)
    return weights @ v.double()


@pytest.mark.parametrize("isa", ISAS)
def test_attention_matches_a_float64_reference(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """Within a few float32 roundings of the exact result at every shape, and as accurate as the
    code it replaced (libm's expf, 8 running sums), which stays selectable for benchmarks."""
    _use(monkeypatch, isa)
    worst_new = worst_old = 0.0
    for i, (hd, n) in enumerate(SHAPES):
        q, k, v = _inputs(hd, n, seed=i)
        expected = _reference(q, k, v)
        scale = float(v.abs().max())
        new, old = _attend(q, k, v), _attend(q, k, v, old=True)
        err_new = float((new.double() - expected).abs().max()) / scale
        err_old = float((old.double() - expected).abs().max()) / scale
        assert err_new < 2e-6, (hd, n, err_new)
        worst_new, worst_old = max(worst_new, err_new), max(worst_old, err_old)
    assert worst_new <= 2 * worst_old


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_scores(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """Scores far below the largest (e^-87 and beyond: zero weight), one key only, equal keys."""
    _use(monkeypatch, isa)
    q, k, v = _inputs(20, 37, seed=5, sharpness=400.0)
    torch.testing.assert_close(_attend(q, k, v).double(), _reference(q, k, v), rtol=0, atol=1e-6)
    q, k, v = _inputs(33, 1, seed=6)
    assert torch.equal(_attend(q, k, v), v[0])  # one key: weight e^0 / e^0 = 1 exactly
    same = k[:1].expand(19, 33).contiguous()
    vs = torch.randn(19, 33, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_attend(q, same, vs), vs.mean(0), rtol=1e-6, atol=1e-6)


def test_every_build_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vector code follows the scalar code's order exactly (16 running sums folded in halves,
    the softmax's 16 lanes, one ordered sum per column of v), so the builds agree bit for bit."""
    isas = ["native", "scalar"] + (["avx2"] if {"avx2", "fma"} <= _cpu_flags() else [])
    results: dict[str, list[Tensor]] = {}
    for isa in isas:
        monkeypatch.setenv("RXRT_NATIVE_ISA", isa)
        results[isa] = [_attend(*_inputs(hd, n, seed=i)) for i, (hd, n) in enumerate(SHAPES)]
    assert native.isa() != "scalar (forced)" or isas[-1] == "scalar"
    for isa in isas[1:]:
        bad = [SHAPES[i] for i, (a, b) in enumerate(zip(results["native"], results[isa])) if not torch.equal(a, b)]
        assert not bad, (isa, bad)


def _grouped(seed: int, q_heads: int, kv_heads: int, cross_q: int, cross_kv: int) -> RxTModel:
    """Head dim 20 (not a multiple of 8 or 16), 37 memory slots, the given head grouping."""
    return tiny_model(
        seed=seed, dim=120, stm_size=37, max_seq_len=64,
        decoder=DecoderConfig(
            num_heads=6, self_q_heads=q_heads, self_kv_heads=kv_heads, cross_q_heads=cross_q,
            cross_kv_heads=cross_kv, num_experts=4, experts_per_token=2, expert_ffn_dim=24,
        ),
    )  # fmt: skip


GROUPINGS = {"gqa-3": (6, 2, 6, 3), "mqa": (4, 1, 2, 1), "reversed-sqa": (2, 6, 3, 6)}
PROMPTS = [list(range(5, 38)), [11, 12], list(range(40, 57))]  # 33, 2 and 17 tokens


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_grouped_heads_step_equals_torch(monkeypatch: pytest.MonkeyPatch, isa: str, grouping: str) -> None:
    """Whole decode steps (three rows at different positions, so self-attention lengths of 3..40
    keys) with query heads != key/value heads against the torch step; the old attention too."""
    _use(monkeypatch, isa)
    model = _grouped(70, *GROUPINGS[grouping])
    model.native_decode = False
    reference = decode_steps(model, PROMPTS, 7)
    torch_steps = [0]
    real = RxTModel._decode_kernel

    def counted(*args: object, **kwargs: object) -> Tensor:
        torch_steps[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RxTModel, "_decode_kernel", counted)
    model.native_decode = True
    for attention in ("vector", "old"):
        monkeypatch.setenv("RXRT_NATIVE_ATTEND", attention)
        got = decode_steps(model, PROMPTS, 7)
        assert torch_steps[0] == 0  # every step ran in C
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_attention_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RXRT_NATIVE_ATTEND", "fast")
    with pytest.raises(ValueError, match="RXRT_NATIVE_ATTEND"):
        native.old_attention()


def test_the_side_by_side_script_runs(tmp_path: Path) -> None:
    """``benchmarks/int8_rows.py --attend`` (docs/benchmarks.md §8) at a tiny size: both attentions
    measured in the step, and the one-head kernel timed."""
    out = tmp_path / "attend.json"
    script = Path(__file__).parents[1] / "benchmarks" / "int8_rows.py"
    args = ["--attend", "--preset", "nano", "--repeats", "1", "--prompts", "5", "--rows", "2", "--steps", "2"]
    subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out)], check=True, capture_output=True, timeout=600
    )
    result = json.loads(out.read_text())
    assert set(result["prefill_ms"]["5"]) == {"vector", "old", "old_over_vector"}
    assert set(result["decode_tokens_per_s"]["2"]) == {"vector", "old", "vector_over_old"}
    kernel = result["attend_kernel"]
    assert len(kernel) == 4 and all(row["old_over_new"] > 0 and row["expf_over_exp_row"] > 0 for row in kernel)
    assert result["config"]["time"] == "thread CPU time"
