"""Mixture-of-Experts feed-forward with top-k routing and SwiGLU experts (the decoder's FFN).

For each token ``x`` the router gives probabilities ``p = softmax(x W_r)`` over ``E`` experts.
The ``k`` most probable experts run, and their outputs are mixed with the renormalised
probabilities::

    y = sum_{e in topk(p)} (p_e / sum_{j in topk(p)} p_j) * SwiGLU_e(x)

Dispatch is vectorised: token/expert assignments are sorted by expert, each expert runs once
on its contiguous block of tokens (a loop over at most ``E`` experts, never over tokens), and
the results are scattered back with one ``index_add``. During training the router also yields
the Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (``f_e``: share of
assignments to expert ``e``; ``P_e``: its mean router probability) in ``aux_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoE(nn.Module):
    aux_loss: Tensor | None

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        # Expert weights stacked on a leading expert axis, laid out like nn.Linear (out, in).
        self.w_in = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))  # [gate; up]
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.dropout = nn.Dropout(dropout)
        self.aux_loss = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_in, self.w_out):
            nn.init.uniform_(w, -1 / math.sqrt(w.shape[-1]), 1 / math.sqrt(w.shape[-1]))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For tokens (N, dim): top-k weights (N, k) summing to 1, expert ids (N, k), probs (N, E)."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs

    def expert(self, e: int, x: Tensor) -> Tensor:
        """SwiGLU expert ``e`` applied to tokens (n, dim)."""
        gate, up = F.linear(x, self.w_in[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_out[e])

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.dim)
        weights, experts, probs = self.route(tokens)
        if self.training:
            share = F.one_hot(experts, self.num_experts).float().sum(dim=(0, 1)) / experts.numel()
            self.aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()
        out = self._dispatch(tokens, weights.to(x.dtype), experts)
        return self.dropout(out).reshape(shape)

    def _dispatch(self, tokens: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # source token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        grouped = tokens[token_of]
        outputs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                outputs.append(self.expert(e, grouped[start : start + n]))
                start += n
        mixed = torch.cat(outputs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(tokens).index_add_(0, token_of, mixed)
