"""Chat Completions history: cached STM vs replay vs a stateless model, as a Markdown table.

The measurement is ``rxrt bench replay`` (rxruntime/bench/replay.py); this script runs it, or
reads its JSON, and prints the table docs/benchmarks.md shows::

    python benchmarks/chat_replay.py --turns 16 --repeats 5 --out benchmarks/results
    python benchmarks/chat_replay.py --from benchmarks/results/replay-default.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| turn | RxT prefill tokens | replayed tokens (encoder) | stateless prefill tokens | answer tokens "
        "| cached ms | replay ms | stateless ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["turns"]:
        lines.append(
            f"| {r['turn']} | {r['query_tokens']} | {r['replayed_tokens']} | {r['stateless_prefill_tokens']} "
            f"| {r['answer_tokens']} | {r['cached_s'] * 1e3:.1f} | {r['replay_s'] * 1e3:.1f} "
            f"| {r['stateless_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, help="a replay JSON written by rxrt bench replay")
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="directory for replay-default.json")
    args = parser.parse_args()
    if args.source is not None:
        result = json.loads(args.source.read_text())
    else:
        from rxruntime.bench.replay import ReplayConfig, run_replay

        result = run_replay(ReplayConfig(turns=args.turns, repeats=args.repeats), progress=print)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "replay-default.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(json.dumps(result["summary"]), file=sys.stderr)


if __name__ == "__main__":
    main()
