"""A memory update reports what it changed: per STM layer, how far the memory moved and how open
the residual gates were, computed on the update path and carried by ``MemoryUpdated``."""

from __future__ import annotations

import threading

import pytest
import torch

from rxruntime.engine import Engine
from rxruntime.events import MemoryUpdated
from rxruntime.models.gates import ResidualGate
from rxruntime.models.rxt import memory_change

from .conftest import tiny_model


@pytest.mark.parametrize(
    ("gate_type", "per_slot", "activation"),
    [
        ("elementwise", False, "sigmoid"),
        ("linear", True, "tanh"),
        ("static", True, "sigmoid"),
        ("none", False, "sigmoid"),
    ],
)
def test_mix_is_forward_and_reports_the_updates_share(gate_type: str, per_slot: bool, activation: str) -> None:
    torch.manual_seed(0)
    gate = ResidualGate(4, 8, gate_type, per_slot, init=0.3, activation=activation)
    old, new = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    out, share = gate.mix(old, new)
    assert torch.equal(out, gate(old, new))
    assert share.shape == (3,)
    if gate_type == "none":
        assert torch.equal(share, torch.ones(3))
    else:
        g = gate.gate(old, new).expand(3, 4, 8)
        expected = (1 + g) / 2 if activation == "tanh" else g
        assert torch.allclose(share, expected.mean(dim=(1, 2)))
        assert bool(((share > 0) & (share < 1)).all())


def test_memory_update_records_one_gate_per_layer() -> None:
    model = tiny_model(seed=3).eval()
    stm = torch.randn(2, model.config.num_layers, model.config.stm_size, model.config.dim)
    ids = torch.randint(6, 100, (2, 9))
    gates: list[torch.Tensor] = []
    with torch.no_grad():
        new = model.memory_update(stm, ids, None, gates)
        assert torch.equal(new, model.memory_update(stm, ids))  # recording changes nothing
    change = memory_change(stm, new, gates)
    assert change.shape == (2, 2, model.config.num_layers)
    for layer in range(model.config.num_layers):
        moved = (new[1, layer] - stm[1, layer]).norm() / stm[1, layer].norm()
        assert torch.isclose(change[1, 0, layer], moved)
        assert torch.isclose(change[1, 1, layer], gates[layer][1])


def test_memory_updated_carries_the_layers_figures(engine: Engine) -> None:
    conv = engine.conversation()
    seen: list[MemoryUpdated] = []
    arrived = threading.Event()

    def on_memory(event: object) -> None:
        if isinstance(event, MemoryUpdated):
            seen.append(event)
            arrived.set()

    conv.memory_events.subscribe(on_memory)
    before, _, _ = engine.snapshot(conv.id)
    conv.ask("Hi there", wait_for_memory=True)
    after, version, _ = engine.snapshot(conv.id)
    assert arrived.wait(10)
    event = seen[0]
    layers = engine.config.num_layers
    assert event.stm_version == version and len(event.layer_change) == layers == len(event.layer_gate)
    for layer in range(layers):
        moved = float((after[layer] - before[layer]).norm() / before[layer].norm())
        assert event.layer_change[layer] == pytest.approx(moved, rel=1e-4)
        assert 0.0 <= event.layer_gate[layer] <= 1.0
