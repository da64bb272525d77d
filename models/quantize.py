"""Weight formats for CPU inference: float32, bfloat16, and int8 with one scale per 32 inputs.

A batch-1 decode step on a CPU is bound by the bytes of weights it reads per token, so storing
the big matrices in fewer bytes is the way to more tokens per second. The C decode step
(``models/native.py``) reads its own bf16 or int8 copies of the matrices it multiplies. So that
the prefill, the memory update and the torch decode step compute with the same numbers, the
model's float32 parameters are rounded in place to the values those copies hold
(:func:`.weight_format.set_weight_format`): the quantised model is one function whichever path runs it, and
re-quantising a rounded matrix gives back exactly the same int8 values and scales.

Int8 is llama.cpp's q8_0 blocking: each weight is ``q * scale`` with ``q`` in [-127, 127] and one
float scale per output column and block of :data:`BLOCK` consecutive inputs (32 rows of one
column of the input-major matrix). Blocks along the reduction axis let the C step quantise the
activations per block too and sum each block's products in integers (VNNI), converting to float
once per 32 inputs; the torch paths compute in float32 on the rounded weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from .moe import MoE

WeightFormat = Literal["fp32", "bf16", "int8"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("fp32", "bf16", "int8")
BLOCK = 32
"""Inputs (rows of one column of an input-major matrix) sharing one int8 scale (the C step's QBLOCK)."""


Q4_LEVELS = 15
"""The largest 4-bit level of a Q4_1 block (levels 0..15)."""


def q4_enabled() -> bool:
    """Whether int8 weights keep matrices that are exactly Q4_1 in 4 bits (``RXRT_INT8_Q4``, on
    unless ``0``: off, every matrix is q8_0, for side-by-side benchmarks)."""
    return os.environ.get("RXRT_INT8_Q4", "1") != "0"


def q4_levels(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(q, scales, mins)`` when every value of the (rows, cols) input-major float32 ``matrix`` is
    exactly ``scale * q + min`` (float32 product, then sum) with ``q`` in [0, 15] and one float16
    scale and minimum per column and block of :data:`BLOCK` rows: llama.cpp's Q4_1, the values a
    GGUF backbone dequantizes to. ``q`` uint8 (rows, cols), ``scales``/``mins`` float16 (rows / 32,
    cols). None otherwise (rows not whole blocks, or any block not exactly such values): such a
    matrix needs no rounding, and the C step reads it in 0.625 bytes a weight, not int8's 1.125.
    The torch statement of the test the C step's packer (``native.pack_q4``) makes in one pass;
    tests/test_q4.py holds the two to the same answers and bytes.
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
    estimate = ((high - low) / Q4_LEVELS).to(torch.float16).view(torch.int16)
    found = torch.zeros_like(low, dtype=torch.bool)
    scales = torch.zeros_like(mins)
    levels = torch.zeros(grouped.shape, dtype=torch.uint8)
    for step in (0, 1, -1):  # the float16 scale: the nearest half to (max - min) / 15, or a neighbour
        cand = (estimate + step).view(torch.float16)
        d = cand.to(torch.float32)
        safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)
        q = torch.where(d.unsqueeze(-1) > 0, ((grouped - low.unsqueeze(-1)) / safe).round(), torch.zeros_like(grouped))
        q = q.clamp_(0, Q4_LEVELS)
        exact = (q * d.unsqueeze(-1) + low.unsqueeze(-1) == grouped).all(dim=-1) & (d >= 0) & ~found
        scales = torch.where(exact, cand, scales)
        levels = torch.where(exact.unsqueeze(-1), q.to(torch.uint8), levels)
        found |= exact
        if bool(found.all()):
            q_rows = levels.reshape(cols, rows).t().contiguous()
            return q_rows, scales.t().contiguous(), mins.t().contiguous()
    return None


def check_format(weights: str) -> WeightFormat:
    """``weights`` as a :data:`WeightFormat`; ValueError naming the choices otherwise."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    return weights


def _blocks(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(grouped, scales)``: the float32 matrix as (..., blocks, BLOCK, cols), zero-padded only
    when its rows are not a whole number of blocks, and each block-column's absmax / 127."""
    *lead, rows, cols = matrix.shape
    blocks = -(-rows // BLOCK)
    if rows % BLOCK:
        padded = torch.zeros(*lead, blocks * BLOCK, cols, dtype=torch.float32)
        padded[..., :rows, :] = matrix
    else:
        padded = matrix.to(torch.float32).contiguous()
    grouped = padded.view(*lead, blocks, BLOCK, cols)
    # max |x| from two reading passes (no |x| written out); exact, as abs().amax() is (abs_ turns
    # an all-zero block's -0.0 into 0.0). torch's inf-norm would be ~30x slower here.
    scales = torch.maximum(grouped.amax(dim=-2), grouped.amin(dim=-2).neg_()).abs_() / 127.0
    return grouped, scales


def _levels(grouped: Tensor, scales: Tensor) -> Tensor:
    """round(x / scale) clamped to [-127, 127], as float32 (an all-zero block stays zero)."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.div(grouped, safe.unsqueeze(-2)).round_().clamp_(-127, 127)


def quantize_int8(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scales)`` of a (..., rows, cols) input-major float matrix (or a stack of them): int8
    ``q`` of the same shape, contiguous, and float32 ``scales`` (..., ceil(rows / BLOCK), cols)
    with ``matrix ≈ q * scales[..., r // BLOCK, :]``: blocks run down each column, the last one
    padded with zeros."""
    *lead, rows, cols = matrix.shape
    grouped, scales = _blocks(matrix)
    q = _levels(grouped, scales).to(torch.int8).view(*lead, -1, cols)
    return (q if q.shape[-2] == rows else q[..., :rows, :].contiguous()), scales.contiguous()


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    """The float32 matrix ``q`` and ``scales`` stand for (the inverse of :func:`quantize_int8`)."""
    *lead, rows, cols = q.shape
    if rows % BLOCK == 0:  # broadcast the scales over each block: no per-row copy of them
        grouped = q.view(*lead, rows // BLOCK, BLOCK, cols).to(torch.float32)
        return grouped.mul_(scales.unsqueeze(-2)).view(*lead, rows, cols)
    per_row = scales.repeat_interleave(BLOCK, dim=-2)[..., :rows, :]
    return q.to(torch.float32) * per_row


def pack_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scales)`` of a torch-layout ``(..., out, in)`` weight, blocked as the C step blocks it
    (down the inputs): ``q`` int8 in the weight's own layout, ``scales`` as :func:`quantize_int8`'s.
    How a compact model directory stores its matrices in a quarter of float32's bytes."""
    q, scales = quantize_int8(weight.detach().to(torch.float32).transpose(-1, -2))
    return q.transpose(-1, -2).contiguous(), scales


def unpack_int8(q: Tensor, scales: Tensor) -> Tensor:
    """The float32 ``(..., out, in)`` weight :func:`pack_int8` stored."""
    return dequantize_int8(q.transpose(-1, -2), scales).transpose(-1, -2).contiguous()


def rounded_matrices(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(state-dict name, weight)`` of every matrix the weight formats round, in torch's
    ``(..., out, in)`` layout: each linear weight but the routers' (tiny, and a rounded router can
    pick other experts), and each MoE table ``(E, out, in)`` (expert e's matrix is ``table[e]``)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear) and not name.endswith("router"):
            yield f"{prefix}weight", module.weight
        elif isinstance(module, MoE):
            yield f"{prefix}w_in", module.w_in
            yield f"{prefix}w_out", module.w_out


def rounded_matrix_names(model: nn.Module) -> set[str]:
    """State-dict names of the matrices :func:`.weight_format.set_weight_format` rounds: the tensors that may
    be stored as int8 without changing what the int8 runtime computes."""
    return {name for name, _ in rounded_matrices(model)}


def round_to_format(matrix: Tensor, weights: WeightFormat) -> Tensor:
    """The float32 values a (rows, cols) input-major matrix has once stored as ``weights``."""
    if weights == "bf16":
        return matrix.to(torch.bfloat16).to(torch.float32)
    if weights == "int8":  # q * scale without the int8 copy in between: the same products
        *lead, rows, cols = matrix.shape
        grouped, scales = _blocks(matrix)
        rounded = _levels(grouped, scales).mul_(scales.unsqueeze(-2)).view(*lead, -1, cols)
        return rounded if rounded.shape[-2] == rows else rounded[..., :rows, :]
    return matrix
