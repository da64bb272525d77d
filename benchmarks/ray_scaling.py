"""What the distributed path costs: the HTTP front single-process vs on Ray with 1 and 2 replicas.

    python benchmarks/ray_scaling.py --json benchmarks/results/ray-scaling.json

One run, one machine, the shipped model, one real ``redis-server`` as every side's store:

* ``single``: ``rxrt serve --http`` in its own process (the baseline: no Ray, no leases);
* ``ray-1``: the Ray deployment with 1 engine replica (2 CPUs, so the same cores as the others);
* ``ray-2``: the Ray deployment with 2 engine replicas (1 CPU each).

Ray is told of 4 logical CPUs (Serve starts a new replica before it stops the old one when the
replica count changes); each replica's torch uses as many threads as CPUs it asked for.

Each measurement runs 64 conversations at once, 3 streamed turns each (the first opens the
conversation, the next two continue it from its STM), through the official ``openai`` async client
in this process. Reported per side: aggregate output tokens/s (all output tokens / wall time) and
the client's time to first token (request sent to first text delta: ingress, routing, the lease
and queueing included), p50 and p95, over every turn of every round. The sides are measured in
ABBA order over ``--rounds`` so that load from other work on the machine hits them alike. After
each measurement one conversation runs ``--alone-turns`` turns with nothing else in flight: its
time to first token is the latency the path adds, apart from contention for the CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
from harness.http_load import TurnRecord, stream_turn
from harness.ray_cluster import LocalRayServe
from harness.redis_server import RedisServer, free_port

QUERIES = ["I live in Lisbon.", "What is 3 plus 5?", "Where do I live?"]


async def workload(url: str, conversations: int, turns: int) -> tuple[float, list[TurnRecord]]:
    """(wall seconds, every turn) of ``conversations`` concurrent conversations of ``turns`` turns."""
    client = openai.AsyncOpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0, timeout=600)

    async def one() -> list[TurnRecord]:
        records = [await stream_turn(client, QUERIES[0], temperature=0.0)]
        cid = records[0].conversation
        for t in range(1, turns):
            records.append(await stream_turn(client, QUERIES[t % len(QUERIES)], cid, temperature=0.0))
        return records

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(conversations)))
    wall = time.perf_counter() - started
    await client.close()
    return wall, [r for rs in results for r in rs]


def summary(runs: list[tuple[float, list[TurnRecord]]]) -> dict[str, Any]:
    records = [r for _, rs in runs for r in rs]
    failed = [r for r in records if not r.ok]
    ttft = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    later = sorted(r.ttft_s for _, rs in runs for r in rs if r.ttft_s is not None and r.query != QUERIES[0])
    tokens = sum(r.output_tokens for r in records)
    wall = sum(w for w, _ in runs)
    return {
        "turns": len(records),
        "failed_turns": len(failed),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(_pct(ttft, 50), 3),
        "ttft_p95_s": round(_pct(ttft, 95), 3),
        "continuing_ttft_p50_s": round(_pct(later, 50), 3),
        "continuing_ttft_p95_s": round(_pct(later, 95), 3),
        "per_round_tokens_per_s": [round(sum(r.output_tokens for r in rs) / w, 1) for w, rs in runs],
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else values[0]


def start_single(store: str) -> tuple[subprocess.Popen[bytes], str]:
    """``rxrt serve --http`` on a free port, in its own process; returns once /health says ready."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rxruntime.cli", "serve", "--http", f"127.0.0.1:{port}", "--store", store],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("rxrt serve --http did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--alone-turns", type=int, default=8, help="turns of one conversation alone, per measurement")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from rxruntime.serving.ray.app import application, run

    runs: dict[str, list[tuple[float, list[TurnRecord]]]] = {"single": [], "ray-1": [], "ray-2": []}
    alone: dict[str, list[float]] = {"single": [], "ray-1": [], "ray-2": []}
    load: list[float] = []

    def measure(side: str, url: str) -> None:
        load.append(os.getloadavg()[0])
        runs[side].append(asyncio.run(workload(url, args.conversations, args.turns)))
        _, records = asyncio.run(workload(url, 1, args.alone_turns))  # one conversation, nothing else
        alone[side] += [r.ttft_s for r in records if r.ttft_s is not None]
        print(side, json.dumps(summary(runs[side][-1:])), flush=True)

    started = time.time()
    with (
        RedisServer() as redis,
        LocalRayServe(redis.url, replicas=2, cluster_cpus=4, num_cpus=1.0, model="small") as rs,
    ):
        single, single_url = start_single(redis.url)
        current = 2

        def deploy(replicas: int) -> None:
            run(application(redis.url, replicas=replicas, num_cpus=2.0 / replicas), "127.0.0.1", rs.port)
            rs.wait_for_replicas(replicas)
            asyncio.run(workload(rs.url, 4, 2))  # warm-up: the C decode step, first loads

        try:
            deploy(2)
            asyncio.run(workload(single_url, 4, 2))
            order = ["single", "ray", "switch", "ray"]
            for r in range(args.rounds):
                for step in order if r % 2 == 0 else order[::-1]:
                    if step == "single":
                        measure("single", single_url)
                    elif step == "switch":
                        current = 1 if current == 2 else 2
                        deploy(current)
                    else:
                        measure(f"ray-{current}", rs.url)
        finally:
            single.terminate()
            single.wait(30)
    sides = {side: summary(r) for side, r in runs.items()}
    for side, ttfts in alone.items():
        sides[side]["alone_ttft_p50_s"] = round(_pct(sorted(ttfts), 50), 4)
        sides[side]["alone_ttft_p95_s"] = round(_pct(sorted(ttfts), 95), 4)
    base = sides["single"]["tokens_per_s"]
    result = {
        "benchmark": "ray_scaling",
        "conversations": args.conversations,
        "turns_per_conversation": args.turns,
        "rounds": args.rounds,
        "sides": sides,
        "ratios": {
            "ray-1 / single tokens/s": round(sides["ray-1"]["tokens_per_s"] / base, 3),
            "ray-2 / single tokens/s": round(sides["ray-2"]["tokens_per_s"] / base, 3),
            "ray-2 / ray-1 tokens/s": round(sides["ray-2"]["tokens_per_s"] / sides["ray-1"]["tokens_per_s"], 3),
            "ray-1 / single p50 TTFT": round(sides["ray-1"]["ttft_p50_s"] / sides["single"]["ttft_p50_s"], 3),
            "ray-2 / single p50 TTFT": round(sides["ray-2"]["ttft_p50_s"] / sides["single"]["ttft_p50_s"], 3),
            "ray-2 - single p50 TTFT of one conversation alone (s)": round(
                sides["ray-2"]["alone_ttft_p50_s"] - sides["single"]["alone_ttft_p50_s"], 4
            ),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_during": [round(x, 1) for x in load],
            "python": platform.python_version(),
        },
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(s["failed_turns"] == 0 for s in sides.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
