"""The serving fault soak: ``rxrt serve`` under garbage, crashes, pipelining, slow readers and
other tenants, each scenario checking its own invariant (docs/reliability.md).

* :func:`garbage` — fuzzed frames interleaved with live conversations; every live memory must be
  bit-identical to a run without the garbage, and every garbage frame must get a reply.
* :func:`crashes` — ``kill -9`` of the server while memory updates run, repeated, with a store;
  every memory update a client saw acknowledged (``MemoryUpdated``) must survive, and every
  conversation must resume.
* :func:`pipelined` — many conversations x pipelined turns: no event lost, duplicated or reordered.
* :func:`slow_reader` — a client that reads slowly gets every reply, in order.
* :func:`non_reader` — a client that never reads costs a bounded buffer and is told.
* :func:`cross_tenant` — another key tries every operation on a conversation; all refused,
  indistinguishable from an unknown id, the owner's memory untouched.

Each returns a dict of figures with ``ok``; ``benchmarks/soak.py`` runs them at full size, the
tests at CI size. Queries are greedy (the engine's default), so runs are reproducible.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import torch
import zmq

import rxruntime
from rxruntime.conversation import ConversationState
from rxruntime.engine import Engine
from rxruntime.errors import ConversationError
from rxruntime.events import (
    AnswerCompleted,
    Event,
    InteractionFailed,
    MemoryUpdated,
    MemoryUpdateStarted,
    QueryReceived,
    Token,
)
from rxruntime.serving.client import Client, RemoteConversation
from rxruntime.serving.zmq import wire
from rxruntime.serving.zmq.curve import ClientKeys, ServerKeys, generate_keys
from rxruntime.serving.zmq.errors import ProtocolError
from rxruntime.serving.zmq.server import Server
from rxruntime.stores import InMemoryStore, open_store

from .redis_server import free_port

_ODD: list[Any] = [None, True, -1, 2**64 - 1, 1.5, float("nan"), float("inf"), "", "x" * 300, b"\x00", [], {}, [1, "a"]]


@contextmanager
def _served(model: str, store_url: str = "memory://", **server_options: Any) -> Iterator[tuple[Engine, Server]]:
    engine = rxruntime.load(model, store=open_store(store_url) if store_url != "memory://" else InMemoryStore())
    server = Server(engine, "tcp://127.0.0.1:*", **server_options).start()
    try:
        yield engine, server
    finally:
        server.stop()
        engine.close()


def _query(rng: random.Random) -> str:
    words = ["Ada", "cat", "Pixel", "name", "my", "is", "what", "hello", "the", "blue", "sky", "likes"]
    return " ".join(rng.choice(words) for _ in range(rng.randrange(2, 8)))


# ---------------------------------------------------------------------- garbage
def fuzz_frames(n: int, live_ids: list[str], limits: wire.Limits, seed: int = 0) -> list[bytes]:
    """``n`` frames no server may act on: undecodable bytes, non-maps, requests with bad fields,
    and well-formed requests naming conversations that belong to another connection."""
    rng = random.Random(seed)
    ops = [*wire.SCHEMA, "dance"]
    frames: list[bytes] = []
    while len(frames) < n:
        kind = rng.random()
        if kind < 0.15:
            frames.append(rng.randbytes(rng.randrange(0, 64)))
            continue
        if kind < 0.25:
            frames.append(msgpack.packb(rng.choice([[1, 2], "str", 7, None, 1.5])))
            continue
        op = rng.choice(ops)
        request: dict[str, Any] = {"op": op, "rid": rng.randrange(1, 2**31)}
        if op in ("interact", "export", "close", "delete"):
            request["conversation_id"] = rng.choice(live_ids)
        if op == "interact":
            request["query"] = rng.choice(["hi", [1, 2, 3], [10**9], ""])
            if rng.random() < 0.7:
                request["options"] = {rng.choice(["top_k", "temperature", "top_p", "seed", "x"]): rng.choice(_ODD)}
        if op == "cancel":
            request["target"] = rng.randrange(1, 2**31)
        if rng.random() < 0.5:
            request[rng.choice(["rid", "conversation_id", "query", "options", "state", "zzz"])] = rng.choice(_ODD)
        try:
            wire.validate(request, limits)
        except ProtocolError:
            pass  # refused at the edge
        else:
            if op in ("open", "restore"):
                continue  # would create a conversation of its own: not garbage
        frames.append(msgpack.packb(request))
    return frames


def _live(client: Client, conversations: int, turns: int, seed: int, between: Any = None) -> dict[str, torch.Tensor]:
    """One conversation at a time, one turn at a time (batch size 1: bit-reproducible)."""
    rng = random.Random(seed)
    memories: dict[str, torch.Tensor] = {}
    step = 0
    for c in range(conversations):
        conv = client.open(f"live-{c}")
        for _ in range(turns):
            if between is not None:
                between(step)
            step += 1
            conv.ask(_query(rng), max_new_tokens=12)
        memories[conv.id] = conv.export_state().stm
    return memories


def garbage(model: str = "small", conversations: int = 8, turns: int = 4, frames: int = 10_000) -> dict[str, Any]:
    with _served(model) as (_, server), Client(server.endpoint, timeout=120) as client:
        baseline = _live(client, conversations, turns, seed=1)
    with _served(model) as (engine, server), Client(server.endpoint, timeout=120) as client:
        limits = wire.Limits(engine.vocab_size, engine.max_seq_len, server.max_message_bytes)
        live_ids = [f"live-{c}" for c in range(conversations)]
        fuzz = fuzz_frames(frames, live_ids, limits)
        batches = [fuzz[i :: conversations * turns] for i in range(conversations * turns)]
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(server.endpoint)
        replies = 0
        lock = threading.Lock()
        sender: list[threading.Thread] = []

        def send_batch(step: int) -> None:
            def run() -> None:
                nonlocal replies
                with lock:
                    for frame in batches[step]:
                        raw.send(frame)
                    while raw.poll(0):
                        raw.recv()
                        replies += 1

            thread = threading.Thread(target=run)
            thread.start()
            sender.append(thread)

        start = time.perf_counter()
        garbled = _live(client, conversations, turns, seed=1, between=send_batch)
        for thread in sender:
            thread.join()
        deadline = time.monotonic() + 60
        while replies < frames and time.monotonic() < deadline:
            if raw.poll(1000):
                raw.recv()
                replies += 1
        elapsed = time.perf_counter() - start
        raw.close(0)
        ctx.term()
    identical = sum(torch.equal(baseline[cid], garbled[cid]) for cid in baseline)
    return {
        "scenario": "garbage",
        "frames": frames,
        "frames_answered": replies,
        "conversations": conversations,
        "turns": conversations * turns,
        "memories_bit_identical": identical,
        "seconds": round(elapsed, 1),
        "ok": identical == conversations and replies == frames,
    }


# ---------------------------------------------------------------------- crashes
def _serve_process(model: str, port: int, store_url: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "rxruntime.cli", "serve", "--model", model, "--store", store_url]
    return subprocess.Popen(
        [*command, "--bind", f"tcp://127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait_served(address: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(address, timeout=5) as client:
                client.ping()
                return
        except (TimeoutError, ConnectionError):
            if time.monotonic() > deadline:
                raise


def crashes(
    model: str = "small",
    store_url: str = "sqlite:///soak.db",
    rounds: int = 10,
    conversations: int = 16,
    turns_per_round: int = 3,
) -> dict[str, Any]:
    """Each round: start ``rxrt serve``, check every conversation resumed with at least the memory
    acknowledged before, pipeline a few turns per conversation, and ``kill -9`` the server at a
    random moment after the first memory update started (counted when one was mid-flight)."""
    rng = random.Random(2)
    acked: dict[str, int] = {}
    acknowledged = checked = lost = kills_during_update = resumed = 0
    ids = [f"crash-{c}" for c in range(conversations)]
    for round_ in range(rounds + 1):
        port = free_port()
        proc = _serve_process(model, port, store_url)
        address = f"tcp://127.0.0.1:{port}"
        try:
            _wait_served(address)
            with Client(address, timeout=60, heartbeat_s=0.5, heartbeat_timeout_s=3) as client:
                for cid in ids:  # every conversation resumes; nothing acknowledged is missing
                    version = client.open(cid).export_state().stm_version
                    resumed += 1
                    if cid in acked:
                        checked += 1
                        lost += version < acked[cid]
                if round_ == rounds:
                    break  # the last start only checks the previous kill
                started = threading.Event()
                lock = threading.Lock()
                in_flight: set[tuple[str, int]] = set()

                def on_next(
                    event: Event,
                    started: threading.Event = started,
                    lock: threading.Lock = lock,
                    in_flight: set[tuple[str, int]] = in_flight,
                ) -> None:
                    nonlocal acknowledged
                    key = (event.conversation_id, event.turn)
                    with lock:
                        if isinstance(event, MemoryUpdateStarted):
                            in_flight.add(key)
                            started.set()
                        elif isinstance(event, MemoryUpdated):
                            in_flight.discard(key)
                            acknowledged += 1
                            acked[event.conversation_id] = max(acked.get(event.conversation_id, 0), event.stm_version)

                for _ in range(turns_per_round):
                    for cid in ids:
                        RemoteConversation(client, cid).interact(_query(rng), max_new_tokens=12).subscribe(
                            on_next, lambda exc: None
                        )
                if started.wait(60):
                    time.sleep(rng.random() * 1.0)
                deadline = time.monotonic() + 5
                while True:  # aim the kill at a moment when some update has started, not finished
                    with lock:
                        if in_flight or time.monotonic() > deadline:
                            kills_during_update += bool(in_flight)
                            os.kill(proc.pid, signal.SIGKILL)
                            break
                    time.sleep(0.001)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return {
        "scenario": "crashes",
        "store": store_url.split(":")[0],
        "kills": rounds,
        "kills_with_an_update_in_flight": kills_during_update,
        "acknowledged_updates": acknowledged,
        "conversations_resumed": resumed,
        "acknowledged_checked": checked,
        "acknowledged_lost": lost,
        "ok": lost == 0 and resumed == conversations * (rounds + 1) and checked > 0,
    }


# ---------------------------------------------------------------------- pipelined
def pipelined(model: str = "small", conversations: int = 200, turns: int = 5, clients: int = 4) -> dict[str, Any]:
    """Every turn of every conversation sent at once; then check each stream's events."""
    streams: dict[tuple[str, int], list[Event]] = defaultdict(list)
    outcome: dict[tuple[str, int], Any] = {}
    done = threading.Semaphore(0)
    with _served(model, max_inflight=4096) as (_, server):
        pool = [Client(server.endpoint, timeout=300) for _ in range(clients)]
        try:
            start = time.perf_counter()
            convs = [pool[c % clients].open(f"pipe-{c}") for c in range(conversations)]
            rng = random.Random(3)
            for t in range(turns):
                for conv in convs:
                    key = (conv.id, t)

                    def on_error(exc: Exception, key: tuple[str, int] = key) -> None:
                        outcome[key] = exc
                        done.release()

                    def on_completed(key: tuple[str, int] = key) -> None:
                        outcome[key] = "completed"
                        done.release()

                    conv.interact(_query(rng), max_new_tokens=16).subscribe(streams[key].append, on_error, on_completed)
            for _ in range(conversations * turns):
                if not done.acquire(timeout=600):
                    break
            elapsed = time.perf_counter() - start
        finally:
            for client in pool:
                client.close()
    problems: list[str] = []
    for (cid, t), events in sorted(streams.items()):
        if outcome.get((cid, t)) != "completed":
            problems.append(f"{cid} turn {t}: {outcome.get((cid, t))!r}")
            continue
        kinds = [type(e) for e in events]
        tokens = [e for e in events if isinstance(e, Token)]
        answer = [e for e in events if isinstance(e, AnswerCompleted)]
        ok = (
            kinds[0] is QueryReceived
            and kinds[-2:] == [MemoryUpdateStarted, MemoryUpdated]
            and len(answer) == 1
            and kinds.count(QueryReceived) == 1
            and not any(k is InteractionFailed for k in kinds)
            and [e.position for e in tokens] == list(range(len(tokens)))
            and "".join(e.text for e in tokens) == answer[0].text
            and all(e.turn == t + 1 for e in events)
            and isinstance(events[-1], MemoryUpdated)
            and events[-1].stm_version == t + 1
        )
        if not ok:
            problems.append(f"{cid} turn {t}: {[k.__name__ for k in kinds]}")
    events_total = sum(len(e) for e in streams.values())
    return {
        "scenario": "pipelined",
        "conversations": conversations,
        "turns_each": turns,
        "streams": len(streams),
        "events": events_total,
        "bad_streams": len(problems),
        "first_problems": problems[:5],
        "seconds": round(elapsed, 1),
        "ok": not problems and len(streams) == conversations * turns,
    }


# ---------------------------------------------------------------------- slow reader
def slow_reader(model: str = "small", requests: int = 3000, pause_every: int = 100) -> dict[str, Any]:
    """A raw DEALER that asks fast and reads slowly (tiny receive buffers, pauses)."""
    with _served(model) as (_, server):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(server.endpoint)

        def send() -> None:
            for rid in range(1, requests + 1):
                while True:
                    try:
                        sock.send(msgpack.packb({"op": "ping", "rid": rid}), zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        time.sleep(0.001)

        sender = threading.Thread(target=send)
        start = time.perf_counter()
        sender.start()
        rids: list[int] = []
        while len(rids) < requests and sock.poll(30_000):
            rids.append(msgpack.unpackb(sock.recv(), raw=False)["rid"])
            if len(rids) % pause_every == 0:
                time.sleep(0.02)
        sender.join()
        elapsed = time.perf_counter() - start
        sock.close(0)
        ctx.term()
    return {
        "scenario": "slow_reader",
        "requests": requests,
        "replies": len(rids),
        "in_order": rids == sorted(rids),
        "seconds": round(elapsed, 1),
        "ok": rids == list(range(1, requests + 1)),
    }


# ---------------------------------------------------------------------- non-reader
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def non_reader(model: str = "small", requests: int = 300_000, limit: int = 16 << 20) -> dict[str, Any]:
    """A raw DEALER that sends ``requests`` pings and never reads: the server's buffer for it must
    stay near ``limit`` and the peer must be told (``SlowConsumerError``) when it reads again."""
    with _served(model, max_pending_bytes=limit) as (_, server):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(server.endpoint)
        rss_before = rss_peak = _rss_bytes()
        peak_pending = 0
        start = time.perf_counter()
        for rid in range(1, requests + 1):
            while True:
                try:
                    sock.send(msgpack.packb({"op": "ping", "rid": rid}), zmq.NOBLOCK)
                    break
                except zmq.Again:
                    time.sleep(0.001)
            if rid % 1000 == 0:
                peak_pending = max([peak_pending, *(p["pending_bytes"] for p in server.peer_stats().values())])
                rss_peak = max(rss_peak, _rss_bytes())
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 2.0:  # until the server has answered what it read
            pending = sum(p["pending_bytes"] + p["pending"] for p in server.peer_stats().values())
            peak_pending = max([peak_pending, *(p["pending_bytes"] for p in server.peer_stats().values())])
            rss_peak = max(rss_peak, _rss_bytes())
            if pending != last:
                last, still_since = pending, time.monotonic()
            time.sleep(0.05)
        replies = 0
        notice: dict[str, Any] | None = None
        while notice is None and sock.poll(30_000):
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if "error" in reply and reply.get("rid") is None:
                notice = reply
            else:
                replies += 1
        elapsed = time.perf_counter() - start
        sock.close(0)
        ctx.term()
    told = notice is not None and notice["error"]["type"] == "SlowConsumerError"
    return {
        "scenario": "non_reader",
        "requests": requests,
        "limit_mib": round(limit / 2**20, 1),
        "peak_buffered_mib": round(peak_pending / 2**20, 2),
        "peak_rss_growth_mib": round((rss_peak - rss_before) / 2**20, 1),
        "replies_before_notice": replies,
        "told": told,
        "seconds": round(elapsed, 1),
        "ok": told and peak_pending <= 2 * limit,
    }


# ---------------------------------------------------------------------- cross tenant
def cross_tenant(model: str = "small") -> dict[str, Any]:
    """Bob (another CURVE key) tries every operation on Alice's conversation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_keys(tmp, ["alice", "bob"])
        with _served(model, "memory://", keys=ServerKeys.load(tmp)) as (_, server):
            alice = Client(server.endpoint, keys=ClientKeys.load(tmp, "alice"), timeout=60)
            bob = Client(server.endpoint, keys=ClientKeys.load(tmp, "bob"), timeout=60)
            try:
                ada = alice.open("ada")
                ada.ask("Hi, I'm Ada.", max_new_tokens=8)
                before = ada.export_state()
                refused: dict[str, bool] = {}
                for op in ("interact", "export", "close", "delete"):
                    fields: dict[str, Any] = {"conversation_id": "ada"}
                    if op == "interact":
                        fields["query"] = "What is my name?"
                    unknown: dict[str, Any] = {**fields, "conversation_id": "nobody"}
                    refused[op] = _same_refusal(bob, op, fields, unknown)
                alive = threading.Event()
                ada.interact("Tell me more", max_new_tokens=30).subscribe(on_completed=alive.set)
                target = max(alice._handlers, default=0)
                refused["cancel"] = bob.call("cancel", target=target) == {"cancelled": False}
                forged = ConversationState("ada", 7, 7, torch.zeros_like(before.stm), before.config_fingerprint)
                bob.restore(forged)  # lands in bob's own namespace
                alive.wait(60)
                after = ada.export_state()
                refused["restore"] = after.stm_version == before.stm_version + 1 and not torch.equal(
                    after.stm, forged.stm
                )
            finally:
                alice.close()
                bob.close()
    return {"scenario": "cross_tenant", "refused": refused, "ok": all(refused.values())}


def _same_refusal(client: Client, op: str, fields: dict[str, Any], unknown: dict[str, Any]) -> bool:
    messages = []
    for request in (fields, unknown):
        try:
            client.call(op, **request)
            return False
        except ConversationError as exc:
            messages.append(str(exc).replace(repr(request["conversation_id"]), "<id>"))
    return messages[0] == messages[1]
