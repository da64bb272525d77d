"""A shipped model through the engine with and without its threads handing back their OpenMP
teams (``models/openmp.py``), side by side: each side in its own fresh process, alternating.

Per turn of one conversation (the statements and questions of docs/default-model.md's first
minutes): the memory update's duration (``MemoryUpdated.duration_s``), the turn (send ->
``AnswerCompleted``) and the first token. The ``off`` side patches the hand-back out of the
engine's threads (what every engine ran before it); the API's ``serial`` stays on both sides::

    python benchmarks/engine_openmp_ab.py --model default --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QUERIES = [
    "Hi! I'm Marguerite and I live in Lisbon.",
    "What is my name?",
    "My favourite food is sushi.",
    "Where do I live?",
    "What food do I like?",
]


def side(which: str, model: str, answer_tokens: int, threads: int) -> dict[str, list[float]]:
    """One side's turns, in this process."""
    import torch

    torch.set_num_threads(threads)
    import rxruntime
    from rxruntime.engine import decode_loop, memory_worker
    from rxruntime.events import AnswerCompleted, Event, MemoryUpdated, Token
    from rxruntime.models import openmp

    if which == "off":

        def keep() -> bool:
            return False

        name = "release_idle_threads"
        for module in (openmp, decode_loop, memory_worker):  # where the engine looks it up
            setattr(module, name, keep)
    out: dict[str, list[float]] = {"memory_update_s": [], "turn_s": [], "ttft_s": []}
    with rxruntime.load(model) as engine:
        conv = engine.conversation("ab", seed=1)
        for query in QUERIES:
            start = time.perf_counter()
            seen: dict[str, float] = {}

            def on_event(event: Event, seen: dict[str, float] = seen) -> None:
                if isinstance(event, Token) and "first" not in seen:
                    seen["first"] = time.perf_counter()
                elif isinstance(event, AnswerCompleted):
                    seen["answer"] = time.perf_counter()
                elif isinstance(event, MemoryUpdated):
                    seen["update"] = event.duration_s

            conv.interact(query, max_new_tokens=answer_tokens).subscribe(on_event)
            if not conv.wait_for_memory(120):
                raise TimeoutError("the memory update did not commit within 120 s")
            out["memory_update_s"].append(seen["update"])
            out["turn_s"].append(seen["answer"] - start)
            out["ttft_s"].append(seen["first"] - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="default", help="a shipped model's name or a model directory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=["on", "off"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(side(args.side, args.model, args.answer_tokens, args.threads)))
        return 0
    from rxruntime.bench.overlap import cpu_model

    runs: dict[str, list[dict[str, list[float]]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for which in ("off", "on"):
            cmd = [sys.executable, __file__, "--side", which, "--model", args.model,
                   "--answer-tokens", str(args.answer_tokens), "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
            runs[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary: dict[str, Any] = {}
    for which, rs in runs.items():
        summary[which] = {
            key: statistics.median(v for r in rs for v in r[key]) for key in ("memory_update_s", "turn_s", "ttft_s")
        }
        print(
            f"{which}: memory update {summary[which]['memory_update_s']:.3f} s, turn {summary[which]['turn_s']:.3f} s,"
            f" first token {1e3 * summary[which]['ttft_s']:.1f} ms (medians over {len(rs)} x {len(QUERIES)} turns)"
        )
    ratio = summary["off"]["memory_update_s"] / summary["on"]["memory_update_s"]
    print(f"memory update: {ratio:.2f}x faster with the hand-back")
    report = {"config": {**vars(args), "out": str(args.out) if args.out else None, "cpu_model": cpu_model()},
              "runs": runs, "medians": summary, "memory_update_speedup": ratio}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
