"""Generated tokens per second through ``DecodeBatch.step`` (``decode_step`` + the sampler).

This is the number the CPU fast path is judged by: one conversation (or a few), a prompt of a
typical query's length, then ``steps`` timed steps, each read back on the host as a streaming
user would. Medians over repeats, because the machines this runs on are shared.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rxruntime.models import ConfigError, DecodeBatch, JoinRequest, RxTModel, SamplingParams


@dataclass
class DecodeResult:
    """Tokens per second of each repeat and their median (all rows of the batch counted)."""

    tokens_per_s: float
    best_tokens_per_s: float
    """The fastest run: on a shared machine, the closest to the unloaded speed."""
    runs: list[float]
    batch_size: int
    steps: int
    load_average: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(
    model: RxTModel,
    *,
    steps: int = 64,
    repeats: int = 5,
    batch_size: int = 1,
    prompt_len: int = 34,
    params: SamplingParams | None = None,
    seed: int = 0,
    batch: DecodeBatch | None = None,
) -> DecodeResult:
    """Median generated tokens/s over ``repeats`` runs of ``steps`` decode steps.

    Each run joins ``batch_size`` fresh conversations (prompt of ``prompt_len`` random ids, a
    random STM), takes one untimed step, then times ``steps`` steps including the host read of
    every step's tokens. Pass ``batch`` to reuse a decode batch (and its layout choice).
    """
    cfg = model.config
    if prompt_len + steps + 2 > cfg.max_seq_len:
        raise ConfigError(f"prompt_len + steps must fit the {cfg.max_seq_len}-token interaction")
    params = params or SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(seed)
    batch = batch or DecodeBatch(model, batch_size)
    device = model.device
    runs = []
    for r in range(repeats):
        stm = model.init_stm(batch_size, gen)
        prompts = [torch.randint(7, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(batch_size)]
        keys = [("bench", r, i) for i in range(batch_size)]
        batch.join([JoinRequest(k, p, stm[i], params, seed + i) for i, (k, p) in enumerate(zip(keys, prompts))])
        batch.step().tolist()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            batch.step().tolist()
        runs.append(steps * batch_size / (time.perf_counter() - start))
        for k in keys:
            batch.leave(k)
    return DecodeResult(
        tokens_per_s=statistics.median(runs),
        best_tokens_per_s=max(runs),
        runs=runs,
        batch_size=batch_size,
        steps=steps,
        load_average=list(os.getloadavg()),
    )


def c_step_note(model: RxTModel) -> str:
    """Whether decode steps ran the C step of ``models/native.py``, for the JSON's config."""
    from rxruntime.models import native

    reason = native.not_used_reason(model)
    return f"used for steps of up to {native.MAX_ROWS} rows" if reason is None else f"not used: {reason}"
