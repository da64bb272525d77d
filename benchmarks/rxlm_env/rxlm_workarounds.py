"""Instance-level fixes for RxLM bugs that stop its own inference paths, each keeping RxLM's maths.

Shared by rxlm_fixtures.py (parity fixtures), rxlm_turns.py (speed on the same weights) and
rxlm_beta_full.py (RxT-Beta at full size), the last two through rxlm_common.ready; all run inside
an RxLM virtual environment. Nothing here changes a weight or a formula:
each fix makes RxLM run the computation its code intends, and returns a note saying what it did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def apply_workarounds(model: Any, version: str, batch: bool = False) -> list[str]:
    """Patch ``model`` (an RxTAlpha/RxTBeta of RxLM ``version``) so ``interact`` (and, with ``batch``,
    ``batch_interact``) runs."""
    notes: list[str] = []
    if batch and not hasattr(model, "device"):
        model.device = next(model.parameters()).device
        notes.append("batch_interact reads self.device, which RxTAlpha never sets: set on the instance")
    if batch and not hasattr(model, "end_token_id"):
        model.end_token_id = model.eos_token_id
        notes.append("batch_interact reads self.end_token_id, which RxTAlpha never sets: set to eos_token_id")
    dec = model.decoder.model
    if version.startswith("0.3"):
        if getattr(dec, "stateless_layers", None) is None:
            dec.stateless_layers = nn.ModuleList()  # no parameters: state dict unchanged
            notes.append(
                "reset_self_attn_cache iterates decoder.model.stateless_layers even when it is None: "
                "set to an empty ModuleList on the instance"
            )

        if getattr(dec, "final_stateless_layers", None) is not None:
            reset = dec.reset_self_attn_cache

            def reset_all() -> None:
                reset()
                for layer in dec.final_stateless_layers:
                    layer.attention.reset_inner_cache()

            dec.reset_self_attn_cache = reset_all
            notes.append(
                "reset_self_attn_cache forgets final_stateless_layers: their self-attention KV cache survives into "
                "the next turn and turn 2 crashes in RoPE; the instance's reset also clears them (each turn starts "
                "with empty caches, as every other layer does; still so in 0.3.93)"
            )

        if _patch(version) >= 87:  # 0.3.87 calls split_kv_head with the right arity
            return notes

        def prepare_stm_kv_cache() -> list[tuple[torch.Tensor, torch.Tensor]]:
            cache = []
            for i, layer in enumerate(dec.layers):
                stm = dec.stm(i + dec.num_shared_layers)
                normed = layer.stm_norm(stm)
                att = layer.memory_cross_attention
                b, t, _ = stm.size()
                cache.append((att.split_kv_head(att.k_proj(normed), b, t), att.split_kv_head(att.v_proj(normed), b, t)))
            return cache

        model.prepare_stm_kv_cache = prepare_stm_kv_cache
        notes.append(
            "prepare_stm_kv_cache calls split_kv_head(projected, b, t, d) but 0.3.80's split_kv_head takes "
            "(projected, b, t): replaced on the instance by the same computation with the right arity "
            "(norm STM with stm_norm, k_proj/v_proj, split into kv heads), so interact takes RxLM's cached-"
            "K/V path exactly as 0.2.31 does (decode steps rope the cross-attention query at current_positions)"
        )
    return notes


def _patch(version: str) -> int:
    """The patch number of an RxLM version string (``"0.3.93"`` -> 93)."""
    return int(version.split(".")[2].split("+")[0])
