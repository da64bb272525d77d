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
from .layers import RxTLayer
from .moe import MoE
from .rope import RotaryEmbedding

MemoryKV = list[tuple[Tensor, Tensor]]


class RxTDecoder(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        d = config.decoder
        self.rope = RotaryEmbedding(config.dim // d.num_heads, config.max_seq_len, config.rope_base)
        self.layers = nn.ModuleList(
            RxTLayer(
                config.dim,
                d.num_heads,
                (d.self_q_heads, d.self_kv_heads),
                (d.cross_q_heads, d.cross_kv_heads),
                MoE(config.dim, d.expert_ffn_dim, d.num_experts, d.experts_per_token, d.dropout),
                config.norm_eps,
                d.attention_bias,
                d.dropout,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    @property
    def blocks(self) -> list[RxTLayer]:
        return cast(list[RxTLayer], list(self.layers))

    def memory_kv(self, memory: Tensor) -> MemoryKV:
        """Per-layer cross-attention keys/values for memory (B, L, S, D): once per turn."""
        return [layer.memory_kv(memory[:, i]) for i, layer in enumerate(self.blocks)]

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
        for i, layer in enumerate(self.blocks):
            h = layer(
                h,
                rope=self.rope,
                positions=positions,
                memory_kv=memory_kv[i],
                causal=True,
                self_mask=mask,
                cache=cache,
                layer=i,
                step=step,
            )
        return self.norm(h)

    def aux_loss(self) -> Tensor | None:
        """Sum of the MoE load-balancing losses of the last training forward pass."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if not losses:
            return None
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total
