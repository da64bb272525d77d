"""The rules that make memory a set, not a sequence, and the residual gates' formulas."""

from __future__ import annotations

import pytest
import torch

from rxruntime.models import MemoryAttentionConfig, RxTModel
from rxruntime.models.attention import Attention
from rxruntime.models.config import GateType, MemoryAttentionVariant
from rxruntime.models.gates import ResidualGate

from .conftest import tiny_model

VARIANTS = ["simple", "self", "interlayer", "self-interlayer"]


def _permute_gates(model: RxTModel, perm: torch.Tensor) -> None:
    """Where a gate's weights are indexed by slot, move them with the slots."""
    for gate in model.memory_attention.modules():
        if not isinstance(gate, ResidualGate):
            continue
        with torch.no_grad():
            if gate.linear is not None and gate.per_slot:
                gate.linear.weight.copy_(gate.linear.weight[perm][:, perm])
                gate.linear.bias.copy_(gate.linear.bias[perm])
            elif gate.weight is not None:
                gate.weight.copy_(gate.weight[perm])


def test_memory_cross_attention_is_invariant_to_slot_permutation(model: RxTModel) -> None:
    stm = model.init_stm(2, torch.Generator().manual_seed(3), std=1.0)
    ids = torch.randint(7, 97, (2, 11))
    perm = torch.randperm(stm.shape[2])
    with torch.no_grad():
        logits = model.decoder_logits(ids, stm)
        permuted = model.decoder_logits(ids, stm[:, :, perm])
    torch.testing.assert_close(permuted, logits, rtol=1e-5, atol=1e-5)
    # ...while the STM's content does matter (the test would pass trivially otherwise).
    with torch.no_grad():
        other = model.decoder_logits(ids, model.init_stm(2, torch.Generator().manual_seed(4), std=1.0))
    assert (other - logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "gate_type,per_slot", [("linear", True), ("linear", False), ("elementwise", True), ("elementwise", False)]
)
def test_memory_attention_is_equivariant_to_slot_permutation(
    variant: MemoryAttentionVariant, gate_type: GateType, per_slot: bool
) -> None:
    model = tiny_model(
        memory_attention=MemoryAttentionConfig(
            variant=variant,
            num_heads=4,
            q_heads=2,
            kv_heads=2,
            gate_type=gate_type,
            gate_per_slot=per_slot,
            gate_init=0.3,
        )
    )
    with torch.no_grad():  # random gate weights, so a gate that ignored slot order would show
        for gate in model.memory_attention.modules():
            if isinstance(gate, ResidualGate) and gate.weight is not None:
                gate.weight.normal_()
    stm = model.init_stm(2, torch.Generator().manual_seed(5), std=1.0)
    ids = torch.randint(7, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    perm = torch.randperm(stm.shape[2])
    with torch.no_grad():
        encoded = model.encode(ids, mask)
        new = model.update_memory(stm, encoded, mask)
        _permute_gates(model, perm)
        new_permuted = model.update_memory(stm[:, :, perm], encoded, mask)
    torch.testing.assert_close(new_permuted, new[:, :, perm], rtol=1e-5, atol=1e-5)
    assert (new - stm).abs().max() > 1e-4  # the update did something


def test_memory_attention_ignores_padded_encoded_tokens(model: RxTModel) -> None:
    stm = model.init_stm(1, torch.Generator().manual_seed(1), std=1.0)
    ids = torch.randint(7, 97, (1, 8))
    padded = torch.cat([ids, torch.randint(7, 97, (1, 5))], dim=1)
    mask = torch.zeros(1, 13, dtype=torch.bool)
    mask[:, :8] = True
    with torch.no_grad():
        short = model.memory_update(stm, ids)
        long = model.memory_update(stm, padded, mask)
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-5)


def test_rope_rotates_only_the_sequence_side(model: RxTModel) -> None:
    layer = model.decoder.blocks[0]
    assert layer.self_attn.rope_mode == "qk"
    assert layer.cross_attn is not None and layer.cross_attn.rope_mode == "q"
    mem = model.memory_attention
    assert all(isinstance(a, Attention) and a.rope_mode == "k" for a in mem.attention)
    assert all(isinstance(a, Attention) and a.rope_mode == "none" for a in mem.pre_attention)


@pytest.mark.parametrize(
    "gate_type,per_slot", [("linear", True), ("linear", False), ("elementwise", True), ("elementwise", False)]
)
def test_gate_formulas(gate_type: GateType, per_slot: bool) -> None:
    torch.manual_seed(0)
    slots, dim = 5, 8
    gate = ResidualGate(slots, dim, gate_type, per_slot, init=0.1)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    stm, update = torch.randn(3, slots, dim), torch.randn(3, slots, dim)
    s = stm + update
    if gate_type == "linear" and per_slot:
        assert gate.linear is not None
        w, b = gate.linear.weight, gate.linear.bias
        expected_g = torch.sigmoid(s.mean(-1) @ w.T + b).unsqueeze(-1)  # W . mean(STM+U) + b across slots
    elif gate_type == "linear":
        assert gate.linear is not None
        w, b = gate.linear.weight, gate.linear.bias
        expected_g = torch.sigmoid(s @ w.T + b)
    elif per_slot:
        assert gate.weight is not None
        expected_g = torch.sigmoid(gate.weight * s.mean(-1, keepdim=True))
    else:
        assert gate.weight is not None
        expected_g = torch.sigmoid(gate.weight * s)
    with torch.no_grad():
        torch.testing.assert_close(gate.gate(stm, update), expected_g)
        torch.testing.assert_close(gate(stm, update), (1 - expected_g) * stm + expected_g * update)
    assert ((expected_g > 0) & (expected_g < 1)).all()
