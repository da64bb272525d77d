"""Memory attention: writes STM(t) from STM(t-1) and the Encoded Data ED(t) (the memory *write*).

In every variant and every layer ``i`` the final step is the same: the (normalised) memory slots
are the queries, the (normalised) Encoded Data of encoder layer ``i`` are the keys/values, and a
residual gate merges the result into the memory::

    U_i    = Attn(Q = norm(S_i), K = V = norm(ED_i))        # RoPE on the ED keys only
    STM_i' = (1 - G) * S_i + G * U_i                        # gates.ResidualGate

What ``S_i`` is depends on the variant (``MemoryAttentionConfig.variant``):

* ``simple``:          ``S_i = STM_i``
* ``self``:            ``S_i = gate(STM_i, Attn(n_i, n_i))``, ``n_i = norm(STM_i)`` (slots attend
  to each other first)
* ``interlayer``:      ``S_i = gate(STM_i, Attn(n_i, M))``, ``M = norm(mean over layers of STM)``
* ``self-interlayer``: ``S_i = gate(STM_i, Attn(n_i, gate(n_i, M)))``: the keys/values are a gated
  mix of the layer's own slots and the mean of all layers (the RxT-Alpha variant)

Attention among memory slots uses no RoPE at all, so every variant is equivariant to a
permutation of the slots (a per-slot linear gate permutes with them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention, RopeMode
from .config import RxTConfig
from .gates import ResidualGate
from .rope import RotaryEmbedding


class MemoryAttention(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        m = config.memory_attention
        layers, dim, eps = config.num_layers, config.dim, config.norm_eps
        self.variant = m.variant
        self.rope = RotaryEmbedding(dim // m.num_heads, config.max_seq_len, config.rope_base)

        def attention(rope_mode: RopeMode) -> Attention:
            return Attention(dim, m.num_heads, m.q_heads, m.kv_heads, rope_mode, bias=m.attention_bias)

        def gates() -> nn.ModuleList:
            return nn.ModuleList(
                ResidualGate(config.stm_size, dim, m.gate_type, m.gate_per_slot, m.gate_init) for _ in range(layers)
            )

        def norms() -> nn.ModuleList:
            return nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(layers))

        self.input_norm = norms()  # on ED_i
        self.memory_norm = norms()  # on S_i before the main attention
        self.attention = nn.ModuleList(attention("k" if m.rope_on_keys else "none") for _ in range(layers))
        self.gate = gates()
        if self.variant != "simple":
            self.pre_norm = norms()
            self.pre_attention = nn.ModuleList(attention("none") for _ in range(layers))
            self.pre_gate = gates()
        if self.variant in ("interlayer", "self-interlayer"):
            self.mean_norm = nn.RMSNorm(dim, eps=eps)
        if self.variant == "self-interlayer":
            self.mix_gate = gates()

    def forward(self, stm: Tensor, encoded: Tensor, encoded_mask: Tensor | None = None) -> Tensor:
        """STM (B, L, S, D) and ED (B, L, T, D) with padding mask (B, T) -> new STM (B, L, S, D)."""
        mask = None if encoded_mask is None else encoded_mask[:, None, None, :]
        mean = self.mean_norm(stm.mean(dim=1)) if hasattr(self, "mean_norm") else None
        positions = torch.arange(encoded.shape[2], device=encoded.device)
        layers = []
        for i in range(stm.shape[1]):
            s = stm[:, i]
            if self.variant != "simple":
                n = self.pre_norm[i](s)
                if self.variant == "self":
                    context = n
                elif self.variant == "interlayer":
                    assert mean is not None
                    context = mean
                else:
                    assert mean is not None
                    context = self.mix_gate[i](n, mean)
                s = self.pre_gate[i](s, self.pre_attention[i](n, context))
            update = self.attention[i](
                self.memory_norm[i](s),
                self.input_norm[i](encoded[:, i]),
                rope=self.rope,
                kv_positions=positions,
                mask=mask,
            )
            layers.append(self.gate[i](s, update))
        return torch.stack(layers, dim=1)
