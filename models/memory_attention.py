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
* ``grouped-self-interlayer`` (RxLM 0.3): as ``self-interlayer``, with ``M`` the normalised mean
  of the layer's own group of ``num_layers / num_groups`` consecutive layers

Attention among memory slots uses no RoPE at all, so every variant is equivariant to a
permutation of the slots (a per-slot linear gate permutes with them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention, RopeMode
from .config import RxTConfig
from .gates import ResidualGate
from .memory_norm import memory_norm
from .rope import RotaryEmbedding


class MemoryAttention(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        m = config.memory_attention
        layers, dim, eps, slots = config.num_layers, config.dim, config.norm_eps, config.stm_size
        self.variant = m.variant
        self.num_groups = m.num_groups
        self.rope = RotaryEmbedding(dim // m.num_heads, config.max_seq_len, config.rope_base, config.rope_pairing)

        def attention(rope_mode: RopeMode, q_heads: int, kv_heads: int) -> Attention:
            return Attention(
                dim,
                m.num_heads,
                q_heads,
                kv_heads,
                rope_mode,
                bias=m.attention_bias,
                out_bias=m.attention_output_bias or m.attention_bias,
            )

        def gates() -> nn.ModuleList:
            return nn.ModuleList(
                ResidualGate(
                    slots,
                    dim,
                    m.gate_type,
                    m.gate_per_slot,
                    m.gate_init,
                    per_layer=m.gate_per_layer,
                    activation=m.gate_activation,
                    slot_status=m.gate_slot_status,
                )
                for _ in range(layers)
            )

        def slot_norm() -> nn.Module:
            return memory_norm(m.memory_norm, dim, slots, eps, m.memory_norm_per_dim_scale)

        def norms(memory: bool) -> nn.ModuleList:
            return nn.ModuleList(slot_norm() if memory else nn.RMSNorm(dim, eps=eps) for _ in range(layers))

        self.input_norm = norms(memory=False)  # on ED_i
        self.memory_norm = norms(memory=True)  # on S_i before the main attention
        rope_mode: RopeMode = "k" if m.rope_on_keys else "none"
        self.attention = nn.ModuleList(attention(rope_mode, m.q_heads, m.kv_heads) for _ in range(layers))
        self.gate = gates()
        if self.variant != "simple":
            pre_q, pre_kv = m.pre_q_heads or m.q_heads, m.pre_kv_heads or m.kv_heads
            self.pre_norm = norms(memory=True)
            self.pre_attention = nn.ModuleList(attention("none", pre_q, pre_kv) for _ in range(layers))
            self.pre_gate = gates()
        if self.variant in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
            self.mean_norm = slot_norm()
        if self.variant in ("self-interlayer", "grouped-self-interlayer"):
            self.mix_gate = gates()

    def _means(self, stm: Tensor) -> list[Tensor] | None:
        """The normalised mean over layers (one per group of consecutive layers), or None."""
        if not hasattr(self, "mean_norm"):
            return None
        groups = self.num_groups if self.variant == "grouped-self-interlayer" else 1
        return [self.mean_norm(chunk.mean(dim=1)) for chunk in stm.chunk(groups, dim=1)]

    def forward(
        self, stm: Tensor, encoded: Tensor, encoded_mask: Tensor | None = None, gates: list[Tensor] | None = None
    ) -> Tensor:
        """STM (B, L, S, D) and ED (B, L, T, D) with padding mask (B, T) -> new STM (B, L, S, D).

        ``gates``: if given, each layer's residual gate appends how open it was (B,) (``ResidualGate.mix``)."""
        mask = None if encoded_mask is None else encoded_mask[:, None, None, :]
        means = self._means(stm)
        per_group = stm.shape[1] // len(means) if means else 1
        self.rope.ensure(encoded.shape[2])
        positions = torch.arange(encoded.shape[2], device=encoded.device)
        layers = []
        for i in range(stm.shape[1]):
            s = stm[:, i]
            if self.variant != "simple":
                n = self.pre_norm[i](s)
                if self.variant == "self":
                    context = n
                else:
                    assert means is not None
                    mean = means[i // per_group]
                    context = mean if self.variant == "interlayer" else self.mix_gate[i](n, mean)
                s = self.pre_gate[i](s, self.pre_attention[i](n, context))
            update = self.attention[i](
                self.memory_norm[i](s),
                self.input_norm[i](encoded[:, i]),
                rope=self.rope,
                kv_positions=positions,
                mask=mask,
            )
            if gates is None:
                layers.append(self.gate[i](s, update))
            else:
                gate = self.gate[i]
                assert isinstance(gate, ResidualGate)
                merged, share = gate.mix(s, update)
                layers.append(merged)
                gates.append(share)
        return torch.stack(layers, dim=1)
