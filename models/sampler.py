"""The sampler: greedy, temperature, top-k and top-p, reproducible per conversation.

RxT treats the sampler as part of the model (the paper draft): its settings shape what enters
memory. Sampling uses the Gumbel-max trick with counter-based noise::

    token = argmax_i (logit_i / T + g_i),  g_i = -log(-log(u_i)),  u_i = hash(seed, step, i)

which draws exactly from softmax(logits / T) over the allowed tokens. Because the noise is a
pure function of (seed, step, token id), a conversation's samples do not depend on which other
conversations share its batch or on the device, and no host round-trip or generator state is
needed: the whole step stays on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1``
    turn those filters off; ``seed=None`` draws a fresh seed."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    def resolved_seed(self) -> int:
        """The seed, or a fresh random one when none was given."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(7), "little")


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without signed overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, step: Tensor, token_ids: Tensor) -> Tensor:
    """Uniform (0, 1) float64 noise for each row's (seed, step) and each token id.

    ``seed``, ``step``: (B,) int64; ``token_ids``: (B, V) or (V,) int64 -> (B, V).
    """
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = hash32(seed_lo ^ hash32(seed_hi ^ 0x9E3779B9))
    key = hash32(key ^ _mul32(step & _MASK32, 0x85EBCA6B))
    ids = token_ids if token_ids.dim() == 2 else token_ids[None, :]
    bits = hash32(key[:, None] ^ hash32(ids & _MASK32))
    return (bits.double() + 0.5) / 2.0**32


def gumbel_noise(seed: Tensor, step: Tensor, token_ids: Tensor) -> Tensor:
    return -torch.log(-torch.log(uniform_noise(seed, step, token_ids)))


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    step: Tensor,
    filtered: bool = True,
) -> Tensor:
    """Pick one token per row. All arguments are (B,) tensors on the logits' device.

    ``filtered=False`` promises that no row uses top-k/top-p, which skips the sort over the
    vocabulary (the caller knows the settings on the host, so no device sync is needed).
    """
    greedy_choice = logits.argmax(dim=-1)
    scaled = logits.double() / temperature.double().clamp_min(1e-6)[:, None]
    if filtered:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
        rank = torch.arange(logits.shape[-1], device=logits.device)
        keep = (before < top_p.double()[:, None]) & ((top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None]))
        keep[:, 0] = True
        noisy = sorted_logits + gumbel_noise(seed, step, order)
        choice = noisy.masked_fill(~keep, float("-inf")).argmax(dim=-1)
        sampled = order.gather(1, choice[:, None])[:, 0]
    else:
        ids = torch.arange(logits.shape[-1], device=logits.device)
        sampled = (scaled + gumbel_noise(seed, step, ids)).argmax(dim=-1)
    return torch.where(temperature <= 0, greedy_choice, sampled)


class BatchSampler:
    """Per-row sampling settings of a decode batch, kept on the device between steps."""

    def __init__(self, rows: int, device: torch.device | str | None = None) -> None:
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self._filtered = [False] * rows

    def set_row(self, row: int, params: SamplingParams, seed: int) -> None:
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seed[row] = seed
        self._filtered[row] = params.filtered

    def copy_row(self, src: int, dst: int) -> None:
        for t in (self.temperature, self.top_k, self.top_p, self.seed):
            t[dst] = t[src]
        self._filtered[dst] = self._filtered[src]

    def sample_rows(self, logits: Tensor, step: Tensor, start: int, stop: int) -> Tensor:
        """Sample rows ``start:stop``; ``logits`` and ``step`` (each row's token counter) cover just
        those rows."""
        return sample(
            logits,
            self.temperature[start:stop],
            self.top_k[start:stop],
            self.top_p[start:stop],
            self.seed[start:stop],
            step,
            filtered=any(self._filtered[start:stop]),
        )
