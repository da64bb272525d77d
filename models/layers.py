"""The RxT block, shared by decoder and encoder (pre-norm, RMSNorm everywhere)::

    x = x + SelfAttn(norm1(x))                            # causal in the decoder
    x = x + MemCrossAttn(norm2(x), K = V = norm_stm(STM_i))  # RoPE on queries only; optional
    x = x + FFN(norm3(x))                                 # MoE in the decoder, SwiGLU in the encoder

The memory cross-attention keys/values depend only on the STM, so they are computed once per
turn by :meth:`RxTLayer.memory_kv` and passed in, not recomputed for every token.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention
from .cache import KVCache
from .rope import RotaryEmbedding


class RxTLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        self_heads: tuple[int, int],
        cross_heads: tuple[int, int] | None,
        ffn: nn.Module,
        norm_eps: float | None,
        bias: bool = False,
        dropout: float = 0.0,
        out_bias: bool | None = None,
        layer_norm: bool = False,
        gates: tuple[str, str] = ("none", "none"),
    ) -> None:
        """``layer_norm``: LayerNorm (torch's default epsilon) instead of RMSNorm (RxLM's
        ``use_rms_norm=False``); ``gates``: the self- and cross-attention output gates."""
        super().__init__()

        def norm() -> nn.Module:
            return nn.LayerNorm(dim) if layer_norm else nn.RMSNorm(dim, eps=norm_eps)

        self.self_norm = norm()
        self.self_attn = Attention(
            dim, num_heads, *self_heads, rope_mode="qk", bias=bias, dropout=dropout, out_bias=out_bias, gate=gates[0]
        )
        self.cross_attn: Attention | None = None
        if cross_heads is not None:
            self.cross_norm = norm()
            self.stm_norm = norm()
            self.cross_attn = Attention(
                dim,
                num_heads,
                *cross_heads,
                rope_mode="q",
                bias=bias,
                dropout=dropout,
                out_bias=out_bias,
                gate=gates[1],
            )
        self.ffn_norm = norm()
        self.ffn = ffn

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values (B, kv_heads, S, head_dim) of one memory layer (B, S, D)."""
        if self.cross_attn is None:
            raise RuntimeError("this layer has no memory cross-attention")
        return self.cross_attn.project_kv(self.stm_norm(memory), None, None)

    def forward(
        self,
        x: Tensor,
        *,
        rope: RotaryEmbedding,
        positions: Tensor,
        rope_positions: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None,
        causal: bool,
        self_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        step: bool = False,
    ) -> Tensor:
        """``step``: ``x`` is one new token per row at ``positions`` (B, 1), read/written in ``cache``.
        ``rope_positions`` (default ``positions``) are the positions RoPE rotates by."""
        rot = positions if rope_positions is None else rope_positions
        h = self.self_norm(x)
        q = self.self_attn.project_q(h, rope, rot)
        k, v = self.self_attn.project_kv(h, rope, rot)
        if cache is not None:
            if step:
                cache.write_step(layer, k, v, positions[:, 0])
                k, v = cache.layer(layer)
                causal = False  # the step mask in self_mask does the work
            else:
                cache.write_prefix(layer, k, v)
        x = x + self.self_attn.attend(q, k, v, mask=self_mask, causal=causal, gate_input=h)
        if self.cross_attn is not None:
            if memory_kv is None:
                raise ValueError("memory cross-attention needs memory keys/values (memory_kv)")
            h = self.cross_norm(x)
            q = self.cross_attn.project_q(h, rope, rot)
            x = x + self.cross_attn.attend(q, *memory_kv, gate_input=h)
        return x + self.ffn(self.ffn_norm(x))
