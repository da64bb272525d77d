"""Static key/value cache of the decoder's self-attention, one row per conversation.

The buffers have the shape (layers, rows, kv_heads, max_len, head_dim), so rows can join and
leave a batch between steps by copying a row; the decode batch reallocates only when its rows or
positions outgrow the buffers, or leave three quarters unused (doubling and halving:
models/generation.py). Each row knows nothing of its length: the caller passes positions, and
the decode mask hides every slot past a row's position.

Memory cross-attention needs no growing cache: its keys/values come from the STM and are
computed once per turn (:meth:`rxruntime.models.rxt.RxTModel.memory_kv`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer self-attention keys/values for ``rows`` sequences of up to ``max_len`` tokens."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k = k
        self.v = v

    @classmethod
    def empty(
        cls,
        num_layers: int,
        rows: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        # Zeros, not torch.empty: masked slots get weight 0, and 0 * NaN garbage would be NaN.
        shape = (num_layers, rows, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def view(self, start: int, stop: int) -> KVCache:
        """Rows ``start:stop`` sharing storage: writes through the view land in this cache."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop])

    def write_prefix(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store a prefill's keys/values (B, H, T, D) at positions ``0 .. T-1``."""
        t = k.shape[2]
        self.k[layer, :, :, :t] = k
        self.v[layer, :, :, :t] = v

    def write_step(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Store one new token per row (B, H, 1, D) at each row's own position (B,)."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer, rows, :, positions] = k[:, :, 0]
        self.v[layer, rows, :, positions] = v[:, :, 0]

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer], self.v[layer]

    def copy_row(self, src: int, dst: int) -> None:
        """Move a conversation's cache to another row (used to keep active rows contiguous)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def step_mask(self, positions: Tensor) -> Tensor:
        """Boolean (B, 1, 1, max_len): a token at ``positions[b]`` sees slots ``0 .. positions[b]``."""
        slots = torch.arange(self.max_len, device=positions.device)
        return (slots[None, :] <= positions[:, None])[:, None, None, :]

    def step_bias(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """:meth:`step_mask` as an additive float mask (0 or -inf), computed once per decode step
        for all layers; SDPA on the CPU runs faster with it than with a boolean mask."""
        bias = torch.full((positions.shape[0], 1, 1, self.max_len), float("-inf"), device=positions.device, dtype=dtype)
        return bias.masked_fill_(self.step_mask(positions), 0.0)

    def step_scatter_index(self, positions: Tensor) -> Tensor:
        """Each row's position (B,) as a (B, kv_heads, 1, head_dim) index for
        :meth:`write_step_scatter`; built once per decode step, shared by all layers."""
        _, _, heads, _, head_dim = self.k.shape
        return positions.view(-1, 1, 1, 1).expand(-1, heads, 1, head_dim)

    def write_step_scatter(self, layer: int, k: Tensor, v: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`write_step` for one token's keys/values (B, H, D) per row, with a
        :meth:`step_scatter_index`: one ``scatter_`` per tensor (rows may sit at different
        positions). Returns the layer's whole key and value buffers (B, H, max_len, D)."""
        kl, vl = self.k[layer], self.v[layer]
        kl.scatter_(2, index, k[:, :, None])
        vl.scatter_(2, index, v[:, :, None])
        return kl, vl
