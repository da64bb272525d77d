"""What the asynchronous memory update hides, and what it costs when the user types instantly.

RxT answers from its STM, then rewrites the STM in the background (encoder + memory attention over
the whole interaction). The engine never delays an answer for the update of its own turn, but the
*next* query of the conversation must wait until that update commits: it reads the new STM. So
the update is free when the user takes longer to read and type than the update takes, and is paid
in full, as extra time to first token, when the next query arrives at once.

This benchmark measures both ends through the real :class:`~rxruntime.engine.Engine` and its event
stream (random weights, random token-id queries, answers forced to ``answer_tokens`` tokens), over
the same conversation shape:

* ``immediate``: the next query is sent the moment ``AnswerCompleted`` of the previous turn arrives,
  while its memory update is still running; the engine queues the query until the commit;
* ``after_memory``: the next query is sent only after ``MemoryUpdated`` (a user who reads first).

Per turn, timed on the host as a streaming client sees the events:

* ``ttft_s``: send -> first ``Token`` event (queueing included);
* ``turn_s``: send -> ``AnswerCompleted`` (what the user waits for);
* ``queued_s``: the engine's own figure for how long the query waited before joining the decode
  batch; in ``immediate`` mode this is the wait behind the previous turn's memory update;
* ``memory_update_s``: the update's duration, from ``MemoryUpdated``;
* ``ready_s``: send -> ``MemoryUpdated`` of this turn (the conversation is idle again).

The helpers in the second section (a forced-length random model, a word-level tokenizer, host-side
event traces) are shared with :mod:`rxruntime.bench.throughput`.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any, Literal

import torch
from reactivex import abc

from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.events import AnswerCompleted, Event, InteractionFailed, MemoryUpdated, Token
from rxruntime.models import ConfigError, RxTConfig, RxTModel, RxTokenizer, preset
from rxruntime.models.tokenizer import SPECIAL_TOKENS

from .decode import DEFAULT_WEIGHTS, apply_weights, c_step_note, kernel_label

Mode = Literal["immediate", "after_memory"]
MODES: tuple[Mode, ...] = ("immediate", "after_memory")

WAIT_S = 600.0
"""The longest any single wait for an event may take before the benchmark gives up (no hang)."""


@dataclass
class OverlapConfig:
    """What to run; every field lands in the JSON's ``config``."""

    preset: str = "alpha-mini"
    turns: int = 10
    query_tokens: int = 32
    answer_tokens: int = 64
    device: str = "cpu"
    seed: int = 0
    weights: str = DEFAULT_WEIGHTS
    """The model's weight format; ``default``: the engine's own for the device, what
    ``rxruntime.load`` gives (int8 where the C step runs a float32 CPU model), as ``turns``,
    ``decode`` and ``throughput`` default to."""


@dataclass
class OverlapRecord:
    """Timings of one turn, in seconds (see the module docstring for each field)."""

    turn: int
    ttft_s: float
    turn_s: float
    queued_s: float
    memory_update_s: float
    ready_s: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- shared with throughput
def forced_length_model(
    config: RxTConfig, device: str | torch.device, seed: int, dtype: torch.dtype = torch.float32
) -> RxTModel:
    """A random-weight model whose greedy answers never end on ``[EOS]``.

    The ``[EOS]`` row of the LM head becomes half of another row, so its logit is half of that
    token's: it can only be the maximum if every logit is negative, which random weights over a
    whole vocabulary never give. Answers then run to ``max_new_tokens`` and every mode or
    concurrency level decodes the same number of tokens.
    """
    torch.manual_seed(seed)
    model = RxTModel(config)
    with torch.no_grad():
        head = model.decoder.lm_head.weight
        head[config.special_tokens.eos_id] = 0.5 * head[len(SPECIAL_TOKENS)]
    return model.to(device, dtype).eval()


def word_tokenizer(vocab_size: int) -> RxTokenizer:
    """A word-level tokenizer covering exactly ``vocab_size`` ids (``t7``, ``t8``, ...).

    The queries are random ids and the model is random, so no real tokenizer is needed; this one
    gives every id a piece of text, for any preset's vocabulary, without training anything.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return RxTokenizer(tok)


def random_queries(config: RxTConfig, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` queries of ``length`` random non-special token ids (reproducible from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    low = len(SPECIAL_TOKENS)
    return [torch.randint(low, config.vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


def check_fits(config: RxTConfig, name: str, query_tokens: int, answer_tokens: int) -> None:
    """``[BOS] [Q] query [A] answer [EOS]`` must fit one interaction."""
    if query_tokens < 1 or answer_tokens < 1:
        raise ConfigError("query and answer need at least one token each")
    if query_tokens + 3 + answer_tokens + 1 > config.max_seq_len:
        raise ConfigError(
            f"a {query_tokens}-token query and a {answer_tokens}-token answer do not fit the "
            f"{config.max_seq_len}-token interaction of preset {name!r}"
        )


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere): the
    machines benchmarks run on differ from one day to the next, so every report names it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(model: RxTModel) -> dict[str, Any]:
    """Where the numbers come from: versions, threads and machine (load averages are added by
    the caller around the timed part)."""
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "sampling": "greedy, [EOS] unreachable (answers run to max_new_tokens)",
        "active_parameters": model.active_parameter_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "c_decode_step": c_step_note(model),
        "weights": model.weight_format,
        "decode_kernel": kernel_label(model),
    }


@dataclass
class TurnTrace:
    """Host-side arrival times of one turn's events.

    The callbacks run on the conversation's mailbox, which delivers one event at a time in order,
    so the fields need no lock; the main thread reads them only after ``done`` (or ``answered``)
    is set, which orders the reads after the writes.
    """

    send: float = 0.0
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    answered_at: float | None = None
    memory_at: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    queued_s: float = 0.0
    memory_update_s: float | None = None
    error: BaseException | None = None
    answered: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    subscription: abc.DisposableBase | None = None

    def on_next(self, event: Event) -> None:
        now = time.perf_counter()
        if isinstance(event, Token):
            if self.first_token is None:
                self.first_token = now
            self.token_times.append(now)
        elif isinstance(event, AnswerCompleted):
            self.answered_at = now
            self.tokens = len(event.token_ids)
            self.finish_reason = event.finish_reason
            self.queued_s = event.queued_s
            self.answered.set()
        elif isinstance(event, MemoryUpdated):
            self.memory_at = now
            self.memory_update_s = event.duration_s
        elif isinstance(event, InteractionFailed):
            self.error = RuntimeError(f"turn {event.turn} failed in {event.stage}: {event.message}")

    def on_error(self, exc: Exception) -> None:
        self.error = self.error or exc
        self.answered.set()
        self.done.set()

    def on_completed(self) -> None:  # the turn's stream completes after MemoryUpdated
        self.answered.set()
        self.done.set()

    def dispose(self) -> None:
        if self.subscription is not None:
            self.subscription.dispose()


def send(conv: Conversation, query: Sequence[int], answer_tokens: int) -> TurnTrace:
    """Send one token-id query (greedy, ``max_new_tokens=answer_tokens``) and trace its events."""
    trace = TurnTrace()
    trace.send = time.perf_counter()
    trace.subscription = conv.interact(query, max_new_tokens=answer_tokens).subscribe(
        trace.on_next, trace.on_error, trace.on_completed
    )
    return trace


def wait(trace: TurnTrace, flag: threading.Event, answer_tokens: int) -> None:
    """Block until ``flag`` is set; raise if the turn failed or its answer was cut short."""
    if not flag.wait(WAIT_S):
        raise TimeoutError(f"no event within {WAIT_S:.0f} s; the engine seems stuck")
    if trace.error is not None:
        raise RuntimeError(f"a benchmark turn failed: {trace.error}") from trace.error
    if trace.answered_at is not None and trace.tokens != answer_tokens:
        raise RuntimeError(
            f"an answer ended after {trace.tokens} of {answer_tokens} tokens ({trace.finish_reason}); "
            "the forced-length trick did not hold"
        )


# ---------------------------------------------------------------------- one conversation per mode
def run_conversation(
    engine: Engine,
    mode: Mode,
    queries: Sequence[Sequence[int]],
    answer_tokens: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[OverlapRecord], float]:
    """One conversation of ``len(queries)`` turns in ``mode``; the per-turn records and the wall
    time from the first send to the last commit."""
    conv = engine.conversation(f"overlap-{mode}", seed=seed)  # both modes start from the same STM
    traces: list[TurnTrace] = []
    try:
        for t, query in enumerate(queries, start=1):
            trace = send(conv, query, answer_tokens)
            traces.append(trace)
            wait(trace, trace.answered if mode == "immediate" else trace.done, answer_tokens)
            if progress:
                answer_s = (trace.answered_at or trace.send) - trace.send
                progress(f"{mode} turn {t}/{len(queries)}: answer in {answer_s:.3f}s")
        for trace in traces:  # immediate mode: the last updates are still running
            wait(trace, trace.done, answer_tokens)
    finally:
        for trace in traces:
            trace.dispose()
        conv.close()
    records = [_record(t, trace) for t, trace in enumerate(traces, start=1)]
    return records, max(tr.memory_at or tr.send for tr in traces) - traces[0].send


def _record(turn: int, trace: TurnTrace) -> OverlapRecord:
    assert trace.first_token is not None and trace.answered_at is not None and trace.memory_at is not None
    return OverlapRecord(
        turn=turn,
        ttft_s=trace.first_token - trace.send,
        turn_s=trace.answered_at - trace.send,
        queued_s=trace.queued_s,
        memory_update_s=trace.memory_update_s or 0.0,
        ready_s=trace.memory_at - trace.send,
        tokens=trace.tokens,
    )


def run_overlap(cfg: OverlapConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Both modes over the same queries on one engine; per-turn records and their medians."""
    config = preset(cfg.preset)
    check_fits(config, cfg.preset, cfg.query_tokens, cfg.answer_tokens)
    if cfg.turns < 1:
        raise ConfigError("--turns must be at least 1")
    model = forced_length_model(config, cfg.device, cfg.seed)
    apply_weights(model, cfg.weights)
    queries = random_queries(config, cfg.turns, cfg.query_tokens, cfg.seed)
    # One conversation decodes at a time, so one decode row is all the engine needs.
    with Engine(model, word_tokenizer(config.vocab_size), max_batch=1) as engine:
        # Warm-up (untimed): first-call allocations of the decode batch and the memory update.
        run_conversation(engine, "after_memory", queries[:1], min(8, cfg.answer_tokens), cfg.seed + 1)
        load_start = os.getloadavg()
        runs: dict[str, tuple[list[OverlapRecord], float]] = {}
        for mode in MODES:
            runs[mode] = run_conversation(engine, mode, queries, cfg.answer_tokens, cfg.seed, progress)
        load_end = os.getloadavg()

    first = 2 if cfg.turns > 1 else 1  # turn 1 has no previous update to wait for in either mode
    medians = {mode: _medians(records[first - 1 :]) for mode, (records, _) in runs.items()}
    imm, aft = medians["immediate"], medians["after_memory"]
    return {
        "immediate": [r.to_dict() for r in runs["immediate"][0]],
        "after_memory": [r.to_dict() for r in runs["after_memory"][0]],
        "summary": {
            "turns_in_medians": f"{first}..{cfg.turns}",
            "immediate": imm,
            "after_memory": aft,
            "ttft_ratio": imm["ttft_s"] / aft["ttft_s"],
            "turn_ratio": imm["turn_s"] / aft["turn_s"],
            # a user who reads before typing never waits for the update ...
            "hidden_memory_s": aft["memory_update_s"],
            # ... one who types at once waits for (about) all of it, before the first token:
            # per turn, the wait over the previous turn's update (1.0 = the whole update)
            "exposed_memory_s": imm["queued_s"],
            "exposed_fraction": _exposed_fraction(runs["immediate"][0]),
            # what a runtime that updated memory before returning each answer would make them wait
            "synchronous_turn_s": aft["turn_s"] + aft["memory_update_s"],
            "conversation_s": {mode: wall for mode, (_, wall) in runs.items()},
        },
        "config": {
            **asdict(cfg),
            **environment(model),
            "weights_requested": cfg.weights,
            "load_average_start": list(load_start),
            "load_average_end": list(load_end),
        },
    }


def _exposed_fraction(records: Sequence[OverlapRecord]) -> float | None:
    """Median over turns 2.. of (queued behind the update) / (the previous turn's update)."""
    ratios = [b.queued_s / a.memory_update_s for a, b in pairwise(records) if a.memory_update_s > 0]
    return statistics.median(ratios) if ratios else None


def _medians(records: Sequence[OverlapRecord]) -> dict[str, float]:
    keys = ("ttft_s", "turn_s", "queued_s", "memory_update_s", "ready_s")
    return {k: statistics.median(getattr(r, k) for r in records) for k in keys}


# ---------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> Any:
    """A rich Table of the per-mode medians side by side, and their ratio."""
    from rich.table import Table

    cfg, s = result["config"], result["summary"]
    table = Table(
        title=f"{cfg['turns']} turns, preset {cfg['preset']}, {cfg['device']} {cfg['dtype']}, "
        f"{cfg['threads']} threads (query {cfg['query_tokens']}, answer {cfg['answer_tokens']} tokens; "
        f"medians of turns {s['turns_in_medians']})",
        caption=weights_caption(cfg),
    )
    for name in ("median", "immediate", "after_memory", "ratio"):
        table.add_column(name, justify="left" if name == "median" else "right")
    rows = (
        ("TTFT s (send -> 1st token)", "ttft_s"),
        ("turn s (send -> answer)", "turn_s"),
        ("queued s (behind update)", "queued_s"),
        ("memory update s", "memory_update_s"),
        ("ready s (send -> commit)", "ready_s"),
    )
    for label, key in rows:
        a, b = s["immediate"][key], s["after_memory"][key]
        table.add_row(label, f"{a:.4f}", f"{b:.4f}", f"{a / b:.2f}x" if b > 0 else "-")
    return table


def weights_caption(cfg: dict[str, Any]) -> str | None:
    """Which weights and decode step a report measured (None for a JSON from before it said)."""
    if "decode_kernel" not in cfg:
        return None
    default = " (the engine's default for the device)" if cfg.get("weights_requested") == DEFAULT_WEIGHTS else ""
    return f"weights {cfg['weights']}{default}, decode: {cfg['decode_kernel']}"


def describe(result: dict[str, Any]) -> str:
    """Two sentences a reader can check against the table."""
    s = result["summary"]
    fraction = s["exposed_fraction"]
    exposed = "" if fraction is None else f", {100 * fraction:.0f}% of the previous update"
    return (
        f"A user who reads before typing never waits for the memory update ({s['hidden_memory_s']:.3f}s per turn, "
        f"hidden); one who types at once waits {s['exposed_memory_s']:.3f}s for it before the next answer starts "
        f"(TTFT {s['ttft_ratio']:.2f}x){exposed}. Updating memory before returning each answer would make every "
        f"turn {s['synchronous_turn_s']:.3f}s instead of {s['after_memory']['turn_s']:.3f}s."
    )
