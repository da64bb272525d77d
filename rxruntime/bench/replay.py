"""A stateless client's conversation through ``/v1/chat/completions``: cached STM, replay, stateless model.

A Chat Completions client resends the whole history every turn. Three ways to answer turn ``t``:

* **cached**: the HTTP front finds the STM after its own previous answer under the hash of the
  history and reads only the new query (``history_cache: hit``);
* **replay**: the same server with its cache off (``history_cache_size=0``) rebuilds the STM by
  running the ``t - 1`` earlier (query, answer) pairs through the encoder and memory attention (no
  decoding), then answers; what a cold server, or a client editing its history, costs;
* **stateless**: a decoder-only model of the same active size (``rxrt bench turns``' Llama
  baseline, random weights) prefills the whole history plus the query, then decodes as many tokens
  as RxT answered, as a stateless server has to.

The conversation is real: the shipped default model answers a cycle of queries it knows, greedy,
and every request of the cached and replay runs goes through the HTTP app (uvicorn on loopback) with
the very messages a client would send. The stateless model runs in-process on the same token ids
(no HTTP: its latency excludes the ~1-2 ms a request costs). Per turn: tokens the decoder prefills,
tokens the encoder replays, latency from request to full answer (median over ``repeats``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

QUERIES = (
    "My name is Julia.",
    "What is 3 plus 5?",
    "I live in Lisbon.",
    "Count from 2 to 5.",
    "Tell me a joke.",
    "What day comes after Monday?",
    "What is my name?",
    "Where do I live?",
)


@dataclass
class ReplayConfig:
    turns: int = 20
    repeats: int = 3
    seed: int = 0
    device: str = "cpu"
    model: str = "default"


@dataclass
class ReplayTurn:
    turn: int
    query_tokens: int  # what RxT's decoder prefills, in both RxT modes
    replayed_tokens: int  # encoder tokens the replay run wrote to memory before answering
    stateless_prefill_tokens: int  # history + query, what the stateless model prefills
    answer_tokens: int
    cached_s: float
    replay_s: float
    stateless_s: float
    same_answer: bool  # the replay run answered exactly as the cached run did


def run_replay(cfg: ReplayConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import rxruntime
    from rxruntime.bench.turns import _baseline_turn, build_baseline
    from rxruntime.serving.http.app import create_app
    from rxruntime.serving.http.serve import ThreadedServer

    runs: list[list[ReplayTurn]] = []
    with rxruntime.load(cfg.model, device=cfg.device) as engine:
        tokenizer = engine.tokenizer
        llama = build_baseline(engine.model, max_positions=cfg.turns * engine.max_seq_len + 64, seed=cfg.seed)
        cached_app = create_app(engine, history_cache_size=4 * cfg.turns)
        replay_app = create_app(engine, history_cache_size=0)
        with ThreadedServer(cached_app) as cached, ThreadedServer(replay_app) as replay:
            for repeat in range(cfg.repeats):
                messages: list[dict[str, str]] = []
                history_ids: list[int] = []
                records = []
                for t in range(1, cfg.turns + 1):
                    query = QUERIES[(t - 1) % len(QUERIES)]
                    messages.append({"role": "user", "content": query})
                    c_reply, c_s = _post(cached.url, messages)
                    r_reply, r_s = _post(replay.url, messages)
                    answer = c_reply["choices"][0]["message"]["content"]
                    answer_ids = tokenizer.encode(answer)
                    ids = [*history_ids, *tokenizer.query_ids(query)]
                    baseline, _ = _baseline_turn(llama, ids, max(1, len(answer_ids)), 0.0)
                    records.append(
                        ReplayTurn(
                            turn=t,
                            query_tokens=int(c_reply["usage"]["rxrt"]["query_tokens"]),
                            replayed_tokens=int(r_reply["usage"]["rxrt"]["replayed_tokens"]),
                            stateless_prefill_tokens=len(ids),
                            answer_tokens=int(c_reply["usage"]["completion_tokens"]),
                            cached_s=c_s,
                            replay_s=r_s,
                            stateless_s=baseline.turn_s,
                            same_answer=answer == r_reply["choices"][0]["message"]["content"],
                        )
                    )
                    messages.append({"role": "assistant", "content": answer})
                    history_ids.extend(tokenizer.interaction_ids(query, answer))
                    if progress is not None:
                        r = records[-1]
                        progress(
                            f"repeat {repeat + 1} turn {t}: cached {r.cached_s * 1e3:.1f} ms, replay "
                            f"{r.replay_s * 1e3:.1f} ms ({r.replayed_tokens} tokens), stateless "
                            f"{r.stateless_s * 1e3:.1f} ms ({r.stateless_prefill_tokens} tokens)"
                        )
                runs.append(records)
    turns = [_median(per_turn) for per_turn in zip(*runs)]
    last = turns[-1]
    return {
        "benchmark": "replay",
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "turns": [asdict(r) for r in turns],
        "summary": {
            "turn": last.turn,
            "replay_over_cached": last.replay_s / last.cached_s,
            "stateless_over_cached": last.stateless_s / last.cached_s,
            "all_answers_identical": all(r.same_answer for run in runs for r in run),
        },
    }


def _post(url: str, messages: list[dict[str, str]]) -> tuple[dict[str, Any], float]:
    body = json.dumps({"model": "rxt", "messages": messages}).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request) as reply:
        data = json.loads(reply.read())
    return data, time.perf_counter() - start


def _median(records: tuple[ReplayTurn, ...]) -> ReplayTurn:
    first = records[0]
    return ReplayTurn(
        turn=first.turn,
        query_tokens=first.query_tokens,
        replayed_tokens=first.replayed_tokens,
        stateless_prefill_tokens=first.stateless_prefill_tokens,
        answer_tokens=first.answer_tokens,
        cached_s=statistics.median(r.cached_s for r in records),
        replay_s=statistics.median(r.replay_s for r in records),
        stateless_s=statistics.median(r.stateless_s for r in records),
        same_answer=all(r.same_answer for r in records),
    )


def format_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="Chat Completions: cached STM vs replayed history vs a stateless model")
    for name in (
        "turn",
        "RxT prefill",
        "replayed (encoder)",
        "stateless prefill",
        "answer",
        "cached ms",
        "replay ms",
        "stateless ms",
        "same",
    ):
        table.add_column(name, justify="right")
    for r in result["turns"]:
        table.add_row(
            str(r["turn"]),
            str(r["query_tokens"]),
            str(r["replayed_tokens"]),
            str(r["stateless_prefill_tokens"]),
            str(r["answer_tokens"]),
            f"{r['cached_s'] * 1e3:.1f}",
            f"{r['replay_s'] * 1e3:.1f}",
            f"{r['stateless_s'] * 1e3:.1f}",
            "yes" if r["same_answer"] else "NO",
        )
    return table
