"""Mixture-of-Experts feed-forward with top-k routing and SwiGLU experts (the decoder's FFN).

For each token ``x`` the router gives probabilities ``p = softmax(x W_r)`` over ``E`` experts.
The ``k`` most probable experts run, and their outputs are mixed with the renormalised
probabilities::

    y = sum_{e in topk(p)} (p_e / sum_{j in topk(p)} p_j) * SwiGLU_e(x)

Dispatch is vectorised, with two strategies:

* **grouped** (many tokens: training, long prefills): token/expert assignments are sorted by
  expert, each expert runs once on its contiguous block of tokens (a loop over at most ``E``
  experts, never over tokens), and the results are scattered back with one ``index_add``. It
  needs the per-expert counts on the host (a device sync) and runs one small matmul per expert,
  which is slow for a handful of tokens.
* **gathered** (up to ``gather_max_tokens`` tokens: decode steps, short prefills): each
  (token, expert) pair is one ``embedding_bag`` over the rows of the expert's weights, weighted
  by the token's features, so ``W_e x`` is computed straight from the expert's storage: no host
  sync, no Python loop, no copy of the chosen experts' weights, all pairs in parallel. From
  ``sort_min_tokens`` tokens on, the pairs are sorted by expert first, so pairs that share an
  expert read its weights from cache. It needs the weights stored input-major
  (:meth:`MoE.use_decode_layout`). Measured on alpha-mini, 2 CPU threads: about 2x faster than
  grouped for 1 to 64 tokens, even at 128, slower from 256 on.

During training the router also yields
the Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (``f_e``: share of
assignments to expert ``e``; ``P_e``: its mean router probability) in ``aux_loss``.

**Released tables.** Routed experts are most of a large MoE model (RxT-Beta: 2.7B of 2.9B
parameters). Where the C decode step holds int8 or bf16 copies of them, the float32 tables are
only a second copy of the same values (``models/quantize.py`` rounds them to what the copies
hold), so :func:`models.native.prepare` drops them and sets :attr:`MoE.released`:
the torch paths then run the grouped dispatch on each routed expert's matrices unpacked from the
copy, the same numbers, one expert at a time. ``rxruntime.load`` goes further: the tables are
compacted one MoE at a time as the checkpoint is read (:func:`models.native.compact_experts`),
so the float32 tables of all layers never exist at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ffn import ACTIVATIONS, SwiGLU


class ReleasedExperts(Protocol):
    """Where a MoE's routed experts live once its float32 tables were dropped: the C step's
    compact copies (:mod:`models.native`)."""

    @property
    def fmt(self) -> str:
        """The weight format of the copies (``"int8"`` or ``"bf16"``)."""
        ...

    def expert(self, e: int) -> tuple[Tensor, Tensor]:
        """Expert ``e``'s float32 ``(w_in[e], w_out[e])``, unpacked from the copies."""
        ...


class MoE(nn.Module):
    aux_loss: Tensor | None

    gather_max_tokens = 128
    """Up to this many tokens per call the gathered dispatch runs (weights in decode layout)."""
    sort_min_tokens = 8
    """From this many tokens on, the gathered dispatch sorts the pairs by expert (cache reuse)."""
    released: ReleasedExperts | None = None
    """Where the experts are once the tables were released (see the module docstring); None
    while ``w_in`` and ``w_out`` hold them."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        dropout: float = 0.0,
        *,
        bias_mode: str = "none",
        num_shared: int = 0,
        shared_hidden_dim: int = 0,
        shared_bias_mode: str = "none",
        shared_scaled: bool = False,
        activation: str = "silu",
        gated: bool = True,
        router_dtype: str = "float32",
    ) -> None:
        """``bias_mode``, ``num_shared``, ``router_dtype``...: RxLM's options (see
        :class:`DecoderConfig`); the defaults are the plain layer of the module docstring."""
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.router_dtype = router_dtype
        self._router_autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(router_dtype)
        # Expert weights stacked on a leading expert axis, laid out like nn.Linear (out, in).
        self.gated = gated
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.w_in = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * hidden_dim, dim))  # [gate; up]
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b_in: nn.Parameter | None = None
        self.b_out: nn.Parameter | None = None
        self.global_bias: nn.Parameter | None = None
        if bias_mode == "local":
            self.b_in = nn.Parameter(torch.zeros(num_experts, (2 if gated else 1) * hidden_dim))
            self.b_out = nn.Parameter(torch.zeros(num_experts, dim))
        elif bias_mode == "global":
            self.global_bias = nn.Parameter(torch.zeros(dim))
        self.shared_experts = nn.ModuleList(
            SwiGLU(
                dim,
                shared_hidden_dim or hidden_dim,
                bias=shared_bias_mode == "local",
                activation=activation,
                gated=gated,
            )
            for _ in range(num_shared)
        )
        self.shared_gate = nn.Linear(dim, num_shared, bias=False) if num_shared > 1 else None
        self.shared_bias = nn.Parameter(torch.zeros(dim)) if num_shared and shared_bias_mode == "global" else None
        self.shared_scaled = shared_scaled
        self.dropout = nn.Dropout(dropout)
        self.aux_loss = None
        self._offsets: dict[tuple[int, int, torch.device], Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_in, self.w_out):
            nn.init.uniform_(w, -1 / math.sqrt(w.shape[-1]), 1 / math.sqrt(w.shape[-1]))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For tokens (N, dim): top-k weights (N, k) summing to 1, expert ids (N, k), probs (N, E)."""
        if self._router_autocast is not None:
            return self._route_reduced(x, self._router_autocast)
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs

    def _route_reduced(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """RxLM 0.3's ``router_amp``: its router (linear, softmax, top-k, renormalisation with
        ``+ 1e-9``) run under ``torch.autocast`` to ``dtype`` on ``x``'s device, op for op, so
        each op runs in the precision autocast gives it there (on a CPU: all of them in
        ``dtype``), and ties between rounded probabilities fall as they fall in RxLM."""
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            probs = F.softmax(self.router(x), dim=-1)
            weights, experts = probs.topk(self.top_k, dim=-1)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-9)
        return weights, experts, probs.float()

    def expert(self, e: int, x: Tensor) -> Tensor:
        """SwiGLU expert ``e`` applied to tokens (n, dim)."""
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        w_in, w_out = (self.w_in[e], self.w_out[e]) if self.released is None else self.released.expert(e)
        if not self.gated:
            return F.linear(self.act(F.linear(x, w_in, b_in)), w_out, b_out)
        gate, up = F.linear(x, w_in, b_in).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, w_out, b_out)

    @property
    def plain(self) -> bool:
        """No biases and no shared experts: the layer the gathered dispatch and the C step compute."""
        return (
            self.b_in is None
            and self.global_bias is None
            and not len(self.shared_experts)
            and self.gated
            and self.activation == "silu"
            and self._router_autocast is None
        )

    def _extras(self, tokens: Tensor, routed: Tensor) -> Tensor:
        """Add the global bias and the shared experts to the routed output (RxLM 0.3 order)."""
        k, n_shared = self.top_k, len(self.shared_experts)
        if self.shared_scaled and n_shared:
            routed = routed * (k / (k + n_shared))
        if self.global_bias is not None:
            routed = routed + self.global_bias
        if not n_shared:
            return routed
        if self.shared_gate is None:
            shared = self.shared_experts[0](tokens)
        else:
            weights = F.softmax(self.shared_gate(tokens), dim=-1)
            outputs = torch.stack([expert(tokens) for expert in self.shared_experts], dim=1)
            shared = (outputs * weights.unsqueeze(-1)).sum(dim=1)
        if self.shared_bias is not None:
            shared = shared + self.shared_bias
        if self.shared_scaled:
            shared = shared * (n_shared / (k + n_shared))
        return routed + shared

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.dim)
        weights, experts, probs = self.route(tokens)
        if self.training:
            share = F.one_hot(experts, self.num_experts).float().sum(dim=(0, 1)) / experts.numel()
            self.aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()
        gatherable = self.b_in is None and self.gated and self.activation == "silu"
        if tokens.shape[0] <= self.gather_max_tokens and self.in_decode_layout() and gatherable and not self.released:
            out = self._dispatch_gathered(tokens, weights.to(x.dtype), experts)
        else:
            out = self._dispatch(tokens, weights.to(x.dtype), experts)
        if not self.plain:
            out = self._extras(tokens, out)
        return self.dropout(out).reshape(shape)

    def decode_residual(self, x: Tensor, h: Tensor) -> Tensor:
        """``x + MoE(h)`` for the tokens (N, dim) of a decode step, the residual add fused into
        the dispatch's last operation; the plain ``x + self(h)`` when training or when the
        gathered dispatch does not apply."""
        if (
            self.training
            or h.shape[0] > self.gather_max_tokens
            or not self.in_decode_layout()
            or not self.plain
            or self.released is not None
        ):
            return x + self(h)
        # The renormalised top-k probabilities are the softmax over the top-k logits: 3 ops, not 6.
        logits, experts = F.linear(h, self.router.weight).topk(self.top_k, dim=-1)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if weights.dtype != h.dtype:
            weights = weights.to(h.dtype)
        return self._dispatch_gathered(h, weights, experts, residual=x)

    # ------------------------------------------------------------------ decode layout
    def expert_numel(self) -> int:
        """Parameters of one routed expert (its ``w_in[e]`` and ``w_out[e]``), released or not."""
        return math.prod(self.w_in.shape[1:]) + math.prod(self.w_out.shape[1:])

    def released_numel(self) -> int:
        """Parameters of the released tables (0 while they are held): counts stay those of the model."""
        return 0 if self.released is None else self.num_experts * self.expert_numel()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self.released is not None:  # w_in / w_out are empty: a saved file would lose the experts
            raise RuntimeError(
                "this MoE's float32 expert tables were released for serving (models.native.prepare); "
                "load the checkpoint again to save or train it"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        if self.released is not None:
            raise RuntimeError("this MoE's expert tables were released for serving; build a fresh model to load one")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def in_decode_layout(self) -> bool:
        """Whether the expert weights are stored input-major (see :meth:`use_decode_layout`)."""
        h, d = self.hidden_dim, self.dim
        return self.w_in.stride() == (2 * h * d, 1, 2 * h) and self.w_out.stride() == (h * d, 1, d)

    @torch.no_grad()
    def use_decode_layout(self) -> None:
        """Store ``w_in`` as (E, dim, 2H) and ``w_out`` as (E, H, dim) in memory.

        Shapes, values and the checkpoint format do not change (the parameters become transposed
        views); only the strides do. In that layout the rows of ``w_in[e]^T`` are contiguous
        rows of one (E*dim, 2H) table, which the gathered dispatch reads with ``embedding_bag``.
        Idempotent; training works in either layout.
        """
        if self.released is not None:
            return
        if not self.w_in.transpose(1, 2).is_contiguous():
            self.w_in.data = self.w_in.data.transpose(1, 2).contiguous().transpose(1, 2)
        if not self.w_out.transpose(1, 2).is_contiguous():
            self.w_out.data = self.w_out.data.transpose(1, 2).contiguous().transpose(1, 2)

    # ------------------------------------------------------------------ dispatch
    def _dispatch_gathered(
        self, tokens: Tensor, weights: Tensor, experts: Tensor, residual: Tensor | None = None
    ) -> Tensor:
        """``sum_k w_k SwiGLU_e_k(x)`` (+ ``residual``) with ``W_e x`` as weighted sums of the rows
        of ``W_e^T``: one ``embedding_bag`` bag per (token, expert) pair, no host sync."""
        n, k = experts.shape
        e_count, hidden, dim, device = self.num_experts, self.hidden_dim, self.dim, tokens.device
        w_in: Tensor = self.w_in
        w_out: Tensor = self.w_out
        if not torch.is_grad_enabled():  # lets embedding_bag skip its backward bookkeeping
            w_in, w_out = w_in.detach(), w_out.detach()
        table_in = w_in.as_strided((e_count * dim, 2 * hidden), (2 * hidden, 1))  # row (e, j) = W_in[e][:, j]
        table_out = w_out.as_strided((e_count * hidden, dim), (dim, 1))  # row (e, h) = W_out[e][:, h]
        flat = experts.view(n * k, 1)
        if n >= self.sort_min_tokens:  # pairs of one expert side by side: its rows stay in cache
            order = flat.view(-1).argsort(stable=True)
            flat = flat[order]
            source = order // k  # the token of each sorted pair
            features = tokens[source]
        else:
            features = tokens[:, None, :].expand(n, k, dim)  # pair (i, j) reads token i
        rows_in = torch.add(self._arange(dim, 1, device), flat, alpha=dim).view(-1)
        gate_up = torch.embedding_bag(
            table_in, rows_in, self._arange(n * k, dim, device), False, 0, False, features.reshape(-1), False, None
        )[0]  # (n*k, 2H): W_in[e] x per pair
        act = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        rows_out = torch.add(self._arange(hidden, 1, device), flat, alpha=hidden).view(-1)
        if n >= self.sort_min_tokens:
            act = act * weights.view(-1)[order, None]
        y = torch.embedding_bag(
            table_out, rows_out, self._arange(n * k, hidden, device), False, 0, False, act.view(-1), False, None
        )[0]  # (n*k, dim)
        if n >= self.sort_min_tokens:
            base = torch.zeros_like(tokens) if residual is None else residual
            return base.index_add(0, source, y)
        if residual is None:
            return torch.bmm(weights.view(n, 1, k), y.view(n, k, dim)).view(n, dim)
        return torch.baddbmm(residual.view(n, 1, dim), weights.view(n, 1, k), y.view(n, k, dim)).view(n, dim)

    def _arange(self, count: int, step: int, device: torch.device) -> Tensor:
        """``arange(0, count * step, step)``, cached: the row offsets and bag starts of a step."""
        key = (count, step, device)
        rows = self._offsets.get(key)
        if rows is None:
            with torch.inference_mode(False):  # a plain tensor, usable with and without autograd
                rows = self._offsets[key] = torch.arange(0, count * step, step, device=device)
        return rows

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
