"""Serve's autoscaling on queue length with conversation affinity: up under load, down (draining) when idle.

    python benchmarks/ray_autoscale.py --json benchmarks/results/ray-autoscale.json

A local Ray cluster on loopback with the engine deployment autoscaled between 1 and 2 replicas on
ongoing requests per replica (short delays so that it fits in a minute or two), and a real
``redis-server``. 32 clients each open conversations one after another (a fact, then two turns of
small talk) until Serve has added the second replica and that replica has served some of them (or
``--load-s`` is up): with affinity, a new replica takes new conversations while the old ones stay
where they are warm. The load stops; once Serve has removed a replica again (draining it), every
conversation opened asks for its fact.

Checks: no turn failed at any point (scaling up or down costs no turn); every conversation
recalls its fact after the scale-down; every stream whole (each event once, in order). Reports the
replica counts seen, how many conversations the removed replica held, and the affinity counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
from harness.http_load import FACTS, SMALL_TALK, TurnRecord, stream_turn
from harness.ray_cluster import LocalRayServe
from harness.redis_server import RedisServer

AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 2,
    "downscale_delay_s": 8,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--load-s", type=float, default=90.0, help="longest the load runs waiting for the scale-up")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with (
        RedisServer() as redis,
        LocalRayServe(redis.url, replicas=1, autoscaling=AUTOSCALING, num_cpus=1.0, model="small") as rs,
    ):
        result = asyncio.run(run(rs, args))
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


async def run(rs: LocalRayServe, args: argparse.Namespace) -> dict[str, Any]:
    client = openai.AsyncOpenAI(api_key="unused", base_url=f"{rs.url}/v1", max_retries=0, timeout=300)
    n = args.clients
    records: list[TurnRecord] = []
    counts: list[tuple[float, int]] = []
    started = time.perf_counter()

    def note() -> int:
        live = len(rs.replica_pids())
        if not counts or counts[-1][1] != live:
            counts.append((round(time.perf_counter() - started, 1), live))
        return live

    opened: list[tuple[str, tuple[str, str, str]]] = []  # (conversation, its fact)
    scaled_up = asyncio.Event()
    first_pids = set(rs.replica_pids())

    def served_by_new_replica() -> bool:
        return any(r.replica and int(r.replica.split("@")[0]) not in first_pids for r in records)

    async def talk(i: int) -> None:
        k = i
        while not scaled_up.is_set() and time.perf_counter() - started < args.load_s:
            fact = FACTS[k % len(FACTS)]
            k += n
            first = await stream_turn(client, fact[0], temperature=0.0)
            records.append(first)
            if first.conversation is None:
                continue
            opened.append((first.conversation, fact))
            for t in range(2):
                records.append(await stream_turn(client, SMALL_TALK[t], first.conversation, temperature=0.0))

    async def watch() -> None:
        while not scaled_up.is_set() and time.perf_counter() - started < args.load_s:
            if await asyncio.to_thread(note) >= 2 and served_by_new_replica():
                scaled_up.set()
            await asyncio.sleep(0.5)

    await asyncio.gather(watch(), *(talk(i) for i in range(n)))
    homes = {r.conversation: r.replica for r in records}  # where each conversation last ran
    peak = max(c for _, c in counts)
    deadline = time.perf_counter() + 120
    while await asyncio.to_thread(note) > 1 and time.perf_counter() < deadline:  # idle: Serve scales down
        await asyncio.sleep(0.5)
    survivor = f"{rs.replica_pids()[0]}@" if len(rs.replica_pids()) == 1 else None
    moved = sum(1 for cid, _ in opened if survivor is not None and not str(homes.get(cid, "")).startswith(survivor))
    recalls = await asyncio.gather(*(stream_turn(client, fact[1], cid, temperature=0.0) for cid, fact in opened))
    records += recalls
    failures = [f"{r.conversation} {r.query!r}: {r.error}" for r in records if not r.ok]
    failures += [f"{r.conversation}: {p}" for r in records for p in r.problems()]
    failures += [
        f"conversation {cid} forgot {fact[2]!r}: {recall.text!r}"
        for (cid, fact), recall in zip(opened, recalls)
        if recall.ok and fact[2] not in recall.text
    ]
    with urllib.request.urlopen(f"{rs.url}/metrics", timeout=60) as response:
        metrics = response.read().decode().splitlines()
    return {
        "scenario": "ray_autoscale",
        "autoscaling_config": AUTOSCALING,
        "clients": n,
        "conversations": len(opened),
        "turns": len(records),
        "replica_counts_over_time_s": counts,
        "peak_replicas": peak,
        "scaled_down_to_1": len(rs.replica_pids()) == 1,
        "conversations_last_served_by_the_removed_replica": moved,
        "recalled_after_scale_down": sum(1 for (_, f), r in zip(opened, recalls) if r.ok and f[2] in r.text),
        "affinity": {line.split()[0]: float(line.split()[1]) for line in metrics if line.startswith("rxrt_affinity")},
        "wall_s": round(time.perf_counter() - started, 1),
        "failures": failures[:20],
        "ok": not failures and peak >= 2 and len(rs.replica_pids()) == 1,
    }


if __name__ == "__main__":
    sys.exit(main())
