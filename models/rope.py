"""Rotary position embedding (RoPE), and the rule that memory has no position.

RoPE rotates each pair of features of a head by the angle ``pos * base^(-2i/d)``. Which
features form pair ``i`` is ``RxTConfig.rope_pairing``: ``(x_i, x_{i+d/2})`` (``half``, ours), or
``(x_{2i}, x_{2i+1})`` rotated in place (``adjacent``, RxLM 0.3) or written back as
``[firsts | seconds]`` (``adjacent-split``, RxLM 0.2: a fixed permutation of ``adjacent``, which
cancels in ``q . k`` when both sides are rotated, but not when only one is). A dot product of a
rotated query and a rotated key then depends only on their distance. The STM is a set, not a sequence, so in RxT:

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

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0, pairing: str = "half") -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.pairing = pairing
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.base = base
        if torch.empty(0).is_meta:  # built to be loaded into (load_pretrained rebuilds the tables on
            # its device): meta arange is a slow Python path that imports torch._dynamo
            cos = sin = torch.empty(max_positions, head_dim)
        else:
            cos, sin = self._tables(head_dim, max_positions, base, pairing)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _tables(head_dim: int, max_positions: int, base: float, pairing: str = "half") -> tuple[Tensor, Tensor]:
        if pairing == "half":
            inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        else:  # RxLM's checkpoints: the angles rounded to float32 exactly as RxLM rounds them
            inv_freq32 = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
            angles = torch.outer(torch.arange(max_positions).float(), inv_freq32).double()
        angles = torch.cat([angles, angles], dim=-1)  # (P, head_dim)
        return angles.cos().float(), angles.sin().float()

    def _reset_tables(self) -> None:
        # Buffers made on the meta device (parameter counting) or lost precision get rebuilt.
        cos, sin = self._tables(self.head_dim, self.max_positions, self.base, self.pairing)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def ensure(self, length: int) -> None:
        """Grow the tables to cover positions ``0 .. length - 1`` (as RxLM's RoPE does when a
        sequence is longer than its configured length, e.g. a long system prompt)."""
        if length > self.max_positions:
            self.max_positions = length
            self._reset_tables()

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
        if self.pairing != "half":
            # The tables repeat each angle in both halves; a pair needs it once.
            cos, sin = cos[..., :half], sin[..., :half]
            first, second = x[..., 0::2], x[..., 1::2]
            a = first * cos - second * sin
            b = first * sin + second * cos
            if self.pairing == "adjacent":
                return torch.stack((a, b), dim=-1).flatten(-2)
            return torch.cat((a, b), dim=-1)
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def rotation_matrices(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, head_dim, head_dim) matrices ``R`` with ``x @ R[b] == rotate(x)`` at ``positions[b]``
        (any pairing: rotating the identity's rows gives the map's matrix)."""
        eye = torch.eye(self.head_dim, device=self.cos.device, dtype=dtype)
        rows = eye.expand(positions.shape[0], 1, self.head_dim, self.head_dim)  # (B, 1, D rows, D)
        out = self.rotate(rows.transpose(1, 2), positions[:, None])  # each row at its own position
        return out[:, :, 0, :]
