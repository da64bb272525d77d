"""Residual gates: how much of the new memory update enters the STM.

A plain residual ``STM + U`` lets every update pile onto memory; a gate interpolates instead::

    STM' = (1 - G) * STM + G * U                 (activation "sigmoid")
    STM' = (1 - G) * STM + (1 + G) * U           (activation "tanh", RxLM's default)

with ``G`` computed from ``STM + U`` (or fixed):

* ``elementwise``: ``G = act(W * status)``. Per slot, ``W`` is (slots, 1) and ``status`` each
  slot's mean over ``dim``; per layer (RxLM), ``W`` is one scalar and ``status`` the mean over
  slots and ``dim``; otherwise (ours) ``W`` is (slots, dim) and multiplies ``STM + U`` itself.
* ``linear``: per slot (the RxT-Alpha gate), ``W`` is a (slots x slots) map of the slot statuses,
  one value per slot, mixing information across slots; per layer (RxLM), a (slots -> 1) map;
  otherwise (ours) a (dim x dim) map applied to every slot.
* ``static``: ``G = act(W)``, a learned constant per slot or per layer.
* ``none``: no gate, ``STM' = STM + U``.

A slot's status is its mean over ``dim``, or (``slot_status="linear"``) a learned projection
to one number. A per-slot gate has shape (B, slots, 1) and broadcasts over ``dim``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualGate(nn.Module):
    def __init__(
        self,
        stm_size: int,
        dim: int,
        gate_type: str,
        per_slot: bool,
        init: float = 0.0,
        *,
        per_layer: bool = False,
        activation: str = "sigmoid",
        slot_status: str = "mean",
    ) -> None:
        super().__init__()
        self.gate_type = gate_type
        self.per_slot = per_slot
        self.per_layer = per_layer
        self.tanh = activation == "tanh"
        self.linear: nn.Linear | None = None
        self.weight: nn.Parameter | None = None
        self.status: nn.Linear | None = nn.Linear(dim, 1) if slot_status == "linear" and gate_type != "none" else None
        if gate_type == "linear":
            if per_layer:
                self.linear = nn.Linear(stm_size, 1)
            else:
                size = stm_size if per_slot else dim
                self.linear = nn.Linear(size, size)
            nn.init.constant_(self.linear.bias, init)
        elif gate_type in ("elementwise", "static"):
            shape = (1,) if per_layer else (stm_size, 1 if per_slot else dim)
            self.weight = nn.Parameter(torch.full(shape, float(init)))

    def _status(self, total: Tensor) -> Tensor:
        """Each slot's status (B, slots, 1)."""
        if self.status is not None:
            return self.status(total)
        return total.mean(dim=-1, keepdim=True)

    def gate(self, old: Tensor, new: Tensor) -> Tensor:
        """G before the activation's mix: (B, slots, 1) per slot, (B, 1, 1) per layer, else (B, slots, dim)."""
        act = torch.tanh if self.tanh else torch.sigmoid
        if self.gate_type == "static":
            assert self.weight is not None
            return act(self.weight)
        total = old + new
        if self.linear is not None:
            if self.per_slot or self.per_layer:
                return act(self.linear(self._status(total).squeeze(-1))).unsqueeze(-1)
            return act(self.linear(total))
        assert self.weight is not None
        if self.per_layer:
            return act(self.weight * total.mean(dim=(1, 2), keepdim=True))
        if self.per_slot:
            return act(self.weight * self._status(total))
        return act(self.weight * total)

    def mix(self, old: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
        """``forward``, and how open the gate was: the mean share of the update that entered the
        STM, per batch row (B,). 0 keeps the old memory, 1 takes the update (no gate: 1)."""
        if self.gate_type == "none":
            return new + old, new.new_ones(new.shape[0], dtype=torch.float32)
        g = self.gate(old, new)
        if self.tanh:  # weights (1 + g) on the update, (1 - g) on the memory: its share is (1 + g) / 2
            out, share = (1 + g) * new + (1 - g) * old, (1 + g) / 2
        else:
            out, share = (1 - g) * old + g * new, g
        if share.dim() == new.dim():
            return out, share.float().mean(dim=tuple(range(1, share.dim())))
        return out, share.float().mean().expand(new.shape[0])  # static: the same for every row

    def forward(self, old: Tensor, new: Tensor) -> Tensor:
        if self.gate_type == "none":
            return new + old
        g = self.gate(old, new)
        if self.tanh:
            return (1 + g) * new + (1 - g) * old
        return (1 - g) * old + g * new
