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
from .quantize import WeightFormat, check_format, round_to_format, rounded_matrices
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
    model.use_decode_layout()  # the decoder's matrices as the C step reads them
    for layer in model.decoder.blocks:
        for attn in (layer.self_attn, layer.cross_attn):
            fused = None if attn is None else attn.fused_qkv()
            if fused is not None:
                _round_in_place(fused[0], weights)  # (dim, q + 2 kv columns), shared by the views
    done = {id(t) for layer in model.decoder.blocks for t in _fused_views(layer)}
    skip = {id(t) for m in released for t in (m.w_in, m.w_out)}
    for _, weight in rounded_matrices(model):
        # input-major, as the C step blocks it; a MoE table's experts each alone; released
        # tables (empty) are held, rounded, by the C step's copies
        if id(weight) not in done and id(weight) not in skip:
            _round_in_place(weight.transpose(-1, -2), weights)
    model.weight_format = weights


def _fused_views(layer: nn.Module) -> list[Tensor]:
    """The q/k/v weights of a decoder layer that are views of a fused matrix (already rounded)."""
    out: list[Tensor] = []
    for attn in (getattr(layer, "self_attn", None), getattr(layer, "cross_attn", None)):
        if attn is not None and attn.fused_qkv() is not None:
            out += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    return out
