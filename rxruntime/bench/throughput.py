"""Many conversations on one engine: aggregate tokens/s and what each user feels, by concurrency.

Continuous batching decodes every active conversation in one step, so the aggregate token rate
should grow with the number of conversations until the step becomes compute-bound, while each
user's per-token latency grows with the batch. This benchmark shows both through the real
:class:`~rxruntime.engine.Engine` and its event stream.

For each concurrency ``N``: open ``N`` conversations, send one query to each in a tight loop (the
first and last send are ``send_spread_s`` apart; each conversation's TTFT counts from its own
send), collect every event on the conversations' mailboxes, and wait for every memory update
before closing the conversations, so one level never overlaps the next. Answers are forced to
``answer_tokens`` tokens (random weights, ``[EOS]`` unreachable, greedy). Per level:

* ``tokens_per_s``: all generated tokens / ``wall_s``, first send -> last ``AnswerCompleted``;
* ``token_latency_p50_s`` / ``_p95_s``: gaps between consecutive ``Token`` events of one
  conversation, pooled over all conversations (what a streaming user sees between words);
* ``ttft_p50_s`` / ``_p95_s``: send -> first ``Token`` event;
* ``memory_update_p50_s``: ``MemoryUpdated.duration_s``; the memory thread batches the updates
  that are queued together, so at high concurrency one duration covers many conversations.

Decode rows are preallocated (self-attention KV cache of ``max_seq_len`` plus memory
cross-attention K/V per row), so ``max_batch`` defaults to the largest ``N`` but is capped to what
half of the free memory holds; a level with more conversations than rows queues the rest
(``limited`` in its result) and is then no longer a single batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import torch

from rxruntime.engine import Engine
from rxruntime.models import ConfigError, RxTConfig, preset

from .decode import DEFAULT_WEIGHTS, apply_weights, resolve_dtype
from .overlap import (
    TurnTrace,
    check_fits,
    environment,
    forced_length_model,
    random_queries,
    send,
    wait,
    weights_caption,
    word_tokenizer,
)


@dataclass
class ThroughputConfig:
    """What to run; every field lands in the JSON's ``config``."""

    preset: str = "alpha-mini"
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 64, 256])
    query_tokens: int = 32
    answer_tokens: int = 32
    device: str = "cpu"
    seed: int = 0
    max_batch: int | None = None
    """Decode rows of the engine; None: the largest concurrency, capped by memory."""
    warmup: bool = True
    """Run one small untimed round first (first-call allocations, thread pools)."""
    weights: str = DEFAULT_WEIGHTS
    """The model's weight format (``models/quantize.py``); ``default``: the engine's own for the
    device, what ``rxruntime.load`` gives (int8 where the C step runs a float32 CPU model)."""
    dtype: str = DEFAULT_WEIGHTS
    """What the model computes in (:func:`~rxruntime.bench.decode.resolve_dtype`): ``default``
    is the engine's own (bfloat16 on CUDA, float32 on the CPU); float16 and bfloat16 are CUDA's."""


# ---------------------------------------------------------------------- how many rows fit
def decode_row_bytes(config: RxTConfig, dtype: torch.dtype) -> int:
    """Memory one conversation takes in the engine: its decode row (self-attention KV cache of
    ``max_seq_len`` tokens, memory cross-attention K/V of ``stm_size`` slots) and two STMs (the
    committed one and the one its memory update writes)."""
    d = config.decoder
    head_dim = config.dim // d.num_heads
    self_kv = 2 * config.num_layers * d.self_kv_heads * config.max_seq_len * head_dim
    cross_kv = 2 * config.num_layers * d.cross_kv_heads * config.stm_size * head_dim
    stms = 2 * config.num_layers * config.stm_size * config.dim
    return (self_kv + cross_kv + stms) * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no cap
        return None


def choose_max_batch(cfg: ThroughputConfig, row_bytes: int, free: int | None) -> tuple[int, int | None]:
    """(rows, the memory cap on rows or None): an explicit ``max_batch`` is taken as given."""
    cap = None if free is None else max(1, free // 2 // row_bytes)
    if cfg.max_batch is not None:
        return cfg.max_batch, cap
    wanted = max(cfg.concurrency)
    return (wanted if cap is None else min(wanted, cap)), cap


# ---------------------------------------------------------------------- one concurrency level
def run_level(
    engine: Engine, queries: Sequence[Sequence[int]], answer_tokens: int, seed: int, tag: str
) -> list[TurnTrace]:
    """One query on each of ``len(queries)`` new conversations, sent together; their traces once
    every answer and every memory update is in. The conversations are closed on the way out."""
    convs = [engine.conversation(f"{tag}-{i}", seed=seed + i) for i in range(len(queries))]
    traces: list[TurnTrace] = []
    try:
        for conv, query in zip(convs, queries):
            traces.append(send(conv, query, answer_tokens))
        for trace in traces:
            wait(trace, trace.done, answer_tokens)
    finally:
        for trace in traces:
            trace.dispose()
        for conv in convs:
            conv.close()
    return traces


def summarize(traces: Sequence[TurnTrace], max_batch: int) -> dict[str, Any]:
    """The per-level figures of the module docstring, from the host-side traces."""
    start = min(t.send for t in traces)
    end = max(t.answered_at or start for t in traces)
    gaps = [b - a for t in traces for a, b in pairwise(t.token_times)]
    ttfts = [(t.first_token or t.send) - t.send for t in traces]
    updates = [t.memory_update_s or 0.0 for t in traces]
    tokens = sum(t.tokens for t in traces)
    wall = end - start
    return {
        "conversations": len(traces),
        "max_batch": max_batch,
        "limited": len(traces) > max_batch,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "token_latency_p50_s": percentile(gaps, 50),
        "token_latency_p95_s": percentile(gaps, 95),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "wall_s": wall,
        "send_spread_s": max(t.send for t in traces) - start,
        "memory_update_p50_s": percentile(updates, 50),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_throughput(cfg: ThroughputConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every concurrency level of ``cfg`` in turn, on one engine."""
    config = preset(cfg.preset)
    check_fits(config, cfg.preset, cfg.query_tokens, cfg.answer_tokens)
    if not cfg.concurrency or min(cfg.concurrency) < 1:
        raise ConfigError("concurrency levels must be positive integers")
    if cfg.max_batch is not None and cfg.max_batch < 1:
        raise ConfigError("--max-batch must be at least 1")
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = forced_length_model(config, device, cfg.seed, dtype)
    fmt = apply_weights(model, cfg.weights)
    row_bytes = decode_row_bytes(config, model.dtype)
    max_batch, cap = choose_max_batch(cfg, row_bytes, free_memory_bytes(device))
    results = []
    with Engine(model, word_tokenizer(config.vocab_size), max_batch=max_batch) as engine:
        if cfg.warmup:
            warm = random_queries(config, 1, cfg.query_tokens, cfg.seed + 1)
            run_level(engine, warm, min(4, cfg.answer_tokens), cfg.seed, "warm-up")
        load_start = os.getloadavg()
        for n in cfg.concurrency:
            queries = random_queries(config, n, cfg.query_tokens, cfg.seed + n)
            traces = run_level(engine, queries, cfg.answer_tokens, cfg.seed, f"n{n}")
            results.append(summarize(traces, max_batch))
            if progress:
                r = results[-1]
                progress(
                    f"{n} conversations: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50_s']:.3f}s, "
                    f"wall {r['wall_s']:.2f}s"
                )
        load_end = os.getloadavg()
    return {
        "results": results,
        "config": {
            **asdict(cfg),
            "max_batch": max_batch,
            "max_batch_requested": cfg.max_batch,
            "max_batch_memory_cap": cap,
            "decode_row_bytes": row_bytes,
            **environment(model),
            "weights": fmt,
            "weights_requested": cfg.weights,
            "dtype_requested": cfg.dtype,
            "load_average_start": list(load_start),
            "load_average_end": list(load_end),
        },
    }


# ---------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> Any:
    """A rich Table: one row per concurrency level."""
    from rich.table import Table

    cfg = result["config"]
    table = Table(
        title=f"preset {cfg['preset']}, {cfg['device']} {cfg['dtype']}, {cfg['threads']} threads, "
        f"max batch {cfg['max_batch']} (query {cfg['query_tokens']}, answer {cfg['answer_tokens']} tokens)",
        caption=weights_caption(cfg),
    )
    columns = ("convs", "tokens/s", "token gap p50 ms", "p95 ms", "TTFT p50 s", "p95 s", "wall s", "memory p50 s")
    for name in columns:
        table.add_column(name, justify="right")

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.1f}"

    for r in result["results"]:
        table.add_row(
            f"{r['conversations']}" + (" (queued)" if r["limited"] else ""),
            f"{r['tokens_per_s']:.1f}",
            ms(r["token_latency_p50_s"]),
            ms(r["token_latency_p95_s"]),
            f"{r['ttft_p50_s']:.3f}",
            f"{r['ttft_p95_s']:.3f}",
            f"{r['wall_s']:.2f}",
            f"{r['memory_update_p50_s']:.3f}",
        )
    return table
