"""Q4_1 matrices in the C step (issue 24's 100 tokens/s): a GGUF backbone's matrices are exactly
llama.cpp's Q4_1 values (a float16 scale and minimum per 32 inputs, levels 0-15), so int8 weights
keep them in 4 bits (0.625 bytes a weight against q8_0's 1.125) instead of rounding them again.

What must hold: the packer (C, ``native.pack_q4``) recognises exactly the matrices the ``gguf``
package's own Q4_1 quantizer makes and nothing else, byte for byte as the torch reference packs
them; the q4 kernel computes the block formula of activation-quantised products, with the same
bits in every build (VNNI, AVX2, scalar) and for any rows per pass; a compact model over a Q4_1
GGUF (the shipped model's shape) gets its backbone's exact values back at load and its C step
stays close to its torch step; ``RXRT_INT8_Q4=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from rxruntime.models import native
from rxruntime.models.quantize import BLOCK

from .test_backbone_store import TINY, _trained, backbone_dir  # noqa: F401  (the fixture)
from .test_quantize import _cpu_flags

gguf = pytest.importorskip("gguf")

needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler: the C decode step cannot be built"
)

Q4 = 4  # decode_step.c's W_Q4
TILE = 16  # columns per tile of the C step's int8 and q4 layouts


def q4_levels(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(q, scales, mins)`` when every value of the (rows, cols) input-major float32 ``matrix`` is
    exactly ``scale * q + min`` (float32 product, then sum) with ``q`` in [0, 15] and one float16
    scale and minimum per column and block of :data:`BLOCK` rows: llama.cpp's Q4_1, the values a
    GGUF backbone dequantizes to. ``q`` uint8 (rows, cols), ``scales``/``mins`` float16 (rows / 32,
    cols). None otherwise (rows not whole blocks, or any block not exactly such values): such a
    matrix needs no rounding, and the C step reads it in 0.625 bytes a weight, not int8's 1.125.
    The torch statement of the test the C step's packer (``native.pack_q4``) makes in one pass,
    written apart from it so that the two can be held to the same answers.
    """
    if matrix.dim() != 2 or matrix.shape[0] % BLOCK or matrix.dtype != torch.float32 or matrix.numel() == 0:
        return None
    if _q4_fit(matrix[:, :16]) is None:  # a cheap refusal for the matrices that are not
        return None
    return _q4_fit(matrix)


def _q4_fit(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    rows, cols = matrix.shape
    grouped = matrix.t().reshape(cols, rows // BLOCK, BLOCK)  # (cols, blocks, 32): a block per row
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        return None
    mins = low.to(torch.float16)
    if not bool((mins.to(torch.float32) == low).all()):  # the minimum is level 0: exactly a half
        return None
    estimate = ((high - low) / 15).to(torch.float16).view(torch.int16)
    found = torch.zeros_like(low, dtype=torch.bool)
    scales = torch.zeros_like(mins)
    levels = torch.zeros(grouped.shape, dtype=torch.uint8)
    for step in (0, 1, -1):  # the float16 scale: the nearest half to (max - min) / 15, or a neighbour
        cand = (estimate + step).view(torch.float16)
        d = cand.to(torch.float32)
        safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)
        q = torch.where(d.unsqueeze(-1) > 0, ((grouped - low.unsqueeze(-1)) / safe).round(), torch.zeros_like(grouped))
        q = q.clamp_(0, 15)
        exact = (q * d.unsqueeze(-1) + low.unsqueeze(-1) == grouped).all(dim=-1) & (d >= 0) & ~found
        scales = torch.where(exact, cand, scales)
        levels = torch.where(exact.unsqueeze(-1), q.to(torch.uint8), levels)
        found |= exact
        if bool(found.all()):
            q_rows = levels.reshape(cols, rows).t().contiguous()
            return q_rows, scales.t().contiguous(), mins.t().contiguous()
    return None


def _pack_q4_levels(levels: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The C step's q4 copy of an input-major matrix from its :func:`q4_levels`, in torch: the
    reference ``native.pack_q4``'s bytes are held to.

    Layout (decode_step.c's q4 Mat): per tile of 16 columns, per block of 32 rows, 4 groups of 64
    bytes (group h: rows 8h..8h+3 in the low nibbles, 8h+4..8h+7 in the high ones, column j's 4
    rows at ``4 j``), then the tile's 16 float16 scales and 16 float16 minimums of that block: 320
    bytes a block. Padding columns hold level, scale and minimum 0.
    """
    q, scales, mins = levels
    rows, cols = q.shape
    blocks, tiles = rows // BLOCK, -(-cols // TILE)
    padded = torch.zeros(rows, tiles * TILE, dtype=torch.uint8)
    padded[:, :cols] = q
    # (blocks, h, low/high, i, tiles, j) -> (tiles, blocks, h, j, i) per nibble
    grouped = padded.view(blocks, 4, 2, 4, tiles, TILE).permute(4, 0, 1, 2, 5, 3)
    nibbles = (grouped[:, :, :, 0] | (grouped[:, :, :, 1] << 4)).reshape(tiles, blocks, BLOCK * TILE // 2)
    halves = []
    for values in (scales, mins):
        wide = torch.zeros(blocks, tiles * TILE, dtype=torch.float16)
        wide[:, :cols] = values
        halves.append(wide.view(blocks, tiles, TILE).transpose(0, 1).contiguous().view(torch.uint8))
    return torch.cat([nibbles, *halves], dim=2).contiguous()


def _gguf_q4(rows: int, cols: int, seed: int) -> torch.Tensor:
    """An input-major (rows, cols) matrix as the gguf package's Q4_1 quantizer leaves it (blocks of
    32 inputs per column), dequantized by the same package: the values a GGUF backbone loads as."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(cols, rows, generator=g) * torch.logspace(-3, 1, cols)[:, None]).numpy()
    w[3, 32:64] = 0.25  # a constant block: scale 0
    q = gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    values = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.ascontiguousarray(values)).t()  # (rows, cols), as nn.Linear's transpose


def test_q4_levels_recover_what_gguf_quantizes() -> None:
    w = _gguf_q4(96, 40, seed=1)
    levels = q4_levels(w)
    assert levels is not None
    q, s, m = levels
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.dtype == m.dtype == torch.float16
    rebuilt = q.float().view(3, BLOCK, 40) * s.float()[:, None, :] + m.float()[:, None, :]
    assert torch.equal(rebuilt.view(96, 40), w)


@needs_cc
def test_c_packer_matches_the_torch_reference_byte_for_byte() -> None:
    for w in (_gguf_q4(96, 40, seed=2), _gguf_q4(64, 16, seed=3).contiguous()):  # two memory orders
        packed = native.pack_q4(w)
        levels = q4_levels(w)
        assert packed is not None and levels is not None
        assert torch.equal(packed, _pack_q4_levels(levels))


@needs_cc
def test_what_is_not_exactly_q4_is_refused() -> None:
    w = _gguf_q4(64, 24, seed=4)
    nudged = w.clone()
    nudged[40, 7] = torch.nextafter(nudged[40, 7], torch.tensor(9.0))  # one value one float step away
    random = torch.randn(64, 24, generator=torch.Generator().manual_seed(5))
    for bad in (nudged, random, w[:48], w.to(torch.float64)):  # not Q4_1; 48 rows: not whole blocks
        assert native.pack_q4(bad) is None
        assert q4_levels(bad) is None
    nan = w.clone()
    nan[0, 0] = float("nan")
    assert native.pack_q4(nan) is None and q4_levels(nan) is None


def _block_product_q4(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ W as the q4 kernel defines it, in float64: x rounded per block of 32 (as for int8),
    each block's exact integer sums times the float32 scale products, plus the minimums' terms."""
    levels = q4_levels(w)
    assert levels is not None
    q, s, m = levels
    blocks = w.shape[0] // BLOCK
    xb = x.view(blocks, BLOCK)
    sx = xb.abs().amax(1) / 127.0
    xq = torch.round(xb / torch.where(sx > 0, sx, torch.ones_like(sx))[:, None]).clamp(-127, 127)
    sums = torch.einsum("bi,bic->bc", xq.double(), q.view(blocks, BLOCK, -1).double())
    scale = (sx[:, None] * s.float()).double()
    shift = (sx[:, None] * m.float()).double() * xq.sum(1, keepdim=True).double()
    return (scale * sums + shift).sum(0)


@needs_cc
def test_kernel_is_the_block_formula_with_the_same_bits_in_every_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each build against the float64 formula (a float32 sum per column, so within its rounding),
    and against each other bit for bit; 1-8 rows per pass give one row's bits; 37 columns: a
    partial last tile."""
    w = _gguf_q4(128, 37, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, 128, generator=g) * torch.linspace(0.01, 3.0, 128)
    x[3] = 0.0
    x[5, 40:64] = 0.0
    isas = ["native", "scalar"] + (["avx2"] if {"avx2", "fma", "f16c"} <= _cpu_flags() else [])
    results = {}
    for isa in isas:
        monkeypatch.setenv("RXRT_NATIVE_ISA", isa)
        keep: list[torch.Tensor] = []
        mat = native._mat(w, "int8", keep)
        assert mat.type == Q4
        lib = native.library()
        single = torch.empty(11, 37)
        for b in range(11):
            lib.rxt_matvec(ctypes.byref(mat), ctypes.c_int64(0), ctypes.c_int64(128), ctypes.c_int64(37),
                           ctypes.c_void_p(x[b].data_ptr()), ctypes.c_void_p(single[b].data_ptr()))  # fmt: skip
            expected = _block_product_q4(x[b], w)
            torch.testing.assert_close(single[b].double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        for rows in range(1, 9):
            y = torch.empty(11, 37)
            lib.rxt_matmul(ctypes.byref(mat), ctypes.c_int64(0), ctypes.c_int64(128), ctypes.c_int64(37),
                           ctypes.c_int(11), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                           ctypes.c_int(rows))  # fmt: skip
            assert torch.equal(y, single), (isa, rows)
        results[isa] = single
    assert all(torch.equal(results["native"], r) for r in results.values())
    # and the product is x @ W up to the 8-bit rounding of x (about 1% of a row's scale)
    exact = x.double() @ w.double()
    assert float((results["native"].double() - exact).abs().max()) < 0.02 * float(exact.abs().max())


@needs_cc
def test_int8_can_be_kept_all_q8(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RXRT_INT8_Q4=0``: the same matrix is packed as q8_0 (for side-by-side benchmarks)."""
    w = _gguf_q4(64, 16, seed=8)
    keep: list[torch.Tensor] = []
    assert native._mat(w, "int8", keep).type == Q4
    monkeypatch.setenv("RXRT_INT8_Q4", "0")
    assert native._mat(w, "int8", keep).type == native._WEIGHT_TYPES["int8"]


@needs_cc
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compact_backbone_model_reads_its_gguf_matrices_in_4_bits(
    backbone_dir: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
    dtype: torch.dtype | None,
) -> None:
    """A compact model over the tiny Q4_1 GGUF, its backbone stored in bf16 as the shipped one
    (or float32): loaded int8, every frozen backbone matrix holds the GGUF's exact values again and
    is packed as q4, the trained ones as q8_0; the C step stays close to the torch step on these
    weights (teacher-forced, 12 steps of 3 rows)."""
    from rxruntime.models import load_pretrained
    from rxruntime.models.backbone_gguf import backbone_state, read_gguf
    from rxruntime.models.compact import save_compact
    from rxruntime.models.weight_format import set_weight_format

    from .test_quantize import PROMPTS, _forced

    gguf_file = backbone_dir / "tiny" / TINY
    full = _trained(gguf_file, tmp_path / "full", dtype)
    save_compact(full, tmp_path / "compact", gguf_file)
    model, _ = load_pretrained(tmp_path / "compact")
    source = backbone_state(model.config, read_gguf(gguf_file).tensors, share=True)
    # the fixture trains the encoder too (the shipped model's is frozen): the decoder's blocks are the backbone's
    frozen = ["decoder.layers.1.self_attn.q_proj.weight", "decoder.layers.0.ffn.w_out.weight"]
    params = dict(model.named_parameters())
    if dtype is torch.bfloat16:
        assert not any(torch.equal(params[n], source[n]) for n in frozen)  # held rounded to bf16
    set_weight_format(model, "int8")
    params = dict(model.named_parameters())
    for name in frozen:
        assert torch.equal(params[name].detach(), source[name]), name  # the GGUF's values, exactly
    pairs = _forced(model, PROMPTS, 12)
    blocks = {t.shape[-1] for t in native._decoders[model]._copies}  # bytes per block of each packed copy
    assert blocks == {BLOCK * 16 // 2 + 64, BLOCK * 16 + 64}  # q4 (the backbone's) and q8_0 (trained)
    rel = [(c - t).abs() / t.std(-1, keepdim=True) for c, t in pairs]
    same = sum(int((c.argmax(-1) == t.argmax(-1)).sum()) for c, t in pairs)
    # measured (float32 backbone): the largest difference 6.1% of a row's logit std with q4, 6.6%
    # with every matrix q8_0 (RXRT_INT8_Q4=0): the activations' rounding, not the 4 bits
    assert max(float(r.max()) for r in rel) < 0.1
    assert sorted(float(r.median()) for r in rel)[len(rel) // 2] < 0.015
    assert same >= 0.95 * sum(c.shape[0] for c, _ in pairs)
