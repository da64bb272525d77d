"""Norms on memory slots: plain RMSNorm, or one of RxLM's gated memory norms.

RxLM's memory attention can normalise STM slots with norms that blend the normalised slot with
the raw one through a learned gate ``g = sigmoid(gate)``::

    out = g * scale * normalise(x) + (1 - g) * x

* ``gated-rms`` (RxLM ``rms``): ``normalise(x) = x / sqrt(rms(x) + 1e-6)``, ``rms`` over ``dim``
  per slot (note: the square root of the RMS, exactly as RxLM computes it); ``scale`` per
  feature, one scalar gate.
* ``gated-adaptive-rms`` (RxLM ``adaptive``): the same at inference (its running RMS is used only
  while training); the buffer is kept so checkpoints round-trip.
* ``gated-positional`` (RxLM ``positional``): ``normalise(x) = x / sqrt(ema_rms + 1e-6)`` with the
  per-slot running RMS saved in the checkpoint; ``scale`` per slot (or per feature), a gate per
  slot.
* ``gated-layer`` (RxLM ``layer``): ``normalise(x) = LayerNorm(x)``.

Only inference is implemented: the running statistics are never updated here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_EPS = 1e-6


class GatedMemoryNorm(nn.Module):
    ema_rms: Tensor

    def __init__(self, kind: str, dim: int, slots: int, per_dim_scale: bool = False) -> None:
        super().__init__()
        self.kind = kind
        if kind == "gated-positional":
            self.scale = nn.Parameter(torch.ones(dim if per_dim_scale else slots, *(() if per_dim_scale else (1,))))
            self.gate = nn.Parameter(torch.zeros(slots, 1))
            self.register_buffer("ema_rms", torch.ones(slots, 1))
        else:
            self.scale = nn.Parameter(torch.ones(dim))
            self.gate = nn.Parameter(torch.zeros(1))
            if kind == "gated-adaptive-rms":
                self.register_buffer("ema_rms", torch.ones(1))
            if kind == "gated-layer":
                self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gated-layer":
            normed = self.norm(x)
        elif self.kind == "gated-positional":
            normed = x * torch.rsqrt(self.ema_rms + _EPS)
        else:
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()
            normed = x * torch.rsqrt(rms + _EPS)
        normed = normed * self.scale
        g = torch.sigmoid(self.gate)
        if self.kind == "gated-positional":
            return g * normed + (1 - g) * x
        return normed * g + x * (1 - g)


def memory_norm(kind: str, dim: int, slots: int, eps: float | None, per_dim_scale: bool = False) -> nn.Module:
    """The norm a ``MemoryAttentionConfig.memory_norm`` names."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return GatedMemoryNorm(kind, dim, slots, per_dim_scale)


__all__ = ["GatedMemoryNorm", "memory_norm"]
