"""Token generation on the model: a decode batch that conversations join and leave between steps.

:class:`DecodeBatch` is the model-side half of continuous batching. Each active conversation owns
one row: its self-attention KV cache, its memory cross-attention keys/values (computed from its
STM once, when it joins), its position and its sampler settings. Active rows are kept contiguous
(rows ``0 .. n-1``): a leaving row is replaced by the last one, so a step always runs on a prefix
of the buffers. The big buffers (KV cache, memory keys/values: about 12 MiB a row at alpha-mini)
hold only as many rows as are active, rounded up to a power of two: they double when a join
needs more and halve when three quarters stand empty, so an engine sized for 256 conversations
costs memory for the ones it serves. The KV cache's length follows the same rule along the
positions: it starts at ``INITIAL_LEN`` and doubles when a row reaches its end, up to the
model's ``max_seq_len`` (RxT-Beta's 8,192 positions of float32 cache are 210 MB a row; a turn of
a few hundred tokens needs 1/16 of that), and a step attends over the length held, not the
largest one possible. The runtime's engine drives it; :func:`generate` is the plain loop for
scripts, tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import KVCache
from .rxt import RxTModel
from .sampler import BatchSampler, SamplingParams, StepLogprobs, token_logprobs


@dataclass
class JoinRequest:
    """One conversation entering the batch: its prompt ids and its STM (L, S, D).

    ``logprobs``: report each sampled token's log-probability and this many alternatives
    (0: the chosen token's alone); None reports nothing and costs nothing. ``memory_kv``: the
    memory cross-attention keys/values of ``stm`` (per memory layer, ``(kv_heads, slots,
    head_dim)`` each), when they were computed ahead (the engine's memory update makes them
    with the STM, off the next turn's critical path); None computes them here."""

    key: Hashable
    prompt: Sequence[int]
    stm: Tensor
    params: SamplingParams
    seed: int
    logprobs: int | None = None
    memory_kv: Sequence[tuple[Tensor, Tensor]] | None = None


class DecodeBatch:
    """Fixed-capacity decode state for up to ``capacity`` conversations (see the module docstring).

    ``decode_layout`` (default on) calls :meth:`RxTModel.use_decode_layout` once, which makes
    the one-token steps about twice as fast on a CPU without changing any value.
    """

    INITIAL_LEN = 256
    """Positions the KV cache holds at first (it doubles as rows advance, up to ``max_len``)."""

    def __init__(
        self, model: RxTModel, capacity: int, max_len: int | None = None, *, decode_layout: bool = True
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.max_len = max_len or model.config.max_seq_len
        if decode_layout:
            model.use_decode_layout()
        device = model.device
        self.cache, self.memory_kv = self._buffers(min(capacity, 1), self._length_for(1))
        self.sampler = BatchSampler(capacity, device=device)
        self.next_position = torch.zeros(capacity, dtype=torch.long, device=device)
        self.next_token = torch.zeros(capacity, dtype=torch.long, device=device)
        self.counter = torch.zeros(capacity, dtype=torch.long, device=device)
        self.keys: list[Hashable] = []
        # Rows of the last join/step that produced no token (-1): their sampler raised (the error
        # is kept here) or their logits were not finite. The caller leaves them; others go on.
        self.failed: dict[Hashable, BaseException] = {}
        # Log-probabilities of the last join/step's tokens, for the rows that asked (JoinRequest.logprobs).
        self.logprobs: dict[Hashable, StepLogprobs] = {}
        self._asks: list[int | None] = [None] * capacity  # per row: JoinRequest.logprobs
        # Host copy of next_position: the end-of-cache check needs no device read (a GPU sync).
        self._host_position = [0] * capacity
        # Views of rows 0..n-1, made once per n: the buffers never move.
        self._step_views: dict[int, tuple[list[tuple[Tensor, Tensor]], KVCache]] = {}

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def allocated_rows(self) -> int:
        """Rows the KV cache and memory keys/values hold now (``size`` <= this <= ``capacity``)."""
        return self.cache.rows

    def _buffers(self, rows: int, length: int) -> tuple[KVCache, list[tuple[Tensor, Tensor]]]:
        """Zeroed KV cache (``length`` positions) and memory keys/values for ``rows`` rows:
        ordinary tensors even when a join (in inference mode) grows them, so that :meth:`leave`
        may write to them anywhere."""
        model, cfg = self.model, self.model.config
        d = cfg.decoder
        kv_shape = (rows, d.cross_kv_heads, cfg.stm_size, cfg.dim // d.num_heads)
        with torch.inference_mode(False):
            memory_kv = [
                (
                    torch.zeros(kv_shape, device=model.device, dtype=model.dtype),
                    torch.zeros(kv_shape, device=model.device, dtype=model.dtype),
                )
                for _ in range(cfg.num_layers)
            ]
            return model.new_cache(rows, length), memory_kv

    def _length_for(self, positions: int) -> int:
        """The cache length that holds ``positions`` positions: a power of two from
        ``INITIAL_LEN`` on, at most ``max_len``."""
        length = min(self.INITIAL_LEN, self.max_len)
        while length < positions:
            length *= 2
        return min(length, self.max_len)

    def _resize(self, rows: int) -> None:
        """Move the active rows into buffers of ``rows`` rows (the old ones are freed)."""
        cache, memory_kv = self._buffers(rows, self.cache.max_len)
        n = self.size
        cache.k[:, :n] = self.cache.k[:, :n]
        cache.v[:, :n] = self.cache.v[:, :n]
        for (k, v), (old_k, old_v) in zip(memory_kv, self.memory_kv):
            k[:n] = old_k[:n]
            v[:n] = old_v[:n]
        self.cache, self.memory_kv = cache, memory_kv
        self._step_views = {}

    def _relength(self, length: int) -> None:
        """Move the active rows' keys/values into a cache of ``length`` positions (the memory
        keys/values stay where they are)."""
        if length == self.cache.max_len:
            return
        with torch.inference_mode(False):
            cache = self.model.new_cache(self.allocated_rows, length)
        n, held = self.size, min(length, self.cache.max_len)
        cache.k[:, :n, :, :held] = self.cache.k[:, :n, :, :held]
        cache.v[:, :n, :, :held] = self.cache.v[:, :n, :, :held]
        self.cache = cache
        self._step_views = {}

    def row_of(self, key: Hashable) -> int:
        return self.keys.index(key)

    @torch.inference_mode()
    def join(self, requests: Sequence[JoinRequest]) -> Tensor:
        """Prefill the new rows (one batched forward) and sample each one's first token."""
        if not requests:
            return torch.empty(0, dtype=torch.long, device=self.model.device)
        if self.size + len(requests) > self.capacity:
            raise RuntimeError(f"decode batch is full ({self.size}/{self.capacity} rows)")
        for r in requests:
            if not 0 < len(r.prompt) < self.max_len:
                raise ValueError(f"prompt of {len(r.prompt)} tokens does not fit a {self.max_len}-token cache")
        start, stop = self.size, self.size + len(requests)
        if stop > self.allocated_rows:
            rows = self.allocated_rows
            while rows < stop:
                rows *= 2
            self._resize(min(rows, self.capacity))
        longest = max(len(r.prompt) for r in requests)
        if longest + 1 > self.cache.max_len:  # the prompt, and the first step's token after it
            self._relength(self._length_for(longest + 1))
        device = self.model.device
        lengths = torch.tensor([len(r.prompt) for r in requests], device=device)
        ids = torch.full((len(requests), int(lengths.max())), self.model.config.special_tokens.pad_id, device=device)
        for i, r in enumerate(requests):
            ids[i, : len(r.prompt)] = torch.as_tensor(list(r.prompt), device=device)
        computed = [i for i, r in enumerate(requests) if r.memory_kv is None]
        if computed:  # one batched projection per memory layer for the rows that bring none
            targets = torch.tensor([start + i for i in computed], device=device)
            stms = [requests[i].stm for i in computed]
            for m, (k, v) in enumerate(self.memory_kv):
                # this layer of each STM only: 1/L of a stack of whole STMs (which, for a burst of
                # 64 alpha-mini conversations, was 200 MB to allocate and copy before any product)
                layer = torch.stack([stm[m] for stm in stms]).to(device, self.model.dtype)
                k_new, v_new = self.model.layer_memory_kv(m, layer)
                k.index_copy_(0, targets, k_new)
                v.index_copy_(0, targets, v_new)
        for i, r in enumerate(requests):
            if r.memory_kv is not None:
                for (k, v), (k_given, v_given) in zip(self.memory_kv, r.memory_kv, strict=True):
                    k[start + i] = k_given
                    v[start + i] = v_given
        logits = self.model.prefill(ids, lengths, self._memory_kv(start, stop), self.cache.view(start, stop))
        for i, r in enumerate(requests):
            self.sampler.set_row(start + i, r.params, r.seed)
            self._asks[start + i] = r.logprobs
        self.counter[start:stop] = 0
        self.failed = {}
        keys = [r.key for r in requests]
        first = self._sample(logits, self.counter[start:stop], start, stop, keys)
        self.logprobs = self._logprobs(logits, first, start, stop, keys)
        self.next_token[start:stop] = first
        self.next_position[start:stop] = lengths
        self.counter[start:stop] = 1
        self.keys.extend(r.key for r in requests)
        for i, r in enumerate(requests):
            self._host_position[start + i] = len(r.prompt)
        return first

    @torch.inference_mode()
    def step(self) -> Tensor:
        """Feed every row its last token; returns the next token of rows ``0 .. size-1``."""
        n = self.size
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=self.model.device)
        furthest = max(self._host_position[:n])
        if furthest >= self.max_len:
            raise RuntimeError("a row ran past the end of its cache; leave() it before that")
        if furthest >= self.cache.max_len:
            self._relength(self._length_for(furthest + 1))
        views = self._step_views.get(n)
        if views is None:
            views = self._step_views[n] = (self._memory_kv(0, n), self.cache.view(0, n))
        positions, counter = self.next_position[:n], self.counter[:n]
        logits = self.model.decode_step(self.next_token[:n], positions, views[0], views[1])
        self.failed = {}
        tokens = self._sample(logits, counter, 0, n, self.keys)
        self.logprobs = self._logprobs(logits, tokens, 0, n, self.keys)
        self.next_token[:n] = tokens
        positions += 1
        counter += 1
        for row in range(n):
            self._host_position[row] += 1
        return tokens

    def _sample(self, logits: Tensor, counter: Tensor, start: int, stop: int, keys: Sequence[Hashable]) -> Tensor:
        """Sample rows ``start:stop``; a row whose sampler raises, or whose logits are not finite
        (e.g. a NaN memory), gets token -1 instead of failing the whole batch."""
        try:
            tokens = self.sampler.sample_rows(logits, counter, start, stop)
        except Exception:
            tokens = torch.empty(stop - start, dtype=torch.long, device=logits.device)
            for i in range(stop - start):
                try:
                    tokens[i : i + 1] = self.sampler.sample_rows(
                        logits[i : i + 1], counter[i : i + 1], start + i, start + i + 1
                    )
                except Exception as exc:
                    tokens[i] = -1
                    self.failed[keys[i]] = exc
        # A row is finite iff its sum is (a NaN or an infinity carries into the sum; finite logits
        # would need magnitudes near 1e34 to overflow it): one pass, 7x cheaper than isfinite().all().
        return torch.where(torch.isfinite(logits.sum(dim=-1)), tokens, -1)

    def _logprobs(
        self, logits: Tensor, tokens: Tensor, start: int, stop: int, keys: Sequence[Hashable]
    ) -> dict[Hashable, StepLogprobs]:
        """Log-probabilities for the rows ``start:stop`` that asked for them: only those rows'
        logits go through ``log_softmax``, so a batch where no row asks pays nothing."""
        asks = self._asks[start:stop]
        rows = [i for i, k in enumerate(asks) if k is not None]
        if not rows:
            return {}
        k = max(int(asks[i] or 0) for i in rows)
        if len(rows) < stop - start:
            index = torch.tensor(rows, device=logits.device)
            logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
        chosen, values, ids = token_logprobs(logits, tokens, k)
        chosen_l, values_l, ids_l, tokens_l = chosen.tolist(), values.tolist(), ids.tolist(), tokens.tolist()
        out: dict[Hashable, StepLogprobs] = {}
        for j, i in enumerate(rows):
            if tokens_l[j] < 0:  # this row failed: no token, nothing to report
                continue
            n = int(asks[i] or 0)
            out[keys[i]] = StepLogprobs(chosen_l[j], tuple(zip(ids_l[j][:n], values_l[j][:n])))
        return out

    def leave(self, key: Hashable) -> None:
        """Free a row; the last row moves into it so active rows stay contiguous."""
        row = self.keys.index(key)
        last = self.size - 1
        if row != last:
            self.cache.copy_row(last, row)
            for k, v in self.memory_kv:
                k[row] = k[last]
                v[row] = v[last]
            self.sampler.copy_row(last, row)
            self._asks[row] = self._asks[last]
            for t in (self.next_position, self.next_token, self.counter):
                t[row] = t[last]
            self.keys[row] = self.keys[last]
            self._host_position[row] = self._host_position[last]
        self.keys.pop()
        if self.allocated_rows > 1 and 4 * self.size <= self.allocated_rows:
            self._resize(self.allocated_rows // 2)
        needed = self._length_for(max(self._host_position[: self.size], default=0) + 1)
        if 4 * needed <= self.cache.max_len:  # three quarters of the positions unused: halve
            self._relength(self.cache.max_len // 2)

    def _memory_kv(self, start: int, stop: int) -> list[tuple[Tensor, Tensor]]:
        return [(k[start:stop], v[start:stop]) for k, v in self.memory_kv]


GREEDY = SamplingParams(temperature=0.0)


def generate(
    model: RxTModel,
    stm: Tensor,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = GREEDY,
    max_new_tokens: int | None = None,
) -> list[list[int]]:
    """Answer token ids for a batch of prompts, conversation ``b`` reading ``stm[b]``.

    Stops a row at ``[EOS]`` (not included) or when the interaction would no longer fit
    ``max_seq_len`` with its closing ``[EOS]``.
    """
    cfg = model.config
    plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    batch = DecodeBatch(model, len(prompts))
    seeds = [p.resolved_seed() for p in plist]
    first = batch.join(
        [JoinRequest(i, prompt, stm[i], plist[i], seeds[i]) for i, prompt in enumerate(prompts)]
    ).tolist()
    outputs: list[list[int]] = [[] for _ in prompts]
    limits = [cfg.max_seq_len - len(p) - 1 for p in prompts]
    if max_new_tokens is not None:
        limits = [min(lim, max_new_tokens) for lim in limits]
    active = list(range(len(prompts)))
    pending = dict(zip(active, first))
    while pending:
        for key, token in list(pending.items()):
            if token < 0:
                raise RuntimeError(f"prompt {key}: {batch.failed.get(key, 'the logits are not finite')}")
            if token == cfg.special_tokens.eos_id or len(outputs[key]) >= limits[key]:
                batch.leave(key)
                del pending[key]
            else:
                outputs[key].append(token)
                if len(outputs[key]) >= limits[key]:
                    batch.leave(key)
                    del pending[key]
        if not pending:
            break
        tokens = batch.step().tolist()
        pending = {key: tokens[batch.row_of(key)] for key in pending}
    return outputs
