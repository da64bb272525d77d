"""The serving fault soak at full size (the tests run the same scenarios smaller).

    python benchmarks/soak.py --json benchmarks/results/soak.json

Scenarios (see ``benchmarks/harness/soak.py`` for what each checks): 10,000 fuzzed frames interleaved
with live conversations; ``kill -9`` of ``rxrt serve`` during memory updates, repeated, with SQLite
and with a real Redis (``redis-server`` from the distribution, started and stopped here on a free
port); 200 conversations x 5 pipelined turns; a slow reader; a reader that never reads; another
key trying every operation.
Prints one line of figures per scenario and exits 1 if any invariant failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import soak
from harness.redis_server import RedisServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", help="model directory or a shipped model (default: small, fast)")
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--kills", type=int, default=10, help="kill -9 rounds per store")
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--only", nargs="*", default=None, help="scenario names to run (default: all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    results: list[dict[str, Any]] = []

    def record(result: dict[str, Any]) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)

    started = time.time()
    if wanted("garbage"):
        record(soak.garbage(args.model, conversations=8, turns=4, frames=args.frames))
    if wanted("crashes"):
        with tempfile.TemporaryDirectory() as tmp:
            record(soak.crashes(args.model, f"sqlite:///{tmp}/soak.db", rounds=args.kills, conversations=16))
        with RedisServer() as redis:
            record(soak.crashes(args.model, redis.url, rounds=args.kills, conversations=16))
    if wanted("pipelined"):
        record(soak.pipelined(args.model, conversations=args.conversations, turns=args.turns))
    if wanted("slow_reader"):
        record(soak.slow_reader(args.model, requests=3000))
    if wanted("non_reader"):
        record(soak.non_reader(args.model))
    if wanted("cross_tenant"):
        record(soak.cross_tenant(args.model))
    ok = all(r["ok"] for r in results)
    if args.json is not None:
        machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
        args.json.write_text(
            json.dumps(
                {"ok": ok, "seconds": round(time.time() - started), "machine": machine, "results": results}, indent=2
            )
            + "\n"
        )
    print("soak:", "all invariants held" if ok else "FAILED", f"({time.time() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
