"""One attention module for all of RxT: self-attention, memory cross-attention, memory attention.

Head counts follow Sparse Query Attention (SQA): the model dimension is split into ``num_heads``
heads of ``head_dim = dim // num_heads`` features, and the module uses ``q_heads`` query heads
and ``kv_heads`` key/value heads out of that split::

    Q = x W_q            W_q: dim -> q_heads * head_dim
    K = c W_k, V = c W_v W_k, W_v: dim -> kv_heads * head_dim
    out = softmax(Q K^T / sqrt(head_dim)) V W_o     W_o: q_heads * head_dim -> dim

Each key/value head serves ``q_heads // kv_heads`` consecutive query heads (as in GQA). Fewer
query heads means fewer score matrices, so fewer FLOPs on full-sequence passes (the encoder and
memory attention), which is why RxT uses SQA.

Which side RoPE rotates is fixed per module (``rope_mode``): ``qk`` for self-attention, ``q``
for memory cross-attention (keys are STM slots), ``k`` for memory attention (queries are STM
slots), ``none`` for attention among STM slots.

Backends: flash-attn when it is installed, the tensors are on CUDA in half precision and no
explicit mask is needed; ``torch.nn.functional.scaled_dot_product_attention`` otherwise.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import RotaryEmbedding

RopeMode = Literal["qk", "q", "k", "none"]


def _load_flash_attn() -> Callable[..., Any] | None:
    try:  # pragma: no cover - exercised only where flash-attn is installed (GPU machines)
        return getattr(importlib.import_module("flash_attn"), "flash_attn_func", None)
    except Exception:  # ImportError, or a CUDA build of the extension that does not load here
        return None


_flash_attn_func = _load_flash_attn()


def flash_attention_available() -> bool:
    """True when the flash-attn fast path can be used (it still needs CUDA + fp16/bf16)."""
    return _flash_attn_func is not None and os.environ.get("RXRT_DISABLE_FLASH_ATTN") != "1"


class Attention(nn.Module):
    """Multi-head attention with independent query / key-value head counts and RoPE rules."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        q_heads: int,
        kv_heads: int,
        rope_mode: RopeMode,
        bias: bool = False,
        dropout: float = 0.0,
        out_bias: bool | None = None,
        gate: str = "none",
    ) -> None:
        """``bias``: on all four projections; ``out_bias`` overrides it for the output projection
        (RxLM: unbiased Q/K/V, biased output). ``gate`` (an activation name, RxLM 0.3's gated
        attention): the heads' output is multiplied by ``act(x W_gate)`` before ``W_o``."""
        super().__init__()
        self.head_dim = dim // num_heads
        self.q_heads = q_heads
        self.kv_heads = kv_heads
        # Reversed SQA (RxLM): fewer query than key/value heads; the query heads are tiled
        # ``kv_heads // q_heads`` times (head j reads query head j mod q_heads), and the output
        # projection reads all ``kv_heads`` heads.
        self.q_repeat = kv_heads // q_heads if q_heads < kv_heads else 1
        self.out_heads = q_heads * self.q_repeat
        self.rope_mode = rope_mode
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, q_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.out_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)
        self.gate_proj: nn.Linear | None = None
        self.gate_act: Callable[[Tensor], Tensor] | None = None
        if gate != "none":
            from .ffn import ACTIVATIONS

            self.gate_proj = nn.Linear(dim, self.out_heads * self.head_dim, bias=bias)
            self.gate_act = ACTIVATIONS[gate]
        self._qkv_t: Tensor | None = None  # (dim, (q + 2 kv) * head_dim) once in decode layout
        self._qkv_bias: Tensor | None = None
        self._qkv_ptrs: tuple[int, ...] = ()
        self._bias_ptrs: tuple[int, ...] = ()

    # ------------------------------------------------------------------ decode layout
    @torch.no_grad()
    def use_decode_layout(self) -> None:
        """Store the projections input-major, with Q, K and V side by side in one matrix.

        ``W_q``, ``W_k``, ``W_v`` become column blocks of one (dim, (q + 2 kv) * head_dim) matrix
        and ``W_o`` a transposed view, so one ``x @ W`` projects a decode step's query, key and
        value at once, and a one-row product streams the weights as a ``gemv`` over contiguous
        rows (about twice as fast on a CPU as the ``nn.Linear`` layout). Shapes, values and
        checkpoints do not change; the parameters become views. Idempotent.
        """
        if self.fused_qkv() is None:
            projections = (self.q_proj, self.k_proj, self.v_proj)
            fused = torch.cat([p.weight.detach().t() for p in projections], dim=1).contiguous()
            fused_bias = None
            if self.q_proj.bias is not None:
                fused_bias = torch.cat([p.bias.detach() for p in projections if p.bias is not None]).contiguous()
            start = 0
            for p in projections:
                width = p.out_features
                p.weight.data = fused[:, start : start + width].t()
                if fused_bias is not None and p.bias is not None:
                    p.bias.data = fused_bias[start : start + width]
                start += width
            self._qkv_t, self._qkv_bias = fused, fused_bias
            self._qkv_ptrs = tuple(p.weight.data_ptr() for p in projections)
            self._bias_ptrs = tuple(p.bias.data_ptr() for p in projections if p.bias is not None)
        if not self.o_proj.weight.t().is_contiguous():
            self.o_proj.weight.data = self.o_proj.weight.data.t().contiguous().t()

    def fused_qkv(self) -> tuple[Tensor, Tensor | None] | None:
        """The fused (dim, (q + 2 kv) * head_dim) projection and bias, or None when the parameters
        are no longer views of it (replaced by ``load_state_dict(assign=True)``, ``.to()``...).

        Checked once per decode step and layer, so it compares addresses only: while this module
        holds the fused tensor, no other tensor can start at those addresses. It reads the
        parameter dicts directly, because ``nn.Module`` attribute lookups would cost more than
        the rest of a step's Python (models/native.py checks every layer this way each step).
        """
        fused = self._qkv_t
        if fused is None:
            return None
        params = [cast(nn.Module, self._modules[name])._parameters for name in ("q_proj", "k_proj", "v_proj")]
        if tuple(p["weight"].data_ptr() for p in params) != self._qkv_ptrs:  # type: ignore[union-attr]
            return None
        bias = self._qkv_bias
        biases = [p["bias"] for p in params]
        if bias is None:
            return (fused, None) if all(b is None for b in biases) else None
        if any(b is None for b in biases) or tuple(b.data_ptr() for b in biases) != self._bias_ptrs:  # type: ignore[union-attr]
            return None
        return fused, bias

    def _split(self, x: Tensor, heads: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)  # (B, H, T, head_dim)

    def project_q(self, x: Tensor, rope: RotaryEmbedding | None, positions: Tensor | None) -> Tensor:
        """Queries (B, q_heads, T, head_dim), rotated when ``rope_mode`` says so."""
        q = self._split(self.q_proj(x), self.q_heads)
        if self.rope_mode in ("qk", "q"):
            q = _rotate(q, rope, positions)
        return q.repeat(1, self.q_repeat, 1, 1) if self.q_repeat > 1 else q

    def project_kv(self, x: Tensor, rope: RotaryEmbedding | None, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """Keys and values (B, kv_heads, S, head_dim); keys rotated when ``rope_mode`` says so."""
        k = self._split(self.k_proj(x), self.kv_heads)
        v = self._split(self.v_proj(x), self.kv_heads)
        if self.rope_mode in ("qk", "k"):
            k = _rotate(k, rope, positions)
        return k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
        gate_input: Tensor | None = None,
    ) -> Tensor:
        """softmax(QK^T/sqrt(d))V for projected heads, then the output projection -> (B, T, dim).

        ``mask`` is boolean, True where a query may attend, broadcastable to (B, H, T, S).
        ``gate_input``: the attention's input ``x``, needed when the attention is gated.
        """
        b, _, t, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        if mask is None and _flash_ok(q):
            assert _flash_attn_func is not None
            out = _flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=causal
            )  # (B, T, Hq, D)
            out = out.reshape(b, t, self.out_heads * self.head_dim)
        else:
            out = sdpa(q, k, v, mask=mask, causal=causal, dropout=dropout)
            out = out.transpose(1, 2).reshape(b, t, self.out_heads * self.head_dim)
        if self.gate_proj is not None:
            if gate_input is None or self.gate_act is None:
                raise ValueError("this attention is gated: pass its input as gate_input")
            out = out * self.gate_act(self.gate_proj(gate_input))
        return self.o_proj(out)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        rope: RotaryEmbedding | None = None,
        q_positions: Tensor | None = None,
        kv_positions: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """Attend from ``x`` to ``context`` (``x`` itself when None)."""
        ctx = x if context is None else context
        q = self.project_q(x, rope, q_positions)
        k, v = self.project_kv(ctx, rope, kv_positions)
        return self.attend(q, k, v, mask=mask, causal=causal, gate_input=x)


def _rotate(x: Tensor, rope: RotaryEmbedding | None, positions: Tensor | None) -> Tensor:
    if rope is None:
        raise ValueError("this attention rotates by position but no RotaryEmbedding was given")
    if positions is None:
        positions = torch.arange(x.shape[2], device=x.device)
    return rope.rotate(x, positions)


def _flash_ok(q: Tensor) -> bool:
    return flash_attention_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, dropout: float = 0.0
) -> Tensor:
    """Scaled dot-product attention with fewer key/value heads than query heads.

    A single decode step (one query position) folds each group of query heads into the time
    axis, so the shared keys/values are read once instead of being copied per query head.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        groups = hq // hkv
        b, _, t, d = q.shape
        if t == 1 and not causal:
            folded = q.reshape(b, hkv, groups, d)
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout)
            return out.reshape(b, hq, 1, d)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
