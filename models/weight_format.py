"""A model's weight format: its matrices rounded, in place, to what the C step's copies hold.

:func:`set_weight_format` stores a float32 model as bf16 or int8 from now on (the format's
arithmetic is :mod:`.quantize`'s; the C step, :mod:`.native`, reads its own compact copies), and
:func:`default_format` says which format a loaded model should take. The torch paths then compute
on the rounded values, so a quantised model is one function whichever path runs it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import native
from .moe import MoE
from .quantize import (
    WeightFormat,
    check_format,
    q4_enabled,
    round_to_format,
    rounded_matrices,
    rounded_matrix_names,
)
from .rxt import RxTModel


def default_format(model: RxTModel, preferred: WeightFormat) -> WeightFormat:
    """``preferred`` where it pays and is wanted, else ``"fp32"``.

    Rounding costs a little accuracy (docs/benchmarks.md section 8), so it is worth it only
    where the C decode step reads the compact copies: a float32 CPU model whose layout the step
    runs. RxLM checkpoints stay float32: their promise is the reference's exact numbers, and
    ``weights=`` asks for compact ones explicitly.
    """
    if model.config.tokenizer_template != "rxt" or native.not_used_reason(model) is not None:
        return "fp32"
    return preferred


def _round_in_place(matrix: Tensor, weights: WeightFormat) -> None:
    matrix.copy_(round_to_format(matrix.detach(), weights))


@torch.no_grad()
def set_weight_format(model: RxTModel, weights: WeightFormat) -> None:
    """Store ``model``'s matrices as ``weights`` from now on (the C step reads the compact copies).

    Rounds, in place, every matrix of the decoder, encoder and memory attention (not the
    embedding table, norms or biases: a lookup, vectors) to the values the format holds, blocked
    down the columns of each input-major matrix (each expert's on its own) exactly as the C step
    blocks them, and sets
    ``model.weight_format``. Irreversible for the loaded weights: load again for float32.
    int8 on a CPU with the C step leaves a matrix that is exactly llama.cpp's Q4_1 as it is (a
    GGUF backbone's, given its GGUF values back first: :func:`restore_backbone_values`): the C
    step reads it in 4 bits, nothing rounded (``RXRT_INT8_Q4=0``: every matrix q8_0).
    """
    weights = check_format(weights)
    released = [m for m in model.modules() if isinstance(m, MoE) and m.released is not None]
    if any(m.released is not None and m.released.fmt != weights for m in released):
        raise ValueError(
            "this model's float32 expert tables were released for serving (models.native.prepare): "
            "load it again to store it in another format"
        )
    if weights == "fp32":
        model.weight_format = "fp32"
        return
    if model.dtype != torch.float32:
        raise ValueError(f"weight formats apply to float32 models, this one is {model.dtype}")
    q4 = weights == "int8" and _q4_possible(model)
    exact = restore_backbone_values(model) if q4 else set()  # checked there: not checked again

    def keeps_4_bits(matrix: Tensor, *params: Tensor) -> bool:
        known = bool(params) and all(id(p) in exact for p in params)
        return q4 and (known or native.pack_q4(matrix) is not None)

    model.use_decode_layout()  # the decoder's matrices as the C step reads them (the same Parameters)
    for layer in model.decoder.blocks:
        for attn in (layer.self_attn, layer.cross_attn):
            fused = None if attn is None else attn.fused_qkv()
            parts = () if attn is None else (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
            if fused is not None and not keeps_4_bits(fused[0], *parts):
                _round_in_place(fused[0], weights)  # (dim, q + 2 kv columns), shared by the views
    done = {id(t) for layer in model.decoder.blocks for t in _fused_views(layer)}
    skip = {id(t) for m in released for t in (m.w_in, m.w_out)}
    for _, weight in rounded_matrices(model):
        # input-major, as the C step blocks it; a MoE table's experts each alone; released
        # tables (empty) are held, rounded, by the C step's copies; a matrix exactly Q4_1 (a
        # GGUF backbone's) is left as it is: the C step reads it in 4 bits (native.pack_q4)
        matrix = weight.transpose(-1, -2)
        if id(weight) in done or id(weight) in skip or keeps_4_bits(matrix, weight):
            continue
        _round_in_place(matrix, weights)
    model.weight_format = weights


def _q4_possible(model: RxTModel) -> bool:
    """Whether int8 weights may keep Q4_1 matrices in 4 bits: the C step is there to read them
    (``native.pack_q4`` packs them), and ``RXRT_INT8_Q4`` is not ``0``."""
    return q4_enabled() and model.device.type == "cpu" and native.unavailable_reason() is None


def restore_backbone_values(model: RxTModel) -> set[int]:
    """Give a compact model's frozen backbone matrices back the values its GGUF dequantizes to,
    where those are exactly Q4_1 (:func:`~.native.pack_q4`) and the model holds them rounded
    to its narrower dtype (bf16): int8 weights then leave them as they are, and the C step reads
    them in 4 bits instead of rounding them to q8_0. Returns the ``id`` of every parameter that
    now holds such values (given back, or held exactly already), so that they need no second
    check. A value moves by at most half a bf16 step, less than q8_0 would move it. Trained
    matrices (no backbone source, or values that differ from it) are untouched; the model keeps
    nothing of the source after."""
    read = model.backbone_values
    if read is None:
        return set()
    source = read()
    params = dict(model.named_parameters())
    fits: dict[int, bool] = {}  # by source tensor: an encoder layer and its decoder block share one
    exact: set[int] = set()
    for name in sorted(rounded_matrix_names(model)):
        value, param = source.get(name), params.get(name)
        if value is None or param is None or value.shape != param.shape or value.dim() != 2:
            continue
        held = torch.equal(value, param)
        if not held and not any(
            torch.equal(value.to(dtype).to(torch.float32), param) for dtype in (torch.bfloat16, torch.float16)
        ):
            continue  # not the backbone's (a trained matrix)
        key = value.data_ptr()
        if key not in fits:
            fits[key] = native.pack_q4(value.t()) is not None
        if fits[key]:
            if not held:
                param.data.copy_(value)
            exact.add(id(param))
    return exact


def _fused_views(layer: nn.Module) -> list[Tensor]:
    """The q/k/v weights of a decoder layer that are views of a fused matrix (already rounded)."""
    out: list[Tensor] = []
    for attn in (getattr(layer, "self_attn", None), getattr(layer, "cross_attn", None)):
        if attn is not None and attn.fused_qkv() is not None:
            out += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    return out
