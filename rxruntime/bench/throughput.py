"""Many conversations on one engine: aggregate tokens/s and what each user feels, by concurrency.

Continuous batching decodes every active conversation in one step, so the aggregate token rate
should grow with the number of conversations until the step becomes compute-bound, while each
user's per-token latency grows with the batch. This benchmark shows both through the real
:class:`~rxruntime.engine.Engine` and its event stream.

For each concurrency ``N``: open ``N`` conversations, send one query to each in a tight loop (the
first and last send are ``send_spread_s`` apart; each conversation's TTFT counts from its own
send) inside ``Engine.together()``, so they join in one prefill as a batch call's would
(``apart``: as independent clients, each admitted as it arrives), collect every event on the
conversations' mailboxes, and wait for every memory update before closing the conversations, so
one level never overlaps the next. Answers are forced to
``answer_tokens`` tokens (random weights, ``[EOS]`` unreachable, greedy). Per level:

* ``tokens_per_s``: all generated tokens / ``wall_s``, first send -> last ``AnswerCompleted``;
* ``token_latency_p50_s`` / ``_p95_s``: gaps between consecutive ``Token`` events of one
  conversation, pooled over all conversations (what a streaming user sees between words);
* ``ttft_p50_s`` / ``_p95_s``: send -> first ``Token`` event;
* ``memory_update_p50_s``: ``MemoryUpdated.duration_s``; the memory thread batches the updates
  that are queued together, so at high concurrency one duration covers many conversations;
* ``compute_fraction``: ``tokens_per_s`` over the machine's compute limit for this work
  (:func:`compute_limit`): the best rate one large matrix product of the arithmetic the weights
  call for (int8 for int8 weights, else the model's dtype) reaches on this device, divided by
  the FLOPs of one generated token (:func:`decode_flops_per_token`). ``compute_fraction_fp32``
  measures against the float32 rate.

Decode rows are preallocated (self-attention KV cache of ``max_seq_len`` plus memory
cross-attention K/V per row), so ``max_batch`` defaults to the largest ``N`` but is capped to what
half of the free memory holds; a level with more conversations than rows queues the rest
(``limited`` in its result) and is then no longer a single batch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import torch

from rxruntime.engine import Engine
from rxruntime.models import ConfigError, RxTConfig, RxTModel, preset

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
    compute_limit: bool = True
    """Measure the machine's matrix-product rate (about a second) and report each level's share of it."""
    weights: str = DEFAULT_WEIGHTS
    """The model's weight format (``models/quantize.py``); ``default``: the engine's own for the
    device, what ``rxruntime.load`` gives (int8 where the C step runs a float32 CPU model)."""
    dtype: str = DEFAULT_WEIGHTS
    """What the model computes in (:func:`~rxruntime.bench.decode.resolve_dtype`): ``default``
    is the engine's own (bfloat16 on CUDA, float32 on the CPU); float16 and bfloat16 are CUDA's."""
    apart: bool = False
    """Send a level's queries as independent clients (no ``Engine.together()``): the first to
    arrive join before the rest, in more prefills."""


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


# ---------------------------------------------------------------------- the compute limit
PEAK_SHAPE = (512, 1024, 1024)
"""(m, k, n) of the product :func:`peak_matmul_flops` times: large enough for any GEMM to reach its peak."""


def peak_matmul_flops(kind: str, device: torch.device, seconds: float = 0.5) -> float:
    """The best FLOP/s one (m, k) x (k, n) matrix product reaches on ``device`` with the threads
    torch has now: ``kind`` float32, bfloat16, float16, or int8 (``torch._int_mm``, int32
    accumulation: what VNNI / AMX / tensor cores run). The best of repeats over ``seconds``, so
    a shared machine's other tenants lower it least."""
    m, k, n = PEAK_SHAPE
    gen = torch.Generator().manual_seed(0)
    if kind == "int8":
        a = torch.randint(-64, 64, (m, k), dtype=torch.int8, generator=gen).to(device)
        b = torch.randint(-64, 64, (k, n), dtype=torch.int8, generator=gen).to(device)

        def product() -> object:
            return torch._int_mm(a, b)
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[kind]
        a = torch.randn(m, k, generator=gen).to(device, dtype)
        b = torch.randn(k, n, generator=gen).to(device, dtype)

        def product() -> object:
            return torch.mm(a, b)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    product()
    sync()
    best, runs, deadline = 0.0, 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        product()
        sync()
        best = max(best, 2 * m * k * n / (time.perf_counter() - start))
        runs += 1
    return best


def decode_flops_per_token(model: RxTModel, context: float) -> float:
    """FLOPs of one generated token: 2 per active decoder parameter (projections, router, the
    chosen experts, LM head) plus attention: self-attention over ``context`` earlier tokens and
    memory cross-attention over the STM slots, scores and weighted sum (2 x 2 x heads x head_dim
    each), in every layer. The standard estimate; the memory K/V (computed once per turn) and
    the elementwise work are left out."""
    cfg = model.config
    d = cfg.decoder
    head_dim = cfg.dim // d.num_heads
    attention = 4 * head_dim * (d.self_q_heads * context + d.cross_q_heads * cfg.stm_size) * cfg.num_layers
    return 2.0 * model.active_parameter_count() + attention


def arithmetic_of(model: RxTModel) -> str:
    """The arithmetic a model's decode calls for: int8 for int8 weights, else its dtype's."""
    if model.weight_format == "int8":
        return "int8"
    return str(model.dtype).removeprefix("torch.")


def compute_limit(model: RxTModel, context: float) -> dict[str, Any]:
    """The machine's limit for decoding ``model``: peak matrix-product rates (the arithmetic its
    weights call for, and float32) and the tokens/s they allow at ``context`` tokens of context."""
    kind = arithmetic_of(model)
    peaks = {name: peak_matmul_flops(name, model.device) for name in dict.fromkeys((kind, "float32"))}
    flops = decode_flops_per_token(model, context)
    return {
        "arithmetic": kind,
        "peak_flops": peaks,
        "peak_shape_mkn": list(PEAK_SHAPE),
        "flops_per_token": flops,
        "context_tokens": context,
        "limit_tokens_per_s": peaks[kind] / flops,
        "limit_tokens_per_s_fp32": peaks["float32"] / flops,
    }


# ---------------------------------------------------------------------- one concurrency level
def run_level(
    engine: Engine,
    queries: Sequence[Sequence[int]],
    answer_tokens: int,
    seed: int,
    tag: str,
    *,
    together: bool = True,
) -> list[TurnTrace]:
    """One query on each of ``len(queries)`` new conversations, sent at once; their traces once
    every answer and every memory update is in. The conversations are closed on the way out.

    ``together``: the sends go in one ``Engine.together()`` block, so the burst joins in one
    prefill, as a batch API's would be (``batch_interact`` gets its queries in one call); False
    sends them one after another as independent clients would, and the engine admits whichever
    have arrived at each step (the first join then holds the first few)."""
    convs = [engine.conversation(f"{tag}-{i}", seed=seed + i) for i in range(len(queries))]
    traces: list[TurnTrace] = []
    try:
        with engine.together() if together else contextlib.nullcontext():
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
            traces = run_level(engine, queries, cfg.answer_tokens, cfg.seed, f"n{n}", together=not cfg.apart)
            results.append(summarize(traces, max_batch))
            if progress:
                r = results[-1]
                progress(
                    f"{n} conversations: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50_s']:.3f}s, "
                    f"wall {r['wall_s']:.2f}s"
                )
        load_end = os.getloadavg()
    limit = None
    if cfg.compute_limit:  # after the levels: the engine's threads are gone
        limit = compute_limit(model, cfg.query_tokens + 3 + cfg.answer_tokens / 2)
        for r in results:
            r["compute_fraction"] = r["tokens_per_s"] / limit["limit_tokens_per_s"]
            r["compute_fraction_fp32"] = r["tokens_per_s"] / limit["limit_tokens_per_s_fp32"]
    return {
        "results": results,
        "compute_limit": limit,
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
    columns = ["convs", "tokens/s", "token gap p50 ms", "p95 ms", "TTFT p50 s", "p95 s", "wall s", "memory p50 s"]
    limit = result.get("compute_limit")
    if limit:
        columns.append(f"of {limit['arithmetic']} limit")
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
            *([f"{100 * r['compute_fraction']:.1f}%"] if limit else []),
        )
    return table


def describe_limit(result: dict[str, Any]) -> str:
    """The compute limit in one line (empty when it was not measured)."""
    limit = result.get("compute_limit")
    if not limit:
        return ""
    peaks = ", ".join(f"{name} {flops / 1e9:.0f} GFLOP/s" for name, flops in limit["peak_flops"].items())
    return (
        f"compute limit: {limit['limit_tokens_per_s']:.0f} tokens/s ({limit['arithmetic']} matrix products; peak "
        f"{peaks} on {limit['peak_shape_mkn']}, {limit['flops_per_token'] / 1e6:.1f} MFLOP per token)"
    )
