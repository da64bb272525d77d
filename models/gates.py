"""Residual gates: how much of the new memory update enters the STM.

A plain residual ``STM + U`` lets every update pile onto memory; a gate interpolates instead::

    STM' = (1 - G) * STM + G * U

with ``G`` in (0, 1) computed from ``STM + U``:

* ``elementwise``: ``G = sigmoid(W * (STM + U))``, ``W`` of shape (slots, dim), or (slots, 1)
  applied to each slot's mean over ``dim`` when ``per_slot``;
* ``linear``: ``G = sigmoid(W (STM + U) + b)``; with ``per_slot`` (the RxT-Alpha gate) ``W`` is a
  (slots x slots) map applied to the slot means, so one value per slot, mixing information across
  slots; without it, ``W`` is (dim x dim) applied to every slot.

A per-slot gate has shape (B, slots, 1) and broadcasts over ``dim``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import GateType


class ResidualGate(nn.Module):
    def __init__(self, stm_size: int, dim: int, gate_type: GateType, per_slot: bool, init: float = 0.0) -> None:
        super().__init__()
        self.gate_type = gate_type
        self.per_slot = per_slot
        self.linear: nn.Linear | None = None
        self.weight: nn.Parameter | None = None
        if gate_type == "linear":
            size = stm_size if per_slot else dim
            self.linear = nn.Linear(size, size)
            nn.init.constant_(self.linear.bias, init)
        else:
            self.weight = nn.Parameter(torch.full((stm_size, 1 if per_slot else dim), float(init)))

    def gate(self, old: Tensor, new: Tensor) -> Tensor:
        """G for old/new states of shape (B, slots, dim): (B, slots, 1) per slot, else (B, slots, dim)."""
        total = old + new
        if self.linear is not None:
            if self.per_slot:
                return torch.sigmoid(self.linear(total.mean(dim=-1))).unsqueeze(-1)
            return torch.sigmoid(self.linear(total))
        assert self.weight is not None
        if self.per_slot:
            return torch.sigmoid(self.weight * total.mean(dim=-1, keepdim=True))
        return torch.sigmoid(self.weight * total)

    def forward(self, old: Tensor, new: Tensor) -> Tensor:
        g = self.gate(old, new)
        return (1 - g) * old + g * new
