"""The memory encoder: bidirectional RxT blocks with dense SwiGLU feed-forward.

It reads a whole finished interaction ``[BOS] [Q] query [A] answer [EOS]`` and returns the
Encoded Data: the hidden states after every layer, (B, L, T, D), so encoder layer ``i`` feeds
memory attention layer ``i``. Whether it also reads STM(t-1) through memory cross-attention is
``EncoderConfig.memory_cross_attention``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .config import RxTConfig
from .decoder import MemoryKV
from .ffn import SwiGLU
from .layers import RxTLayer
from .rope import RotaryEmbedding


class RxTEncoder(nn.Module):
    fixed_memory: Tensor | None

    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        e = config.encoder
        self.reads_memory = e.memory_cross_attention
        self.causal = e.causal
        self.rope = RotaryEmbedding(
            config.dim // e.num_heads, config.max_seq_len, config.rope_base, config.rope_pairing
        )
        self.layers = nn.ModuleList(
            RxTLayer(
                config.dim,
                e.num_heads,
                (e.self_q_heads, e.self_kv_heads),
                (e.cross_q_heads, e.cross_kv_heads) if e.memory_cross_attention else None,
                SwiGLU(
                    config.dim, e.ffn_dim, e.dropout, bias=e.ffn_bias, activation=e.ffn_activation, gated=e.ffn_gated
                ),
                config.norm_eps,
                e.attention_bias,
                e.dropout,
                out_bias=e.attention_output_bias or e.attention_bias,
                layer_norm=config.layer_norm,
                gates=(e.attention_gate, "none"),
            )
            for _ in range(config.num_layers)
        )
        fixed = None
        if e.memory_cross_attention and e.memory_source == "fixed":
            # RxLM 0.2's encoder reads its own STM buffer, saved with the weights, never the
            # conversation's: a constant of the model.
            fixed = torch.zeros(config.num_layers, config.stm_size, config.dim)
        self.register_buffer("fixed_memory", fixed)

    @property
    def blocks(self) -> list[RxTLayer]:
        return cast(list[RxTLayer], list(self.layers))

    def memory_kv(self, memory: Tensor) -> MemoryKV:
        """Cross-attention keys/values for the STM (B, L, S, D), or of the fixed memory when the
        encoder has one (then only the batch size of ``memory`` counts)."""
        if self.fixed_memory is not None:
            memory = self.fixed_memory.to(memory.dtype).expand(memory.shape[0], *self.fixed_memory.shape)
        return [layer.memory_kv(memory[:, i]) for i, layer in enumerate(self.blocks)]

    def forward(self, h: Tensor, *, key_mask: Tensor | None, memory_kv: MemoryKV | None = None) -> Tensor:
        """Embedded tokens (B, T, D) and padding mask (B, T) -> Encoded Data (B, L, T, D)."""
        if self.reads_memory and memory_kv is None:
            raise ValueError("this encoder reads the STM: pass memory_kv")
        self.rope.ensure(h.shape[1])
        positions = torch.arange(h.shape[1], device=h.device)
        # causal: right padding needs no mask (a real token never sees a later pad)
        mask = None if key_mask is None or self.causal else key_mask[:, None, None, :]
        states = []
        for i, layer in enumerate(self.blocks):
            h = layer(
                h,
                rope=self.rope,
                positions=positions,
                memory_kv=None if memory_kv is None else memory_kv[i],
                causal=self.causal,
                self_mask=mask,
            )
            states.append(h)
        return torch.stack(states, dim=1)
