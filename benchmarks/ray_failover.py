"""The Ray deployment losing a replica mid-conversation, at full size (the CI test is smaller).

    python benchmarks/ray_failover.py --json benchmarks/results/ray-failover.json

A local Ray cluster on loopback (2 CPU engine replicas of the shipped model) and a real
``redis-server``. 20 conversations x 5 streamed turns through the official ``openai`` client:
turn 1 states a fact the model recalls, turns 2-4 are small talk, turn 5 asks for the fact. While
turn 4 runs in every conversation at once, the replica holding the most conversations is killed
with ``kill -9`` as soon as one of its answers has streamed its first token, so some turns die
mid-stream. Turn 5 is sent at once, without waiting for Serve to replace the replica.

Checks: every turn-4 stream that failed ended with a clear error (never a hang); every turn-5
answer recalls its conversation's fact; every completed stream has each event once, in order
(sequence numbers 0..n-1, the deltas make the answer, one completed / update_started / updated);
turn 5 commits the STM version right after the one Redis held (nothing older was read); then the
replacement replica comes up. Prints one JSON summary; exits 1 if an invariant failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import openai
from harness.http_load import FACTS, SMALL_TALK, TurnRecord, stream_turn
from harness.ray_cluster import LocalRayServe
from harness.redis_server import RedisServer

from rxruntime.stores import RedisStore


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        RedisServer() as redis,
        LocalRayServe(redis.url, replicas=2, lease_ttl_s=args.lease_ttl, model="small") as cluster,
    ):
        client = openai.AsyncOpenAI(api_key="unused", base_url=f"{cluster.url}/v1", max_retries=0, timeout=300)
        store = RedisStore(redis.url)
        n = args.conversations
        facts = [FACTS[i % len(FACTS)] for i in range(n)]
        turns: list[list[TurnRecord]] = [[] for _ in range(n)]
        started = time.perf_counter()

        async def opening(i: int) -> None:  # turns 1-3
            first = await stream_turn(client, facts[i][0], temperature=0.0)
            turns[i].append(first)
            for query in SMALL_TALK[:2]:
                turns[i].append(await stream_turn(client, query, first.conversation, temperature=0.0))

        await asyncio.gather(*(opening(i) for i in range(n)))
        ids = [t[0].conversation for t in turns]
        homes = Counter(t[-1].replica for t in turns)
        victim_name = homes.most_common(1)[0][0]
        assert victim_name is not None
        victim = int(victim_name.split("@")[0])
        killed: dict[str, Any] = {}

        def kill_on_first_token(record: TurnRecord, kind: str) -> None:
            if not killed and record.replica == victim_name and kind == "response.output_text.delta":
                os.kill(victim, signal.SIGKILL)
                killed["at"] = time.perf_counter()
                killed["conversation"] = record.conversation

        kill = kill_on_first_token
        fourth = await asyncio.gather(
            *(stream_turn(client, SMALL_TALK[2], ids[i], on_event=kill, temperature=0.0) for i in range(n))
        )
        stored = [store.version(str(cid)) for cid in ids]
        fifth = await asyncio.gather(*(stream_turn(client, facts[i][1], ids[i], temperature=0.0) for i in range(n)))
        after_kill_s = time.perf_counter() - killed.get("at", time.perf_counter())
        replaced = time.perf_counter()
        cluster.wait_for_replicas(2, exclude=frozenset({victim}))
        restart_s = time.perf_counter() - replaced + after_kill_s
        for i in range(n):
            turns[i] += [fourth[i], fifth[i]]

        failures: list[str] = []
        on_victim = [i for i in range(n) if turns[i][2].replica == victim_name]
        for i in range(n):
            for t, record in enumerate(turns[i]):
                if record.error is None:
                    failures += [f"conversation {i} turn {t + 1}: {p}" for p in record.problems()]
            if turns[i][3].error is not None and turns[i][3].error_code not in ("replica_failed",):
                failures.append(f"conversation {i} turn 4 failed unclearly: {turns[i][3].error}")
            if turns[i][3].error is not None and i not in on_victim:
                failures.append(f"conversation {i} turn 4 failed on a live replica: {turns[i][3].error}")
            if not fifth[i].ok:
                failures.append(f"conversation {i} turn 5 failed: {fifth[i].error}")
            elif facts[i][2] not in fifth[i].text:
                failures.append(f"conversation {i} forgot {facts[i][2]!r}: {fifth[i].text!r}")
            elif fifth[i].stm_version != (stored[i] or 0) + 1 or stored[i] is None:
                failures.append(f"conversation {i} turn 5 committed v{fifth[i].stm_version} over stored v{stored[i]}")
            for t in (0, 1, 2):
                if not turns[i][t].ok:
                    failures.append(f"conversation {i} turn {t + 1} failed before the kill: {turns[i][t].error}")
        failed_4 = [r for r in fourth if r.error is not None]
        mid_stream = [r for r in failed_4 if any(k == "response.output_text.delta" for k, _ in r.events)]
        text = await _metrics(cluster.url)
        return {
            "scenario": "ray_failover",
            "conversations": n,
            "turns_per_conversation": 5,
            "streams": sum(len(t) for t in turns),
            "events": sum(len(r.events) for t in turns for r in t),
            "conversations_on_killed_replica": len(on_victim),
            "turn4_failed": len(failed_4),
            "turn4_failed_mid_stream": len(mid_stream),
            "turn4_failed_before_first_token": len(failed_4) - len(mid_stream),
            "turn4_error_codes": dict(Counter(str(r.error_code) for r in failed_4)),
            "turn4_committed_anyway": sum(
                1 for i in range(n) if fourth[i].error is not None and stored[i] == (turns[i][2].stm_version or 0) + 1
            ),
            "turn5_recalled": sum(1 for i in range(n) if fifth[i].ok and facts[i][2] in fifth[i].text),
            "turn5_on_other_replica": sum(1 for i in on_victim if fifth[i].replica != victim_name),
            "turn5_done_s_after_kill": round(after_kill_s, 2),
            "replacement_running_s_after_kill": round(restart_s, 1),
            "affinity": {line.split()[0]: float(line.split()[1]) for line in text if line.startswith("rxrt_affinity")},
            "wall_s": round(time.perf_counter() - started, 1),
            "failures": failures,
            "ok": not failures,
        }


async def _metrics(url: str) -> list[str]:
    def read() -> str:
        with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
            return str(response.read().decode())

    return (await asyncio.to_thread(read)).splitlines()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=20)
    p.add_argument("--lease-ttl", type=float, default=3.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()}
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
