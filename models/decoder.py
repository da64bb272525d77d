"""The generator-decoder: causal RxT blocks with MoE feed-forward, a final norm and the LM head.

It reads the current query (and the answer so far) through self-attention and the conversation
through memory cross-attention to the STM; it never sees earlier turns' tokens. The token
embedding is shared with the encoder and lives in :class:`rxruntime.models.rxt.RxTModel`.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from .cache import KVCache
from .config import RxTConfig
from .ffn import SwiGLU
from .layers import RxTLayer
from .moe import MoE
from .rope import RotaryEmbedding

MemoryKV = list[tuple[Tensor, Tensor]]


class RxTDecoder(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        d = config.decoder
        self.rope = RotaryEmbedding(
            config.dim // d.num_heads,
            config.max_seq_len + d.step_position_offset,
            config.rope_base,
            config.rope_pairing,
        )
        self.step_position_offset = d.step_position_offset

        def ffn(kind: str) -> nn.Module:
            act, gated = d.ffn_activation, d.ffn_gated
            if kind == "dense":
                return SwiGLU(config.dim, d.dense_ffn_dim, d.dropout, bias=d.ffn_bias, activation=act, gated=gated)
            if not d.use_moe:
                return SwiGLU(config.dim, d.ffn_dim, d.dropout, bias=d.ffn_bias, activation=act, gated=gated)
            return MoE(
                config.dim,
                d.expert_ffn_dim,
                d.num_experts,
                d.experts_per_token,
                d.dropout,
                bias_mode=d.expert_bias_mode,
                num_shared=d.num_shared_experts,
                shared_hidden_dim=d.shared_expert_ffn_dim,
                shared_bias_mode=d.shared_expert_bias_mode,
                shared_scaled=d.shared_experts_scaled,
                activation=act,
                gated=gated,
                router_dtype=d.router_dtype,
            )

        def layer(memory: bool, kind: str) -> RxTLayer:
            return RxTLayer(
                config.dim,
                d.num_heads,
                (d.self_q_heads, d.self_kv_heads),
                (d.cross_q_heads, d.cross_kv_heads) if memory else None,
                ffn(kind),
                config.norm_eps,
                d.attention_bias,
                d.dropout,
                out_bias=d.attention_output_bias or d.attention_bias,
                layer_norm=config.layer_norm,
                gates=(d.attention_gate, d.cross_attention_gate),
            )

        # Stateless layers (RxLM 0.3) sit before and after the memory layers; the STM has one
        # layer per memory layer only.
        kinds = (
            [(False, k) for k in d.layers_before]
            + [(True, "moe")] * config.num_layers
            + [(False, k) for k in d.layers_after]
        )
        self.layers = nn.ModuleList(layer(memory, kind) for memory, kind in kinds)
        self.memory_layers = [i for i, (memory, _) in enumerate(kinds) if memory]
        self.norm: nn.Module | None = None
        if d.final_norm == "rms":
            self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        elif d.final_norm == "layer":
            self.norm = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=d.lm_head_bias)

    @property
    def blocks(self) -> list[RxTLayer]:
        return cast(list[RxTLayer], list(self.layers))

    def final_norm(self, h: Tensor) -> Tensor:
        return h if self.norm is None else self.norm(h)

    def memory_kv(self, memory: Tensor) -> MemoryKV:
        """Per-memory-layer cross-attention keys/values for memory (B, L, S, D): once per turn."""
        return [self.layer_memory_kv(i, memory[:, i]) for i in range(len(self.memory_layers))]

    def layer_memory_kv(self, i: int, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Memory layer ``i``'s entry of :meth:`memory_kv`, from that layer of the STMs (B, S, D)."""
        return cast(RxTLayer, self.layers[self.memory_layers[i]]).memory_kv(memory)

    def forward(
        self,
        h: Tensor,
        *,
        positions: Tensor,
        memory_kv: MemoryKV,
        cache: KVCache | None = None,
        step: bool = False,
    ) -> Tensor:
        """Embedded tokens (B, T, D) -> final-normed hidden states (B, T, D)."""
        mask = cache.step_mask(positions[:, 0]) if (step and cache is not None) else None
        rope_positions = positions + self.step_position_offset if (step and self.step_position_offset) else positions
        m = 0
        for i, layer in enumerate(self.blocks):
            kv = None
            if layer.cross_attn is not None:
                kv = memory_kv[m]
                m += 1
            h = layer(
                h,
                rope=self.rope,
                positions=positions,
                rope_positions=rope_positions,
                memory_kv=kv,
                causal=True,
                self_mask=mask,
                cache=cache,
                layer=i,
                step=step,
            )
        return self.final_norm(h)

    def aux_loss(self) -> Tensor | None:
        """Sum of the MoE load-balancing losses of the last training forward pass."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if not losses:
            return None
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total
