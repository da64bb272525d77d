"""A replica that Serve scales down (or redeploys) drains: the memory updates it still owes commit
to Redis before it lets go, so the next replica to serve the conversation reads the latest memory.

Runs ``EngineReplica`` in this process, outside a Ray cluster (Serve would call the same async
constructor, ``handle`` and ``__del__``), with a real ``redis-server`` and the shipped small model. The
memory update is slowed so that it is certainly still owed when the shutdown begins."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from benchmarks.harness.redis_server import RedisServer
from rxruntime.serving.ray.replica import EngineReplica
from rxruntime.serving.ray.router import Route
from rxruntime.stores import open_store

JSON = [("content-type", "application/json")]


async def _call(replica: EngineReplica, path: str, payload: dict[str, Any], route: Route) -> tuple[int, Any]:
    status, body = 0, b""
    async for item in replica.handle("POST", path, "", JSON, json.dumps(payload).encode(), route):
        if isinstance(item, dict):
            status = item["status"]
        else:
            body += item
    return status, json.loads(body)


async def _drain_scenario(url: str) -> tuple[str, int, bool, bool]:
    replica = EngineReplica.__new__(EngineReplica)
    await replica.__init__(url, model="small", lease_ttl_s=30.0)  # type: ignore[misc]  # Serve awaits it the same way

    async def warm(key: str) -> None:  # Serve's multiplexing bookkeeping: absent outside a cluster
        return None

    replica.warm = warm
    engine = replica._ctx.slot.engine
    real = engine.model.memory_update
    updating = threading.Event()

    def slow_update(*args: Any, **kwargs: Any) -> Any:
        updating.set()
        time.sleep(2.0)
        return real(*args, **kwargs)

    engine.model.memory_update = slow_update  # type: ignore[method-assign]  # this engine dies with the test
    status, created = await _call(replica, "/v1/conversations", {}, Route())
    assert status == 200, created
    cid = created["id"]
    payload = {"model": "rxt", "input": "My name is Julia.", "conversation": cid}
    status, answered = await _call(replica, "/v1/responses", payload, Route(cid, cid))
    assert status == 200 and answered["status"] == "completed", answered
    owed = await asyncio.to_thread(updating.wait, 30)
    # the update of this turn is running (and sleeping): shut the replica down now
    await replica.__del__()
    store = open_store(url)
    try:
        state = store.get(cid)
        version = -1 if state is None else state.stm_version
        lease_free = store.client.get(f"rxrt:lease:{cid}") is None  # type: ignore[attr-defined]
    finally:
        store.close()
    return cid, version, owed, lease_free


@pytest.mark.timeout(300)
def test_a_replica_shut_down_with_a_memory_update_owed_commits_it_first() -> None:
    with RedisServer() as redis:
        cid, version, owed, lease_free = asyncio.run(_drain_scenario(redis.url))
    assert owed, "the memory update never started"
    assert version == 1, f"{cid}: Redis holds memory v{version} after the drain, not the turn's v1"
    assert lease_free, "the drained replica kept the conversation's lease"
