"""Where an engine's wall time goes when many conversations arrive at once: its joins (rows,
prompt tokens, seconds) and its memory updates (batch, encode and write seconds), beside the
round's throughput figures (``rxruntime.bench.throughput.summarize``).

One warm-up round, then ``--rounds`` timed rounds of ``--conversations`` new conversations, each
sending one query of ``--query-tokens`` random ids and decoding ``--answer-tokens`` greedily, as
``benchmarks/rxlm_same_weights.py``'s batch levels do (the sends in one ``Engine.together()``
block; ``--apart``: as independent clients)::

    python benchmarks/engine_phases.py --checkpoint /tmp/am-rxlm --conversations 64

The joins and updates are timed by wrapping ``DecodeBatch.join``, ``RxTModel.encode`` and
``RxTModel.update_memory`` in this process (wall time, so what runs beside them slows them too).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rxruntime.bench.decode import apply_weights
from rxruntime.bench.overlap import cpu_model
from rxruntime.bench.throughput import run_level, summarize
from rxruntime.engine import Engine
from rxruntime.models import DecodeBatch, RxTModel
from rxruntime.models.checkpoint import load_pretrained


def _timed(owner: type, name: str, record: Callable[[tuple[Any, ...], float], None]) -> Callable[[], None]:
    """Wrap ``owner.name`` so each call reports (its arguments, seconds); returns the undo."""
    original = getattr(owner, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            record(args, time.perf_counter() - start)

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--checkpoint", required=True, help="a model directory or a shipped model's name")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--weights", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--apart", action="store_true", help="send as independent clients (default: in one Engine.together() block)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.checkpoint, device="cpu", dtype=torch.float32)
    assert tokenizer is not None, f"{args.checkpoint} holds no tokenizer"
    fmt = apply_weights(model, args.weights)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    queries = [torch.randint(7, vocab, (args.query_tokens,), generator=g).tolist() for _ in range(args.conversations)]
    joins: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    undo = [
        _timed(DecodeBatch, "join", lambda a, s: joins.append(
            {"rows": len(a[0]), "prompt_tokens": sum(len(r.prompt) for r in a[0]), "s": s})),
        _timed(RxTModel, "encode", lambda a, s: updates.append({"part": "encode", "batch": a[0].shape[0], "s": s})),
        _timed(RxTModel, "update_memory", lambda a, s: updates.append(
            {"part": "update_memory", "batch": a[0].shape[0], "s": s})),
    ]  # fmt: skip
    rounds = []
    try:
        with Engine(model, tokenizer, max_batch=args.conversations) as engine:
            run_level(engine, queries, args.answer_tokens, 0, "warm-up", together=not args.apart)
            for r in range(args.rounds):
                joins.clear()
                updates.clear()
                summary = summarize(
                    run_level(engine, queries, args.answer_tokens, 0, f"round{r}", together=not args.apart),
                    args.conversations,
                )
                rounds.append({"summary": summary, "joins": list(joins), "memory": list(updates)})
                print(json.dumps(rounds[-1]), flush=True)
    finally:
        for u in undo:
            u()
    result = {"config": {**vars(args), "out": str(args.out) if args.out else None, "weights": fmt,
                         "cpu_model": cpu_model()}, "rounds": rounds}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
