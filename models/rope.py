"""Rotary position embedding (RoPE), and the rule that memory has no position.

RoPE rotates each pair of features ``(x_i, x_{i+d/2})`` of a head by the angle
``pos * base^(-2i/d)``. A dot product of a rotated query and a rotated key then depends only on
their distance. The STM is a set, not a sequence, so in RxT:

* self-attention rotates queries and keys (both are sequence tokens);
* memory cross-attention rotates only the queries (the keys/values are STM slots);
* memory attention rotates only the keys (the Encoded Data tokens; the queries are STM slots).

Which side is rotated is the ``rope`` argument of :class:`rxruntime.models.attention.Attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions ``0 .. max_positions - 1``."""

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.base = base
        cos, sin = self._tables(head_dim, max_positions, base)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _tables(head_dim: int, max_positions: int, base: float) -> tuple[Tensor, Tensor]:
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (P, head_dim)
        return angles.cos().float(), angles.sin().float()

    def _reset_tables(self) -> None:
        # Buffers made on the meta device (parameter counting) or lost precision get rebuilt.
        cos, sin = self._tables(self.head_dim, self.max_positions, self.base)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` of shape (B, H, T, head_dim) by ``positions`` of shape (T,) or (B, T)."""
        if positions.dim() == 1:
            cos = self.cos[positions][None, None]  # (1, 1, T, D)
            sin = self.sin[positions][None, None]
        else:
            cos = self.cos[positions][:, None]  # (B, 1, T, D)
            sin = self.sin[positions][:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
