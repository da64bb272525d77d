"""Dense SwiGLU feed-forward: ``W_down (silu(x W_gate) * (x W_up))``.

The encoder uses it directly; each expert of the decoder's MoE is one of these. Gate and up
projections are stored as one matrix so a forward pass makes one input matmul, not two.
``bias`` adds biases to both projections (RxLM's feed-forward layers have them); ``activation``
replaces SiLU and ``gated=False`` makes it the plain ``W_out act(x W_in)`` (RxLM's options).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


class SwiGLU(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        bias: bool = False,
        activation: str = "silu",
        gated: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gated = gated
        self.act = ACTIVATIONS[activation]
        self.w_in = nn.Linear(dim, (2 if gated else 1) * hidden_dim, bias=bias)  # [gate; up]
        self.w_out = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:
            return self.dropout(self.w_out(self.act(self.w_in(x))))
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.dropout(self.w_out(self.act(gate) * up))
