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


def q4_enabled() -> bool:
    """Whether int8 weights keep matrices that are exactly Q4_1 in 4 bits (``RXRT_INT8_Q4``, on
    unless ``0``: off, every matrix is q8_0, for side-by-side benchmarks)."""
    return os.environ.get("RXRT_INT8_Q4", "1") != "0"


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
