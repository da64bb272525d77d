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
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import check_penalty
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RxTConfig

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1``
    turn those filters off; ``seed=None`` draws a fresh seed."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the answer already holds (OpenAI's meaning; in
    [-2, 2]): a small greedy model stops looping one sentence."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence of a token in the answer so far (OpenAI's; in [-2, 2])."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        check_penalty("presence_penalty", self.presence_penalty)
        check_penalty("frequency_penalty", self.frequency_penalty)

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    @classmethod
    def model_default(cls, config: RxTConfig) -> SamplingParams:
        """Greedy, with the model's own default penalties (``config.json``): what a turn that sets
        nothing gets, in serving and in ``rxrt eval``."""
        return cls(
            temperature=0.0, presence_penalty=config.presence_penalty, frequency_penalty=config.frequency_penalty
        )

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


_ID_HASHES: dict[tuple[int, torch.device], Tensor] = {}


def _id_hashes(vocab_size: int, device: torch.device) -> Tensor:
    """``hash32(id)`` for every id of a vocabulary: it depends on nothing else, so it is computed
    once per (vocabulary, device) and gathered, halving the hashing work of each step."""
    key = (vocab_size, device)
    table = _ID_HASHES.get(key)
    if table is None:
        with torch.inference_mode(False):
            table = _ID_HASHES[key] = hash32(torch.arange(vocab_size, device=device))
    return table


def uniform_noise(seed: Tensor, step: Tensor, token_ids: Tensor, vocab_size: int | None = None) -> Tensor:
    """Uniform (0, 1) float64 noise for each row's (seed, step) and each token id.

    ``seed``, ``step``: (B,) int64; ``token_ids``: (B, V) or (V,) int64 -> (B, V). With
    ``vocab_size`` (every id in ``[0, vocab_size)``) the id hashes come from a cached table.
    """
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = hash32(seed_lo ^ hash32(seed_hi ^ 0x9E3779B9))
    key = hash32(key ^ _mul32(step & _MASK32, 0x85EBCA6B))
    ids = token_ids if token_ids.dim() == 2 else token_ids[None, :]
    if vocab_size is None:
        id_hash = hash32(ids & _MASK32)
    else:
        table = _id_hashes(vocab_size, ids.device)
        id_hash = table[ids] if token_ids.dim() == 2 else table[None, :]
    bits = hash32(key[:, None] ^ id_hash)
    return (bits.double() + 0.5) / 2.0**32


def gumbel_noise(seed: Tensor, step: Tensor, token_ids: Tensor, vocab_size: int | None = None) -> Tensor:
    return -torch.log(-torch.log(uniform_noise(seed, step, token_ids, vocab_size)))


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    step: Tensor,
    filtered: bool = True,
    greedy: bool = False,
) -> Tensor:
    """Pick one token per row. All arguments are (B,) tensors on the logits' device.

    ``filtered=False`` promises that no row uses top-k/top-p, which skips the sort over the
    vocabulary; ``greedy=True`` promises that every row is greedy, which skips the noise too
    (the caller knows the settings on the host, so no device sync is needed).
    """
    greedy_choice = logits.argmax(dim=-1)
    if greedy:
        return greedy_choice
    vocab = logits.shape[-1]
    scaled = logits.double() / temperature.double().clamp_min(1e-6)[:, None]
    if not filtered:
        ids = torch.arange(vocab, device=logits.device)
        sampled = (scaled + gumbel_noise(seed, step, ids, vocab)).argmax(dim=-1)
    elif logits.device.type == "cpu":
        sampled = _sample_filtered_by_rejection(scaled, top_k, top_p, seed, step)
    else:
        sampled = _sample_filtered(scaled, top_k, top_p, seed, step)
    return torch.where(temperature <= 0, greedy_choice, sampled)


def _sample_filtered(scaled: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    """Gumbel-max over each row's top-k / top-p set, found by sorting the vocabulary.

    Top-k applies first; top-p then measures mass within the renormalised top-k set, as
    Hugging Face and RxLM do (probabilities .4 .3 .2 .1 with k=2, p=.5 keep only the first)."""
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device)
    in_top_k = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(~in_top_k, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token, within top-k
    keep = (before < top_p.double()[:, None]) & in_top_k
    keep[:, 0] = True
    noisy = sorted_logits + gumbel_noise(seed, step, order, vocab)
    choice = noisy.masked_fill(~keep, float("-inf")).argmax(dim=-1)
    return order.gather(1, choice[:, None])[:, 0]


_BOUNDARY = 1e-9  # closer than this to the top-p cut-off, the sorted path decides


def _sample_filtered_by_rejection(scaled: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    """:func:`_sample_filtered` without the sort whenever it can be skipped (the CPU path).

    The noise of a token depends only on its id, so the unfiltered Gumbel-max winner ``c`` is
    also the winner within any set that contains it. Whether the top-k / top-p set contains
    ``c`` needs only the mass and the count of tokens more probable than ``c``: one pass, no
    sort. Rows where ``c`` falls outside the set, ties with ``c``'s probability, or a mass
    within ``_BOUNDARY`` of ``top_p`` (float summation order) go through the sorted path, so the
    result is the same token. Sorting 20k logits costs ~1.5 ms on a CPU core; the check ~0.1 ms.
    It needs one host read, which is free on a CPU (a sync on a GPU, which sorts fast anyway).
    With top-k, the top-p mass is measured within the top-k set (a ``topk`` of k values, not a
    sort), as :func:`_sample_filtered` does.
    """
    vocab = scaled.shape[-1]
    ids = torch.arange(vocab, device=scaled.device)
    choice = (scaled + gumbel_noise(seed, step, ids, vocab)).argmax(dim=-1)  # (B,)
    probs = torch.softmax(scaled, dim=-1)
    p_choice = probs.gather(1, choice[:, None])
    above = probs > p_choice
    mass_above = torch.where(above, probs, 0.0).sum(dim=-1)
    k_max = int(top_k.max())
    if k_max > 0:  # renormalise to the top-k set: divide by its total mass
        top = probs.topk(min(k_max, vocab), dim=-1).values
        ranks = torch.arange(top.shape[1], device=scaled.device)
        mass_k = torch.where(ranks[None, :] < top_k[:, None], top, 0.0).sum(dim=-1)
        mass_above = torch.where(top_k > 0, mass_above / mass_k, mass_above)
    ties = (probs == p_choice).sum(dim=-1) > 1
    inside = (mass_above < top_p.double() - _BOUNDARY) & ((top_k <= 0) | (above.sum(dim=-1) < top_k))
    redo = (~inside | ties).nonzero()[:, 0].tolist()
    if redo:
        rows = torch.tensor(redo, device=scaled.device)
        choice[rows] = _sample_filtered(scaled[rows], top_k[rows], top_p[rows], seed[rows], step[rows])
    return choice


@dataclass(frozen=True)
class StepLogprobs:
    """One row's step: the chosen token's log-probability and the ``k`` most probable tokens as
    ``(id, logprob)``, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Under the model's own distribution, ``log_softmax(logits)`` in float32: the log-probability
    of each row's ``tokens`` (B,), and the ``k`` largest log-probabilities (B, k) with their ids
    (B, k), sorted best first.

    Temperature, top-k and top-p shape which token is drawn, not what is reported: the raw
    distribution is what vLLM v1 reports by default, and the only one that stays meaningful for a
    greedy turn (after temperature 0 every token but one would have ``-inf``).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.clamp_min(0)[:, None])[:, 0]
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return chosen, top.values, top.indices


class BatchSampler:
    """Per-row sampling settings of a decode batch, kept on the device between steps."""

    def __init__(self, rows: int, device: torch.device | str | None = None) -> None:
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.presence = torch.zeros(rows, device=device)
        self.frequency = torch.zeros(rows, device=device)
        self.counts: Tensor | None = None
        """(rows, vocab) occurrences of each token in each row's answer so far: made on the first
        step of a penalised row, so batches without penalties never hold it."""
        self._filtered = [False] * rows
        self._greedy = [False] * rows
        self._penalised = [False] * rows

    def set_row(self, row: int, params: SamplingParams, seed: int) -> None:
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seed[row] = seed
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        if self.counts is not None:
            self.counts[row] = 0
        self._filtered[row] = params.filtered
        self._greedy[row] = params.greedy
        self._penalised[row] = params.penalised

    def copy_row(self, src: int, dst: int) -> None:
        for t in (self.temperature, self.top_k, self.top_p, self.seed, self.presence, self.frequency):
            t[dst] = t[src]
        if self.counts is not None:
            self.counts[dst] = self.counts[src]
        self._filtered[dst] = self._filtered[src]
        self._greedy[dst] = self._greedy[src]
        self._penalised[dst] = self._penalised[src]

    def sample_rows(self, logits: Tensor, step: Tensor, start: int, stop: int) -> Tensor:
        """Sample rows ``start:stop``; ``logits`` and ``step`` (each row's token counter) cover just
        those rows. Penalised rows see their logits lowered by what their answer already holds,
        and count the token they draw."""
        penalised = any(self._penalised[start:stop])
        if penalised:
            if self.counts is None or self.counts.shape[1] != logits.shape[-1]:
                self.counts = torch.zeros(len(self.temperature), logits.shape[-1], device=logits.device)
            counts = self.counts[start:stop]
            logits = (
                logits
                - self.frequency[start:stop, None] * counts
                - self.presence[start:stop, None] * (counts > 0).to(counts.dtype)
            )
        tokens = sample(
            logits,
            self.temperature[start:stop],
            self.top_k[start:stop],
            self.top_p[start:stop],
            self.seed[start:stop],
            step,
            filtered=any(self._filtered[start:stop]),
            greedy=all(self._greedy[start:stop]),
        )
        if penalised:
            assert self.counts is not None
            drawn = tokens.clamp_min(0)[:, None]
            self.counts[start:stop].scatter_add_(1, drawn, (tokens >= 0).to(self.counts.dtype)[:, None])
        return tokens
